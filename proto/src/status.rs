//! Machine-readable error details in `tonic::Status`: a `qaq.v1.ErrorDetail`
//! carried the way gRPC's richer error model carries details, so that any
//! gRPC client (grpcurl, grpcio's `rpc_status`) can read it.
//!
//! The status' `details` bytes (the `grpc-status-details-bin` trailer) are an
//! encoded `google.rpc.Status` with the same code and message, whose
//! `details` hold the `ErrorDetail` packed in a `google.protobuf.Any` of type
//! URL [`ERROR_DETAIL_TYPE_URL`]. The message stays the human-readable error;
//! programs classify by [`reason`], never by the message's text.
//!
//! ```
//! use qaq_proto::status;
//! use qaq_proto::v1::ErrorReason;
//! let s = status::draining("worker is draining");
//! assert_eq!(s.code(), tonic::Code::Unavailable);
//! assert_eq!(status::reason(&s), ErrorReason::Draining);
//! assert_eq!(status::reason(&tonic::Status::unavailable("draining")), ErrorReason::Unspecified);
//! ```

use prost::Message;
use tonic::{Code, Status};

use crate::v1::{ErrorDetail, ErrorReason};

/// Type URL of a packed `qaq.v1.ErrorDetail`.
pub const ERROR_DETAIL_TYPE_URL: &str = "type.googleapis.com/qaq.v1.ErrorDetail";

/// `google.rpc.Status`, the envelope of the richer error model (the wire
/// layout of `google/rpc/status.proto`: code 1, message 2, details 3).
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    /// A `google.rpc.Code` value (the gRPC status code).
    #[prost(int32, tag = "1")]
    code: i32,
    /// The developer-facing message.
    #[prost(string, tag = "2")]
    message: String,
    /// Packed detail messages.
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// A status with `code` and `message` that carries `reason` as an
/// `ErrorDetail`.
pub fn with_reason(code: Code, message: impl Into<String>, reason: ErrorReason) -> Status {
    let message = message.into();
    let detail = prost_types::Any {
        type_url: ERROR_DETAIL_TYPE_URL.to_string(),
        value: ErrorDetail { reason: reason as i32 }.encode_to_vec(),
    };
    let envelope = RpcStatus { code: code as i32, message: message.clone(), details: vec![detail] };
    Status::with_details(code, message, envelope.encode_to_vec().into())
}

/// UNAVAILABLE with reason `ERROR_REASON_DRAINING`: the server refuses new
/// work because it drains, and is alive.
pub fn draining(message: impl Into<String>) -> Status {
    with_reason(Code::Unavailable, message, ErrorReason::Draining)
}

/// The `ErrorDetail` a status carries, if any (details that are not a
/// `google.rpc.Status` holding one are ignored).
pub fn detail(status: &Status) -> Option<ErrorDetail> {
    let envelope = RpcStatus::decode(status.details()).ok()?;
    envelope
        .details
        .iter()
        .find(|any| any.type_url == ERROR_DETAIL_TYPE_URL)
        .and_then(|any| ErrorDetail::decode(any.value.as_slice()).ok())
}

/// The reason a status carries; `Unspecified` when it carries none (or one
/// this version does not know).
pub fn reason(status: &Status) -> ErrorReason {
    detail(status).and_then(|d| ErrorReason::try_from(d.reason).ok()).unwrap_or(ErrorReason::Unspecified)
}

#[cfg(test)]
mod tests {
    use tonic::codegen::http::HeaderMap;

    use super::*;

    /// The status as a client reads it from the trailers the server sends.
    fn over_the_wire(s: &Status) -> Status {
        let mut headers = HeaderMap::new();
        s.add_header(&mut headers).unwrap();
        Status::from_header_map(&headers).unwrap()
    }

    #[test]
    fn draining_round_trips_through_the_trailers() {
        let sent = draining("worker is draining");
        let got = over_the_wire(&sent);
        assert_eq!(got.code(), Code::Unavailable);
        assert_eq!(got.message(), "worker is draining");
        assert_eq!(reason(&got), ErrorReason::Draining);
        assert_eq!(detail(&got), Some(ErrorDetail { reason: ErrorReason::Draining as i32 }));
        // The envelope is a google.rpc.Status with the same code and message.
        let envelope = RpcStatus::decode(got.details()).unwrap();
        assert_eq!((envelope.code, envelope.message.as_str()), (Code::Unavailable as i32, "worker is draining"));
        assert_eq!(envelope.details.len(), 1);
    }

    #[test]
    fn statuses_without_the_detail_have_no_reason() {
        // The text alone is not a reason.
        assert_eq!(reason(&over_the_wire(&Status::unavailable("worker is draining"))), ErrorReason::Unspecified);
        assert_eq!(detail(&Status::internal("boom")), None);
        // Details that are not an envelope, or an envelope of other details.
        let junk = Status::with_details(Code::Unavailable, "x", vec![0xff, 0xff, 0xff].into());
        assert_eq!(reason(&junk), ErrorReason::Unspecified);
        let other = prost_types::Any { type_url: "type.googleapis.com/other.Detail".into(), value: vec![8, 1] };
        assert_eq!(reason(&enveloped(other)), ErrorReason::Unspecified);
        // A reason added after this version was built reads as unspecified.
        let future = prost_types::Any {
            type_url: ERROR_DETAIL_TYPE_URL.into(),
            value: ErrorDetail { reason: 999 }.encode_to_vec(),
        };
        let s = enveloped(future);
        assert_eq!(detail(&s), Some(ErrorDetail { reason: 999 }));
        assert_eq!(reason(&s), ErrorReason::Unspecified);
    }

    fn enveloped(detail: prost_types::Any) -> Status {
        let envelope = RpcStatus { code: Code::Unavailable as i32, message: "x".into(), details: vec![detail] };
        Status::with_details(Code::Unavailable, "x", envelope.encode_to_vec().into())
    }

    #[test]
    fn the_type_url_names_the_message_in_the_descriptor_set() {
        let text = String::from_utf8_lossy(crate::FILE_DESCRIPTOR_SET);
        assert!(text.contains("ErrorDetail") && text.contains("ERROR_REASON_DRAINING"));
        let name = ERROR_DETAIL_TYPE_URL.rsplit('/').next().unwrap();
        assert_eq!(name, "qaq.v1.ErrorDetail");
    }
}
