//! Thin client SDK over the generated `Generation` client.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use qaq_proto::{client, v1::GenerateRequest};
//! let mut c = client::connect("127.0.0.1:50051", None).await?;
//! let mut stream = c
//!     .generate(GenerateRequest { prompt: "Hello".into(), max_new_tokens: Some(8), ..Default::default() })
//!     .await?
//!     .into_inner();
//! while let Some(msg) = stream.message().await? {
//!     print!("{}", msg.text);
//! }
//! # Ok(()) }
//! ```

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::v1::generation_client::GenerationClient;

/// Metadata key of the API key (`authorization: Bearer <key>`).
pub const AUTHORIZATION: &str = "authorization";

/// Adds `authorization: Bearer <key>` to every call when a key is set.
#[derive(Clone, Debug, Default)]
pub struct ApiKey(Option<MetadataValue<Ascii>>);

impl ApiKey {
    /// A key to send, or none.
    pub fn new(key: Option<&str>) -> Result<Self, Status> {
        match key {
            None => Ok(Self(None)),
            Some(k) => format!("Bearer {k}")
                .parse()
                .map(|v| Self(Some(v)))
                .map_err(|_| Status::invalid_argument("api key: must be printable ASCII")),
        }
    }
}

impl tonic::service::Interceptor for ApiKey {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(AUTHORIZATION, v.clone());
        }
        Ok(req)
    }
}

/// The generation client the SDK hands out.
pub type Client = GenerationClient<InterceptedService<Channel, ApiKey>>;

/// Turns `host:port` into `http://host:port`; full URIs pass unchanged.
pub fn normalize_uri(addr: &str) -> String {
    if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") }
}

/// An endpoint for `addr` (`host:port` or a URI).
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Endpoint::from_shared(normalize_uri(addr))
}

/// Connects to a coordinator's client API.
pub async fn connect(addr: &str, api_key: Option<&str>) -> Result<Client, Box<dyn std::error::Error + Send + Sync>> {
    let channel = endpoint(addr)?.connect().await?;
    Ok(GenerationClient::with_interceptor(channel, ApiKey::new(api_key)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_bare_addresses() {
        assert_eq!(normalize_uri("127.0.0.1:1"), "http://127.0.0.1:1");
        assert_eq!(normalize_uri("https://a:1"), "https://a:1");
    }

    #[test]
    fn descriptor_set_names_the_services() {
        use prost::Message;
        let _ = prost::bytes::Bytes::from_static(crate::FILE_DESCRIPTOR_SET);
        let text = String::from_utf8_lossy(crate::FILE_DESCRIPTOR_SET);
        assert!(text.contains("Generation") && text.contains("Registry") && text.contains("qaq.v1"));
        let req = crate::v1::GenerateRequest { prompt: "x".into(), max_new_tokens: Some(3), ..Default::default() };
        let back = crate::v1::GenerateRequest::decode(req.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back.max_new_tokens, Some(3));
    }
}
