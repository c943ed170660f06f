//! Forwarding one worker stream to one client: [`Forward`] owns the worker's
//! response stream and the request's place in the cluster. It ends the
//! client's stream on the worker's final message, a worker error, the
//! client's deadline or an Abort; when it is dropped before the worker
//! finished (client disconnect, deadline, ...) it drops the worker stream and
//! calls Worker.Abort, then releases the request.

use std::time::{Duration, Instant};

use futures::Stream;
use qaq_proto::v1::worker_client::WorkerClient;
use qaq_proto::v1::{FinishReason, GenerateRequest, GenerateResponse, SubmitRequest, Usage};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::cluster::{Admission, Cluster, abort_on_worker};
use crate::error::GenerateError;
use crate::metrics::{self as m, Outcome};

/// After an Abort, how long the worker gets to send its own final message
/// before the coordinator ends the stream with a synthesized one.
pub const ABORT_GRACE: Duration = Duration::from_secs(1);

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

/// Forwards one request's stream; see the module docs.
pub struct Forward {
    cluster: Cluster,
    request_id: String,
    worker_id: String,
    worker: WorkerClient<Channel>,
    /// The worker's stream; `None` once it ended (or was dropped).
    inbound: Option<Streaming<GenerateResponse>>,
    /// Whether the worker's side of the request is over (final message or
    /// error): no Worker.Abort needed.
    worker_finished: bool,
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
}

impl Forward {
    /// Takes over a placed request. `received` is when the client's request
    /// arrived; `timeout` the client's gRPC timeout.
    pub fn new(cluster: Cluster, admission: Admission, received: Instant, timeout: Option<Duration>) -> Self {
        metrics::gauge!(m::REQUESTS_WAITING).increment(1.0);
        let Admission { request_id, worker_id, worker, abort, .. } = admission;
        // A timeout too large to represent is no deadline at all.
        let deadline = timeout.and_then(|t| Some((tokio::time::Instant::from_std(received.checked_add(t)?), t)));
        Self {
            cluster,
            request_id,
            worker_id,
            worker,
            inbound: None,
            worker_finished: false,
            deadline,
            abort: Some(abort),
            abort_grace: None,
            received,
            last_token: None,
            tokens: 0,
            phase: Phase::Waiting,
        }
    }

    /// Calls Worker.Submit (with the client's remaining time as its
    /// timeout). On error the request is over; dropping `self` then releases
    /// it (and aborts it on the worker if the call was cut short).
    pub async fn start(&mut self, request: GenerateRequest) -> Result<(), Status> {
        let mut submit = tonic::Request::new(SubmitRequest { request: Some(request), resume_token_ids: Vec::new() });
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
            Some(Err(status)) => {
                self.worker_finished = true;
                Err(self.fail(GenerateError::Worker { worker_id: self.worker_id.clone(), status }))
            }
            None => {
                let timeout = self.deadline.map(|d| d.1).unwrap_or_default();
                Err(self.fail(GenerateError::Deadline { timeout, tokens: 0 }))
            }
        }
    }

    /// The client's response stream.
    pub fn into_stream(self) -> impl Stream<Item = Result<GenerateResponse, Status>> + Send + 'static {
        futures::stream::unfold(self, |mut f| async move { f.next().await.map(|item| (item, f)) })
    }

    async fn next(&mut self) -> Option<Result<GenerateResponse, Status>> {
        loop {
            if self.phase == Phase::Done {
                return None;
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
                Event::GraceOver => return Some(Ok(self.finish_aborted())),
                Event::Deadline => {
                    let timeout = self.deadline.map(|d| d.1).unwrap_or_default();
                    return Some(Err(self.fail(GenerateError::Deadline { timeout, tokens: self.tokens })));
                }
                Event::Message(Ok(Some(msg))) => return Some(Ok(self.on_message(msg))),
                Event::Message(Ok(None)) => {
                    self.worker_finished = true;
                    if self.abort_grace.is_some() {
                        return Some(Ok(self.finish_aborted()));
                    }
                    return Some(Err(self.fail(GenerateError::Truncated(self.worker_id.clone()))));
                }
                Event::Message(Err(_)) if self.abort_grace.is_some() => {
                    self.worker_finished = true;
                    return Some(Ok(self.finish_aborted()));
                }
                Event::Message(Err(status)) => {
                    self.worker_finished = true;
                    return Some(Err(self.fail(GenerateError::Worker { worker_id: self.worker_id.clone(), status })));
                }
            }
        }
    }

    fn on_message(&mut self, mut msg: GenerateResponse) -> GenerateResponse {
        let now = Instant::now();
        let n = msg.token_ids.len() as u32;
        if n > 0 {
            match self.last_token {
                None => {
                    metrics::histogram!(m::TIME_TO_FIRST_TOKEN_SECONDS).record(now.duration_since(self.received));
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
            metrics::counter!(m::GENERATED_TOKENS_TOTAL).increment(u64::from(n));
            if self.phase == Phase::Waiting {
                metrics::gauge!(m::REQUESTS_WAITING).decrement(1.0);
                metrics::gauge!(m::REQUESTS_RUNNING).increment(1.0);
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

    /// The final message of an aborted request whose worker did not send one.
    fn finish_aborted(&mut self) -> GenerateResponse {
        self.end(Outcome::Aborted);
        GenerateResponse {
            request_id: self.request_id.clone(),
            finish_reason: FinishReason::Aborted as i32,
            usage: Some(Usage { prompt_tokens: 0, completion_tokens: self.tokens }),
            worker_id: self.worker_id.clone(),
            ..Default::default()
        }
    }

    fn fail(&mut self, e: GenerateError) -> Status {
        tracing::debug!(request_id = %self.request_id, worker_id = %self.worker_id, error = %e, "request failed");
        self.end(e.outcome());
        e.into()
    }

    /// Records the outcome and leaves the gauges; the worker stream is
    /// dropped here if the worker has not finished (Drop aborts it).
    fn end(&mut self, outcome: Outcome) {
        match self.phase {
            Phase::Waiting => metrics::gauge!(m::REQUESTS_WAITING).decrement(1.0),
            Phase::Running => metrics::gauge!(m::REQUESTS_RUNNING).decrement(1.0),
            Phase::Done => return,
        }
        self.phase = Phase::Done;
        metrics::counter!(m::REQUESTS_TOTAL, m::LABEL_OUTCOME => outcome.as_str()).increment(1);
        metrics::histogram!(m::REQUEST_DURATION_SECONDS).record(self.received.elapsed());
        if self.worker_finished {
            self.inbound = None;
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
        self.cluster.release(&self.request_id);
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
