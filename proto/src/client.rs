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
//!
//! With several coordinators (replicas), [`Client::connect_many`] spreads
//! requests over them and resumes a stream that a coordinator's failure cut
//! on another one, from the tokens already received:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use futures::StreamExt;
//! use qaq_proto::{client::Client, v1::GenerateRequest};
//! let replicas = Client::connect_many(["10.0.0.1:50051", "10.0.0.2:50051"], None).await?;
//! let mut stream =
//!     replicas.generate(GenerateRequest { prompt: "Hello".into(), max_new_tokens: Some(8), ..Default::default() });
//! while let Some(msg) = stream.next().await {
//!     print!("{}", msg?.text);
//! }
//! # Ok(()) }
//! ```

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::Stream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::v1::generation_client::GenerationClient;
use crate::v1::{GenerateRequest, GenerateResponse};

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

impl Client {
    /// A client of several coordinators (replicas of one cluster), one
    /// channel each, connected lazily: a coordinator that is down now does
    /// not fail this call. Must be called inside a Tokio runtime.
    pub async fn connect_many<I, S>(
        addrs: I,
        api_key: Option<&str>,
    ) -> Result<Replicas, Box<dyn std::error::Error + Send + Sync>>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let key = ApiKey::new(api_key)?;
        let mut clients = Vec::new();
        for addr in addrs {
            let addr = addr.as_ref();
            let channel = endpoint(addr)?.connect_timeout(Duration::from_secs(2)).connect_lazy();
            clients.push((addr.to_string(), GenerationClient::with_interceptor(channel, key.clone())));
        }
        Ok(Replicas::new(clients)?)
    }
}

/// Whether a failed call or stream is worth continuing on another
/// coordinator: the coordinator (or the connection to it) failed, or it has
/// no worker for the request. Errors of the request itself are not.
pub fn resumable(s: &Status) -> bool {
    use tonic::Code;
    matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled)
}

/// Clients of several coordinators that serve the same workers (see
/// [`Client::connect_many`]). Cheap to clone; clones share the turn and the
/// counters.
#[derive(Clone, Debug)]
pub struct Replicas {
    clients: Arc<[(String, Client)]>,
    /// The next request's first coordinator.
    next: Arc<AtomicUsize>,
    /// Streams continued on another coordinator after tokens were received.
    resumed: Arc<AtomicU64>,
}

/// The messages of one request through [`Replicas::generate`].
pub type ResumingStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send + 'static>>;

impl Replicas {
    /// Replicas from clients built by the caller (e.g. with TLS), each with
    /// its address for messages. At least one.
    pub fn new(clients: Vec<(String, Client)>) -> Result<Self, Status> {
        if clients.is_empty() {
            return Err(Status::invalid_argument("coordinators: give at least one address"));
        }
        Ok(Self { clients: clients.into(), next: Arc::default(), resumed: Arc::default() })
    }

    /// The coordinators' addresses, in the order given.
    pub fn addrs(&self) -> impl Iterator<Item = &str> {
        self.clients.iter().map(|(a, _)| a.as_str())
    }

    /// A client of the next coordinator in turn (for the unary calls; on
    /// UNAVAILABLE, take the next).
    pub fn client(&self) -> Client {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.clients[i % self.clients.len()].1.clone()
    }

    /// Streams continued on another coordinator after some tokens had been
    /// received, over all requests of these replicas so far.
    pub fn resumed(&self) -> u64 {
        self.resumed.load(Ordering::Relaxed)
    }

    /// Generation.Generate on the next coordinator in turn. When the call or
    /// the stream fails in a way [`resumable`] accepts, the same request is
    /// sent to the next coordinator with the tokens received so far as
    /// `resume_token_ids` (and the request id the first coordinator gave),
    /// and the stream goes on from there: the caller sees one stream. For
    /// greedy decoding the output equals an uninterrupted run; sampled
    /// requests continue, but not with the same random draws. It gives up
    /// after every coordinator failed twice in a row without a message in
    /// between, with the last error.
    pub fn generate(&self, request: GenerateRequest) -> ResumingStream {
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let received = request.resume_token_ids.clone();
        let state = Resuming {
            replicas: self.clone(),
            request,
            received,
            at: first,
            failures: 0,
            inbound: None,
            done: false,
            last_error: None,
        };
        Box::pin(futures::stream::unfold(state, |mut s| async move { s.next().await.map(|item| (item, s)) }))
    }
}

/// One request's state in [`Replicas::generate`].
struct Resuming {
    replicas: Replicas,
    request: GenerateRequest,
    /// Every token the caller has (resume_token_ids of a resumption).
    received: Vec<u32>,
    /// Index (mod the replicas) of the coordinator in use.
    at: usize,
    /// Failures since the last message.
    failures: usize,
    inbound: Option<tonic::Streaming<GenerateResponse>>,
    /// The final message (or an error) was returned.
    done: bool,
    last_error: Option<Status>,
}

impl Resuming {
    async fn next(&mut self) -> Option<Result<GenerateResponse, Status>> {
        let n = self.replicas.clients.len();
        loop {
            if self.done {
                return None;
            }
            let Some(inbound) = self.inbound.as_mut() else {
                if self.failures >= 2 * n {
                    self.done = true;
                    let last = self.last_error.take().unwrap_or_else(|| Status::unavailable("no coordinator"));
                    return Some(Err(last));
                }
                if self.failures >= n {
                    // Every coordinator failed once: give them a moment.
                    tokio::time::sleep(Duration::from_millis(100 << (self.failures - n).min(3))).await;
                }
                let (addr, client) = &self.replicas.clients[self.at % n];
                let mut request = self.request.clone();
                request.resume_token_ids.clone_from(&self.received);
                match client.clone().generate(request).await {
                    Ok(response) => {
                        if self.failures > 0 && !self.received.is_empty() {
                            self.replicas.resumed.fetch_add(1, Ordering::Relaxed);
                        }
                        self.inbound = Some(response.into_inner());
                    }
                    Err(status) if resumable(&status) => self.failed(addr.clone(), status),
                    Err(status) => {
                        self.done = true;
                        return Some(Err(status));
                    }
                }
                continue;
            };
            match inbound.message().await {
                Ok(Some(msg)) => {
                    self.failures = 0;
                    self.received.extend_from_slice(&msg.token_ids);
                    if self.request.request_id.is_empty() {
                        self.request.request_id.clone_from(&msg.request_id);
                    }
                    self.done = msg.finish_reason != 0;
                    return Some(Ok(msg));
                }
                Ok(None) => {
                    let addr = self.replicas.clients[self.at % n].0.clone();
                    self.failed(addr, Status::unavailable("the stream ended before its final message"));
                }
                Err(status) if resumable(&status) => {
                    let addr = self.replicas.clients[self.at % n].0.clone();
                    self.failed(addr, status);
                }
                Err(status) => {
                    self.done = true;
                    return Some(Err(status));
                }
            }
        }
    }

    /// The coordinator at `addr` failed with `status`: move to the next.
    fn failed(&mut self, addr: String, status: Status) {
        self.inbound = None;
        self.failures += 1;
        self.at += 1;
        self.last_error = Some(named(&addr, &status));
    }
}

/// `status` with the coordinator's address before its message; its code and details
/// (a `qaq.v1.ErrorDetail` the client may read the reason from) are kept.
fn named(addr: &str, status: &Status) -> Status {
    let message = format!("coordinator {addr}: {}", status.message());
    Status::with_details(status.code(), message, status.details().to_vec().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_bare_addresses() {
        assert_eq!(normalize_uri("127.0.0.1:1"), "http://127.0.0.1:1");
        assert_eq!(normalize_uri("https://a:1"), "https://a:1");
    }

    /// Two addresses where nothing listens (bound, then closed).
    fn dead_addrs() -> Vec<String> {
        let socks: Vec<_> = (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        socks.iter().map(|l| l.local_addr().unwrap().to_string()).collect()
    }

    #[tokio::test]
    async fn replicas_give_up_after_every_coordinator_failed_twice_naming_the_last() {
        use futures::StreamExt;
        assert!(Replicas::new(Vec::new()).is_err());
        let addrs = dead_addrs();
        let replicas = Client::connect_many(&addrs, None).await.expect("lazy channels connect nowhere yet");
        assert_eq!(replicas.addrs().collect::<Vec<_>>(), addrs);
        let started = std::time::Instant::now();
        let mut stream = replicas.generate(GenerateRequest { prompt: "x".into(), ..Default::default() });
        let e = stream.next().await.expect("one item").expect_err("nothing listens");
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().starts_with("coordinator 127.0.0.1:"), "{}", e.message());
        assert!(stream.next().await.is_none(), "the stream ends after its error");
        // Two rounds: the second after a pause (100 + 200 ms).
        assert!(started.elapsed() >= std::time::Duration::from_millis(300), "{:?}", started.elapsed());
        assert_eq!(replicas.resumed(), 0);
    }

    #[test]
    fn the_last_error_names_its_coordinator_and_keeps_the_reason() {
        let draining = crate::status::draining("worker drains");
        let e = named("10.0.0.1:50051", &draining);
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert_eq!(e.message(), "coordinator 10.0.0.1:50051: worker drains");
        let reason = crate::status::detail(&e).map(|d| d.reason);
        assert_eq!(reason, Some(crate::v1::ErrorReason::Draining as i32));
        assert_eq!(crate::status::detail(&named("a:1", &Status::unavailable("x"))), None);
    }

    #[test]
    fn only_failures_of_a_coordinator_are_resumed() {
        assert!(resumable(&Status::unavailable("connection refused")));
        assert!(resumable(&Status::unknown("h2 protocol error")));
        assert!(resumable(&Status::internal("stream reset")));
        assert!(!resumable(&Status::invalid_argument("max_new_tokens")));
        assert!(!resumable(&Status::resource_exhausted("queue full")));
        assert!(!resumable(&Status::deadline_exceeded("timeout")));
        assert!(!resumable(&Status::unauthenticated("key")));
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
