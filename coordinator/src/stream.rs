//! Forwarding one worker stream to one client: [`Forward`] owns the worker's
//! response stream and the request's place in the cluster. It ends the
//! client's stream on the worker's final message, a worker error, the
//! client's deadline or an Abort; when it is dropped before the worker
//! finished (client disconnect, deadline, ...) it drops the worker stream and
//! calls Worker.Abort, then releases the request.
//!
//! Failover: when the worker fails (transport error, stream cut, an abort the
//! client did not ask for, e.g. a drain that ran out of grace), the request
//! is resubmitted to another worker with the tokens streamed so far as
//! `resume_token_ids`, and the same client stream continues (a migration;
//! before the first token it is a plain retry). `--max-retries` bounds this;
//! then the client gets UNAVAILABLE with the partial usage. When the worker
//! ended the request itself (a drain out of grace), it is alive and has
//! parked the request's KV cache: the resubmission names it as
//! `kv_source_address`, and the next worker pulls the cache from there
//! instead of prefilling prompt and tokens again.
//!
//! A client resuming a cut stream (`GenerateRequest.resume_token_ids`, e.g.
//! after its coordinator died) starts the same way as a migration: those
//! tokens are where the stream continues from.

use std::time::{Duration, Instant};

use futures::Stream;
use qaq_proto::v1::worker_client::WorkerClient;
use qaq_proto::v1::{ErrorReason, FinishReason, GenerateRequest, GenerateResponse, SubmitRequest, Usage};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::cluster::{Admission, Cluster, Placed, abort_on_worker};
use crate::error::GenerateError;
use crate::metrics::{self as m, Outcome, Protocol};

/// After an Abort, how long the worker gets to send its own final message
/// before the coordinator ends the stream with a synthesized one.
pub const ABORT_GRACE: Duration = Duration::from_secs(1);
/// How long a worker gets to end its stream after its final message.
const WORKER_END_TIMEOUT: Duration = Duration::from_millis(200);

/// What woke the forwarding loop.
enum Event {
    /// The Abort signal fired (`true`) or its sender vanished (`false`).
    Abort(bool),
    /// The worker did not end its stream within [`ABORT_GRACE`] of an Abort.
    GraceOver,
    /// The client's deadline passed.
    Deadline,
    /// The worker's stream yielded.
    Message(Result<Option<GenerateResponse>, Status>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Placed, no token yet (counted in requests_waiting).
    Waiting,
    /// Streaming (counted in requests_running).
    Running,
    /// Ended; outcome recorded.
    Done,
}

/// Why one Worker.Submit attempt failed.
enum Attempt {
    /// The client's deadline passed.
    Deadline,
    /// The worker (or the connection to it) answered with an error.
    Worker(Status),
}

/// Whether a worker error is the worker's fault (retry elsewhere) rather
/// than the request's (report it).
pub fn retryable(s: &Status) -> bool {
    use tonic::Code;
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled | Code::Aborted | Code::ResourceExhausted
    )
}

/// Whether the error says the connection to the worker is gone (as opposed
/// to a worker that answered it is draining: `qaq.v1.ErrorDetail` reason
/// DRAINING, see `qaq_proto::status`).
fn connection_lost(s: &Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
        && qaq_proto::status::reason(s) != ErrorReason::Draining
}

/// Forwards one request's stream; see the module docs.
pub struct Forward {
    cluster: Cluster,
    request_id: String,
    worker_id: String,
    incarnation: u64,
    worker: WorkerClient<Channel>,
    /// The current worker's address.
    address: String,
    /// Where the next Submit pulls the request's KV cache from: the address of
    /// a worker that ended the request itself (and parked its cache).
    kv_source: Option<String>,
    /// The request as submitted (resubmitted on failover).
    request: GenerateRequest,
    predicted_tokens: u64,
    /// Every token the client has: the ones it resumed after, then the ones
    /// streamed here (resume_token_ids of each Submit).
    token_ids: Vec<u32>,
    /// Workers that failed this request.
    failed: Vec<String>,
    retries: u32,
    /// A worker-side end seen while forwarding its last tokens: fail over
    /// on the next poll.
    pending_failure: Option<Status>,
    /// The worker's stream; `None` once it ended (or was dropped).
    inbound: Option<Streaming<GenerateResponse>>,
    /// Whether the worker's side of the request is over (final message or
    /// error): no Worker.Abort needed.
    worker_finished: bool,
    /// Every token was resumed by the client: the stream is only the final message.
    complete: bool,
    /// The client's deadline, with the original timeout for messages.
    deadline: Option<(tokio::time::Instant, Duration)>,
    /// Fired by Generation.Abort; the sender lives in the request table.
    abort: Option<oneshot::Receiver<()>>,
    /// Set once aborted: when the worker's final message is due.
    abort_grace: Option<tokio::time::Instant>,
    received: Instant,
    last_token: Option<Instant>,
    tokens: u32,
    phase: Phase,
    /// Duration of a successful request (feeds the retry-after estimate).
    duration: Option<Duration>,
    /// The front the request came in through (metrics label).
    protocol: Protocol,
}

impl Forward {
    /// Takes over a placed request. `received` is when the client's request
    /// arrived; `timeout` the client's timeout; `protocol` the front it came
    /// in through.
    pub fn new(
        cluster: Cluster,
        admission: Admission,
        mut request: GenerateRequest,
        received: Instant,
        timeout: Option<Duration>,
        protocol: Protocol,
    ) -> Self {
        metrics::gauge!(m::REQUESTS_WAITING, m::LABEL_PROTOCOL => protocol.as_str()).increment(1.0);
        let Admission { request_id, placed, abort, predicted_tokens, .. } = admission;
        let Placed { worker_id, incarnation, worker, address } = placed;
        let deadline = deadline_of(received, timeout);
        let token_ids = std::mem::take(&mut request.resume_token_ids);
        Self {
            cluster,
            request_id,
            worker_id,
            incarnation,
            worker,
            address,
            kv_source: None,
            request,
            predicted_tokens,
            token_ids,
            failed: Vec::new(),
            retries: 0,
            pending_failure: None,
            inbound: None,
            worker_finished: false,
            complete: false,
            deadline,
            abort: Some(abort),
            abort_grace: None,
            received,
            last_token: None,
            tokens: 0,
            phase: Phase::Waiting,
            duration: None,
            protocol,
        }
    }

    /// Calls Worker.Submit (with the client's remaining time as its
    /// timeout), failing over to other workers while that is retryable. On
    /// error the request is over; dropping `self` then releases it (and
    /// aborts it on the worker if the call was cut short).
    pub async fn start(&mut self) -> Result<(), GenerateError> {
        if self.nothing_left() {
            self.complete = true;
            self.worker_finished = true;
            return Ok(());
        }
        match self.submit_once().await {
            Ok(()) => Ok(()),
            Err(Attempt::Deadline) => Err(self.deadline_error()),
            Err(Attempt::Worker(status)) if retryable(&status) => self.resubmit(status).await.map(|_| ()),
            Err(Attempt::Worker(status)) => {
                self.worker_finished = true;
                Err(self.fail(GenerateError::Worker { worker_id: self.worker_id.clone(), status }))
            }
        }
    }

    /// One Worker.Submit of the request (resuming after the tokens streamed so far).
    async fn submit_once(&mut self) -> Result<(), Attempt> {
        let resume_token_ids = self.token_ids.clone();
        let kv_source_address = if resume_token_ids.is_empty() { None } else { self.kv_source.take() };
        let mut submit = tonic::Request::new(SubmitRequest {
            request: Some(self.request.clone()),
            resume_token_ids,
            kv_source_address: kv_source_address.unwrap_or_default(),
        });
        if let Some((at, _)) = self.deadline {
            submit.set_timeout(at.saturating_duration_since(tokio::time::Instant::now()).max(Duration::from_millis(1)));
        }
        let mut worker = self.worker.clone();
        let call = worker.submit(submit);
        let result = match self.deadline {
            Some((at, _)) => tokio::time::timeout_at(at, call).await.ok(),
            None => Some(call.await),
        };
        match result {
            Some(Ok(response)) => {
                self.inbound = Some(response.into_inner());
                Ok(())
            }
            Some(Err(status)) => Err(Attempt::Worker(status)),
            None => Err(Attempt::Deadline),
        }
    }

    /// Fails over after `status` from the current worker until a worker
    /// accepts the request. `Ok(true)`: every token was already streamed, the
    /// caller ends the stream.
    async fn resubmit(&mut self, mut status: Status) -> Result<bool, GenerateError> {
        loop {
            tracing::info!(
                request_id = %self.request_id, worker_id = %self.worker_id, tokens = self.token_ids.len(),
                error = %status.message(), "worker failed the request: failing over"
            );
            // The old stream is over (or about to be, for a draining worker).
            self.inbound = None;
            self.worker_finished = true;
            if connection_lost(&status) {
                self.cluster.suspect(&self.worker_id, self.incarnation);
            }
            self.failed.push(self.worker_id.clone());
            let tokens = self.token_ids.len() as u32;
            if self.nothing_left() {
                return Ok(true);
            }
            if self.retries >= self.cluster.config().max_retries {
                return Err(self.give_up(status));
            }
            let placed = match self.cluster.reassign(
                &self.request_id,
                &self.request.model,
                &self.request.session_id,
                self.predicted_tokens,
                &self.failed,
            ) {
                Ok(p) => p,
                Err(e) => return Err(self.give_up(Status::from(e))),
            };
            self.retries += 1;
            metrics::counter!(m::RETRIES_TOTAL).increment(1);
            if tokens > 0 {
                metrics::counter!(m::MIGRATIONS_TOTAL).increment(1);
            }
            tracing::info!(request_id = %self.request_id, to = %placed.worker_id, tokens, "resubmitting");
            self.worker_id = placed.worker_id;
            self.incarnation = placed.incarnation;
            self.worker = placed.worker;
            self.address = placed.address;
            self.worker_finished = false;
            match self.submit_once().await {
                Ok(()) => return Ok(false),
                Err(Attempt::Deadline) => return Err(self.deadline_error()),
                Err(Attempt::Worker(s)) if retryable(&s) => status = s,
                Err(Attempt::Worker(s)) => {
                    self.worker_finished = true;
                    return Err(self.fail(GenerateError::Worker { worker_id: self.worker_id.clone(), status: s }));
                }
            }
        }
    }

    /// Whether the client has every token it may get: `max_new_tokens`, or
    /// the default (the most a worker allows when the client set none).
    fn nothing_left(&self) -> bool {
        let max = self.request.max_new_tokens.unwrap_or(qaq_proto::validate::DEFAULT_MAX_NEW_TOKENS);
        self.token_ids.len() >= max as usize
    }

    fn give_up(&mut self, status: Status) -> GenerateError {
        self.fail(GenerateError::RetriesExhausted {
            retries: self.retries,
            tokens: self.token_ids.len() as u32,
            worker_id: self.worker_id.clone(),
            status,
        })
    }

    fn deadline_error(&mut self) -> GenerateError {
        let timeout = self.deadline.map(|d| d.1).unwrap_or_default();
        self.fail(GenerateError::Deadline { timeout, tokens: self.tokens })
    }

    /// Fails over, then: `None` to keep reading, or the item to return.
    async fn fail_over(&mut self, status: Status) -> Option<Result<GenerateResponse, GenerateError>> {
        match self.resubmit(status).await {
            Ok(false) => None,
            // The worker failed after streaming the last token, before its final message.
            Ok(true) => Some(Ok(self.synthesized_final(FinishReason::Length))),
            Err(s) => Some(Err(s)),
        }
    }

    /// The client's response stream: the worker's messages, or the typed
    /// error that ended the request (each front maps it to its wire format).
    pub fn into_stream(self) -> impl Stream<Item = Result<GenerateResponse, GenerateError>> + Send + 'static {
        futures::stream::unfold(self, |mut f| async move { f.next().await.map(|item| (item, f)) })
    }

    async fn next(&mut self) -> Option<Result<GenerateResponse, GenerateError>> {
        loop {
            if self.phase == Phase::Done {
                self.drain_finished_worker().await;
                return None;
            }
            if self.complete {
                return Some(Ok(self.synthesized_final(FinishReason::Length)));
            }
            if let Some(status) = self.pending_failure.take() {
                match self.fail_over(status).await {
                    None => continue,
                    item => return item,
                }
            }
            let event = {
                let inbound = self.inbound.as_mut()?;
                let abort = &mut self.abort;
                let grace = self.abort_grace;
                // The client's deadline stops counting once aborted.
                let deadline = if grace.is_some() { None } else { self.deadline.map(|d| d.0) };
                tokio::select! {
                    biased;
                    r = async { abort.as_mut().expect("guarded").await }, if abort.is_some() => Event::Abort(r.is_ok()),
                    _ = sleep_until(grace), if grace.is_some() => Event::GraceOver,
                    _ = sleep_until(deadline), if deadline.is_some() => Event::Deadline,
                    msg = inbound.message() => Event::Message(msg),
                }
            };
            match event {
                Event::Abort(fired) => {
                    self.abort = None;
                    if fired {
                        // The Abort handler called Worker.Abort; give the worker a
                        // moment to end its stream with its own final message.
                        self.abort_grace = Some(tokio::time::Instant::now() + ABORT_GRACE);
                    }
                }
                Event::GraceOver => return Some(Ok(self.synthesized_final(FinishReason::Aborted))),
                Event::Deadline => return Some(Err(self.deadline_error())),
                Event::Message(Ok(Some(msg))) => {
                    let worker_abort = msg.finish_reason == FinishReason::Aborted as i32 && self.abort_grace.is_none();
                    if !worker_abort {
                        return Some(Ok(self.on_message(msg)));
                    }
                    // The worker ended the request on its own (drain out of
                    // grace): forward what it produced, then fail over. It is
                    // alive: not a lost connection.
                    self.pending_failure = Some(qaq_proto::status::draining(format!(
                        "worker {} aborted the request (draining or stopping)",
                        self.worker_id
                    )));
                    // It is alive and parked the request's KV cache for the next worker.
                    self.kv_source = Some(self.address.clone());
                    let delta = GenerateResponse { finish_reason: 0, usage: None, kv_stats: None, ..msg };
                    if !delta.token_ids.is_empty() || !delta.text.is_empty() {
                        return Some(Ok(self.on_message(delta)));
                    }
                }
                Event::Message(Ok(None)) => {
                    self.worker_finished = true;
                    if self.abort_grace.is_some() {
                        return Some(Ok(self.synthesized_final(FinishReason::Aborted)));
                    }
                    let status = Status::unavailable(format!("worker {} ended the stream early", self.worker_id));
                    match self.fail_over(status).await {
                        None => continue,
                        item => return item,
                    }
                }
                Event::Message(Err(_)) if self.abort_grace.is_some() => {
                    self.worker_finished = true;
                    return Some(Ok(self.synthesized_final(FinishReason::Aborted)));
                }
                Event::Message(Err(status)) if retryable(&status) => match self.fail_over(status).await {
                    None => continue,
                    item => return item,
                },
                Event::Message(Err(status)) => {
                    self.worker_finished = true;
                    return Some(Err(self.fail(GenerateError::Worker { worker_id: self.worker_id.clone(), status })));
                }
            }
        }
    }

    /// Reads a finished worker stream to its end (the trailers follow the
    /// final message at once). Dropping it earlier would reset the HTTP/2
    /// stream, and a connection that sees many resets is torn down by h2.
    async fn drain_finished_worker(&mut self) {
        if !self.worker_finished {
            return;
        }
        if let Some(mut inbound) = self.inbound.take() {
            let _ =
                tokio::time::timeout(WORKER_END_TIMEOUT, async { while let Ok(Some(_)) = inbound.message().await {} })
                    .await;
        }
    }

    fn on_message(&mut self, mut msg: GenerateResponse) -> GenerateResponse {
        let now = Instant::now();
        let n = msg.token_ids.len() as u32;
        if n > 0 {
            match self.last_token {
                None => {
                    metrics::histogram!(m::TIME_TO_FIRST_TOKEN_SECONDS, m::LABEL_PROTOCOL => self.protocol.as_str())
                        .record(now.duration_since(self.received));
                    if n > 1 {
                        // Tokens batched into the first message arrived together.
                        for _ in 1..n {
                            metrics::histogram!(m::INTER_TOKEN_LATENCY_SECONDS).record(0.0);
                        }
                    }
                }
                Some(prev) => {
                    let per_token = now.duration_since(prev).as_secs_f64() / f64::from(n);
                    for _ in 0..n {
                        metrics::histogram!(m::INTER_TOKEN_LATENCY_SECONDS).record(per_token);
                    }
                }
            }
            self.last_token = Some(now);
            self.tokens += n;
            self.token_ids.extend_from_slice(&msg.token_ids);
            metrics::counter!(m::GENERATED_TOKENS_TOTAL).increment(u64::from(n));
            if self.phase == Phase::Waiting {
                let protocol = self.protocol.as_str();
                metrics::gauge!(m::REQUESTS_WAITING, m::LABEL_PROTOCOL => protocol).decrement(1.0);
                metrics::gauge!(m::REQUESTS_RUNNING, m::LABEL_PROTOCOL => protocol).increment(1.0);
                self.phase = Phase::Running;
            }
        }
        msg.request_id.clone_from(&self.request_id);
        if msg.worker_id.is_empty() {
            msg.worker_id.clone_from(&self.worker_id);
        }
        let reason = FinishReason::try_from(msg.finish_reason).unwrap_or(FinishReason::Unspecified);
        if reason != FinishReason::Unspecified {
            self.worker_finished = true;
            let outcome = if reason == FinishReason::Aborted { Outcome::Aborted } else { Outcome::Ok };
            self.end(outcome);
        }
        msg
    }

    /// The final message the worker did not send, ending the request with
    /// `reason`: `Aborted` (an aborted request whose worker sent none in time)
    /// or `Length` (a worker that died after streaming the last token, or a
    /// client that resumed after every token).
    fn synthesized_final(&mut self, reason: FinishReason) -> GenerateResponse {
        self.end(if reason == FinishReason::Aborted { Outcome::Aborted } else { Outcome::Ok });
        GenerateResponse {
            request_id: self.request_id.clone(),
            finish_reason: reason as i32,
            usage: Some(Usage { prompt_tokens: 0, completion_tokens: self.token_ids.len() as u32 }),
            worker_id: self.worker_id.clone(),
            ..Default::default()
        }
    }

    fn fail(&mut self, e: GenerateError) -> GenerateError {
        tracing::debug!(request_id = %self.request_id, worker_id = %self.worker_id, error = %e, "request failed");
        self.end(e.outcome());
        e
    }

    /// Records the outcome and leaves the gauges (the worker stream is read
    /// to its end by the next poll, or dropped and aborted by Drop).
    fn end(&mut self, outcome: Outcome) {
        let protocol = self.protocol.as_str();
        match self.phase {
            Phase::Waiting => metrics::gauge!(m::REQUESTS_WAITING, m::LABEL_PROTOCOL => protocol).decrement(1.0),
            Phase::Running => metrics::gauge!(m::REQUESTS_RUNNING, m::LABEL_PROTOCOL => protocol).decrement(1.0),
            Phase::Done => return,
        }
        self.phase = Phase::Done;
        metrics::counter!(m::REQUESTS_TOTAL, m::LABEL_OUTCOME => outcome.as_str(), m::LABEL_PROTOCOL => protocol)
            .increment(1);
        metrics::histogram!(m::REQUEST_DURATION_SECONDS, m::LABEL_PROTOCOL => protocol).record(self.received.elapsed());
        if outcome == Outcome::Ok {
            self.duration = Some(self.received.elapsed());
        }
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        // Client went away mid-stream (or any early end): count it as aborted.
        self.end(Outcome::Aborted);
        // Dropping the worker stream resets the HTTP/2 stream (the worker
        // treats that as an abort); Worker.Abort makes sure of it.
        self.inbound = None;
        if !self.worker_finished
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let (worker, worker_id, request_id) =
                (self.worker.clone(), self.worker_id.clone(), self.request_id.clone());
            rt.spawn(async move { abort_on_worker(worker, &worker_id, &request_id).await });
        }
        self.cluster.release(&self.request_id, self.duration);
    }
}

/// The client's deadline as an instant, with the timeout (for messages). A
/// timeout too large to represent is no deadline at all.
pub fn deadline_of(received: Instant, timeout: Option<Duration>) -> Option<(tokio::time::Instant, Duration)> {
    timeout.and_then(|t| Some((tokio::time::Instant::from_std(received.checked_add(t)?), t)))
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use qaq_proto::v1::worker_server::{Worker, WorkerServer};
    use qaq_proto::v1::{
        AbortRequest, AbortResponse, DrainRequest, DrainResponse, ExportKvRequest, KvChunk, ModelInfo, RegisterRequest,
        StatsRequest, StatsResponse, WorkerState,
    };
    use tonic::{Code, Request, Response};

    use super::*;
    use crate::config::Config;

    #[test]
    fn only_the_draining_detail_tells_a_live_worker_from_a_lost_one() {
        assert!(!connection_lost(&qaq_proto::status::draining("worker is draining")));
        // The text alone is not the reason.
        assert!(connection_lost(&Status::unavailable("worker is draining")));
        assert!(connection_lost(&Status::unavailable("connection refused")));
        assert!(connection_lost(&Status::unknown("h2 protocol error")));
        assert!(!connection_lost(&Status::internal("boom")));
        // Both are failed over.
        assert!(retryable(&qaq_proto::status::draining("worker is draining")));
        assert!(retryable(&Status::unavailable("connection refused")));
    }

    /// A worker that refuses every Submit with the status `refusal` makes, or,
    /// without one, accepts it and ends the stream without a final message.
    struct FakeWorker {
        refusal: Option<fn() -> Status>,
    }

    type Empty<T> = futures::stream::Empty<Result<T, Status>>;

    #[tonic::async_trait]
    impl Worker for FakeWorker {
        type SubmitStream = Empty<GenerateResponse>;
        type ExportKvStream = Empty<KvChunk>;

        async fn submit(&self, _: Request<SubmitRequest>) -> Result<Response<Self::SubmitStream>, Status> {
            match self.refusal {
                Some(refusal) => Err(refusal()),
                None => Ok(Response::new(futures::stream::empty())),
            }
        }
        async fn abort(&self, _: Request<AbortRequest>) -> Result<Response<AbortResponse>, Status> {
            Ok(Response::new(AbortResponse { found: false }))
        }
        async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn drain(&self, _: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn export_kv(&self, _: Request<ExportKvRequest>) -> Result<Response<Self::ExportKvStream>, Status> {
            Err(Status::unimplemented("fake"))
        }
    }

    /// A cluster without retries whose one worker, `w1`, is `fake` served on a
    /// local port, and a request admitted onto it.
    async fn one_fake_worker(fake: FakeWorker) -> (Cluster, Forward) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(
            tonic::transport::Server::builder().add_service(WorkerServer::new(fake)).serve_with_incoming(incoming),
        );
        let cluster = Cluster::new(Config { max_retries: 0, ..Config::default() });
        let model = ModelInfo { name: "smol".into(), context_length: 8192, vocab_size: 49152, ..Default::default() };
        let worker = RegisterRequest { worker_id: "w1".into(), address, model: Some(model), ..Default::default() };
        cluster.register(&worker).unwrap();
        let mut request = GenerateRequest { prompt: "hi".into(), max_new_tokens: Some(4), ..Default::default() };
        let admission = cluster.admit(&mut request, None, None).await.unwrap();
        let forward = Forward::new(cluster.clone(), admission, request, Instant::now(), None, Protocol::Grpc);
        (cluster, forward)
    }

    fn state_of_w1(cluster: &Cluster) -> WorkerState {
        WorkerState::try_from(cluster.status().workers[0].state).unwrap()
    }

    #[tokio::test]
    async fn a_draining_refusal_fails_over_without_marking_the_worker_down() {
        let (cluster, mut forward) =
            one_fake_worker(FakeWorker { refusal: Some(|| qaq_proto::status::draining("worker is draining")) }).await;
        let e = Status::from(forward.start().await.unwrap_err());
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.message().contains("gave up after 0 retries"), "{}", e.message());
        assert_eq!(state_of_w1(&cluster), WorkerState::Up);
        drop(forward);
        assert_eq!(cluster.status().in_flight, 0);
    }

    #[tokio::test]
    async fn a_plain_unavailable_marks_the_worker_down() {
        let (cluster, mut forward) =
            one_fake_worker(FakeWorker { refusal: Some(|| Status::unavailable("worker is draining")) }).await;
        let e = Status::from(forward.start().await.unwrap_err());
        assert_eq!(e.code(), Code::Unavailable);
        assert_eq!(state_of_w1(&cluster), WorkerState::Down);
    }

    /// A worker stream that ends without its final message is a worker
    /// failure: failed over (here: no retries left), the worker marked down.
    #[tokio::test]
    async fn a_stream_ending_without_its_final_message_is_failed_over() {
        let (cluster, mut forward) = one_fake_worker(FakeWorker { refusal: None }).await;
        forward.start().await.unwrap();
        let items: Vec<_> = forward.into_stream().map(|r| r.map_err(Status::from)).collect().await;
        let [Err(e)] = items.as_slice() else { panic!("{items:?}") };
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.message().contains("gave up after 0 retries"), "{}", e.message());
        assert!(e.message().contains("ended the stream early"), "{}", e.message());
        assert_eq!(state_of_w1(&cluster), WorkerState::Down);
        assert_eq!(cluster.status().in_flight, 0);
    }
}
