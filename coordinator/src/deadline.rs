//! The client's deadline, from the `grpc-timeout` request header
//! (gRPC over HTTP/2: 1 to 8 digits and a unit, H M S m u n).

use std::time::Duration;

use tonic::metadata::MetadataMap;

/// Header carrying the client's timeout.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Parses a `grpc-timeout` value; `None` for a malformed one.
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The client's timeout, if it sent a well-formed one.
pub fn from_metadata(md: &MetadataMap) -> Option<Duration> {
    md.get(GRPC_TIMEOUT).and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_grpc_timeout("300m"), Some(Duration::from_millis(300)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1M"), Some(Duration::from_secs(60)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
    }

    #[test]
    fn rejects_malformed() {
        for v in ["", "m", "300", "300x", "-1m", "1.5S", "123456789m", "12 m", "１m"] {
            assert_eq!(parse_grpc_timeout(v), None, "{v:?}");
        }
    }

    #[test]
    fn reads_metadata() {
        let mut md = MetadataMap::new();
        assert_eq!(from_metadata(&md), None);
        md.insert(GRPC_TIMEOUT, "250m".parse().unwrap());
        assert_eq!(from_metadata(&md), Some(Duration::from_millis(250)));
        // tonic's own client sets it via Request::set_timeout
        let mut r = tonic::Request::new(());
        r.set_timeout(Duration::from_millis(300));
        assert_eq!(from_metadata(r.metadata()), Some(Duration::from_millis(300)));
    }
}
