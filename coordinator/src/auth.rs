//! Authentication: client API keys (`authorization: Bearer <key>`, checked by
//! [`ApiKeyCheck`] in front of `qaq.v1.Generation`) and the workers' shared
//! registration secret ([`Secret`]). Secrets never reach logs or metrics:
//! their `Debug` is redacted and errors never quote them.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Status};

use crate::error::ConfigError;
use crate::metrics::Rejection;

/// A secret string (API key, registration secret): compared in constant
/// time, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret; `None` when it is empty after trimming.
    pub fn new(s: &str) -> Option<Self> {
        let s = s.trim();
        (!s.is_empty()).then(|| Self(s.to_string()))
    }

    /// Whether `candidate` equals the secret (time independent of where they differ).
    pub fn matches(&self, candidate: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), candidate.as_bytes())
    }

    /// The secret itself, to present it (never to log it).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for (i, &x) in a.iter().enumerate() {
        // Compare against b cyclically so the loop length depends on `a` only.
        let y = if b.is_empty() { 0 } else { b[i % b.len()] };
        diff |= u64::from(x ^ y);
    }
    diff == 0
}

/// The API keys clients may present.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys {
    keys: Vec<Secret>,
}

impl ApiKeys {
    /// Parses an API keys file: one key per line; blank lines and lines
    /// starting with `#` are ignored. Keys must be printable ASCII without
    /// spaces (they travel in a header). Errors name the line, never the key.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if !line.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::Invalid(format!(
                    "api-keys-file: line {}: a key must be printable ASCII without spaces",
                    i + 1
                )));
            }
            keys.extend(Secret::new(line));
        }
        if keys.is_empty() {
            return Err(ConfigError::Invalid("api-keys-file: no key in the file".into()));
        }
        Ok(Self { keys })
    }

    /// Reads and parses an API keys file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Invalid(format!("api-keys-file: cannot read {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The file's first key (what a tool that starts the coordinator may use itself).
    pub fn first(&self) -> Option<&Secret> {
        self.keys.first()
    }

    /// Whether there is no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks an `authorization` header value (`Bearer <key>`).
    pub fn check(&self, header: Option<&str>) -> Result<(), Status> {
        let Some(value) = header else {
            return Err(Status::unauthenticated("missing API key: send `authorization: Bearer <key>`"));
        };
        let key = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).unwrap_or("").trim();
        // Every key is compared, so timing does not reveal which one matched.
        let matched = self.keys.iter().fold(false, |acc, k| k.matches(key) | acc);
        if matched { Ok(()) } else { Err(Status::unauthenticated("invalid API key")) }
    }
}

/// Interceptor in front of the client API: with keys configured, every call
/// must carry one of them; without, every call passes.
#[derive(Clone, Debug, Default)]
pub struct ApiKeyCheck {
    keys: Option<Arc<ApiKeys>>,
}

impl ApiKeyCheck {
    /// Checks against `keys` (`None`: authentication disabled).
    pub fn new(keys: Option<ApiKeys>) -> Self {
        Self { keys: keys.map(Arc::new) }
    }
}

impl tonic::service::Interceptor for ApiKeyCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(keys) = &self.keys else { return Ok(req) };
        let header = req.metadata().get(qaq_proto::client::AUTHORIZATION).and_then(|v| v.to_str().ok());
        match keys.check(header) {
            Ok(()) => Ok(req),
            Err(s) => {
                Rejection::Unauthenticated.count();
                Err(s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;
    use tonic::service::Interceptor;

    use super::*;

    #[test]
    fn secrets_compare_exactly_and_never_print() {
        let s = Secret::new(" s3cret \n").unwrap();
        assert!(s.matches("s3cret"));
        for bad in ["", "s3cre", "s3cret!", "S3cret", "x"] {
            assert!(!s.matches(bad), "{bad}");
        }
        assert!(Secret::new("  ").is_none());
        assert!(!format!("{s:?}").contains("s3cret"));
        assert_eq!(s.expose(), "s3cret");
    }

    #[test]
    fn parses_key_files() {
        let k = ApiKeys::parse("# clients\nkey-one\n\n  key-two  \n").unwrap();
        assert_eq!(k.len(), 2);
        assert!(!format!("{k:?}").contains("key-one"));
        let e = ApiKeys::parse("# nothing\n\n").unwrap_err();
        assert!(e.to_string().contains("no key"), "{e}");
        let e = ApiKeys::parse("ok\nhas space\n").unwrap_err();
        assert!(e.to_string().contains("line 2") && !e.to_string().contains("has space"), "{e}");
        assert!(ApiKeys::load(Path::new("/nonexistent/keys")).is_err());
    }

    #[test]
    fn checks_bearer_headers() {
        let k = ApiKeys::parse("alpha\nbeta\n").unwrap();
        assert!(k.check(Some("Bearer alpha")).is_ok());
        assert!(k.check(Some("Bearer beta")).is_ok());
        for bad in [None, Some("alpha"), Some("Bearer "), Some("Bearer alph"), Some("Basic alpha")] {
            let e = k.check(bad).unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{bad:?}");
            assert!(!e.message().contains("alpha"));
        }
    }

    #[test]
    fn interceptor_passes_without_keys_and_checks_with() {
        assert!(ApiKeyCheck::new(None).call(Request::new(())).is_ok());
        let mut check = ApiKeyCheck::new(Some(ApiKeys::parse("k1").unwrap()));
        assert_eq!(check.call(Request::new(())).unwrap_err().code(), Code::Unauthenticated);
        let mut req = Request::new(());
        req.metadata_mut().insert("authorization", "Bearer k1".parse().unwrap());
        assert!(check.call(req).is_ok());
    }
}
