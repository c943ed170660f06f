//! `qaq.v1.Generation`, the client API.

use std::pin::Pin;
use std::time::Instant;

use futures::Stream;
use qaq_proto::v1::generation_server::Generation;
use qaq_proto::v1::{
    AbortRequest, AbortResponse, ClusterStatusRequest, ClusterStatusResponse, FinishReason, GenerateRequest,
    GenerateResponse, ListModelsRequest, ListModelsResponse, Usage,
};
use tonic::{Request, Response, Status};

use crate::cluster::Cluster;
use crate::deadline;
use crate::error::GenerateError;
use crate::metrics as m;
use crate::stream::{Forward, deadline_of};

/// The client API over a [`Cluster`].
#[derive(Debug, Clone)]
pub struct GenerationService {
    cluster: Cluster,
}

impl GenerationService {
    /// Serves `cluster`.
    pub fn new(cluster: Cluster) -> Self {
        Self { cluster }
    }
}

/// How much earlier than the client's deadline a queued request gives up.
const QUEUE_DEADLINE_MARGIN: std::time::Duration = std::time::Duration::from_millis(10);

/// Records a request rejected before it reached a worker.
fn count_rejection(e: &GenerateError, received: Instant) {
    metrics::counter!(m::REQUESTS_TOTAL, m::LABEL_OUTCOME => e.outcome().as_str()).increment(1);
    metrics::histogram!(m::REQUEST_DURATION_SECONDS).record(received.elapsed());
}

/// The response stream type of Generate.
pub type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Generation for GenerationService {
    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let received = Instant::now();
        let timeout = deadline::from_metadata(request.metadata());
        let mut req = request.into_inner();
        // tonic cancels the call ("Timeout expired", CANCELLED) when the
        // client's grpc-timeout passes before the response starts: a queued
        // request gives up just before that, with DEADLINE_EXCEEDED.
        let deadline = deadline_of(received, timeout)
            .map(|(at, t)| at.checked_sub(QUEUE_DEADLINE_MARGIN.min(t / 10)).unwrap_or(at));
        let admission = match self.cluster.admit(&mut req, deadline, timeout).await {
            Ok(a) => a,
            Err(e @ GenerateError::AbortedWhileQueued) => {
                count_rejection(&e, received);
                // Aborted before it ran: the stream is just the final message.
                let last = GenerateResponse {
                    request_id: req.request_id.clone(),
                    finish_reason: FinishReason::Aborted as i32,
                    usage: Some(Usage::default()),
                    ..Default::default()
                };
                return Ok(Response::new(Box::pin(tokio_stream::iter([Ok(last)]))));
            }
            Err(e) => {
                count_rejection(&e, received);
                return Err(Status::from(e));
            }
        };
        tracing::debug!(request_id = %admission.request_id, worker_id = %admission.placed.worker_id, ?timeout, "placed");
        let mut forward = Forward::new(self.cluster.clone(), admission, req, received, timeout);
        forward.start().await?;
        Ok(Response::new(Box::pin(forward.into_stream())))
    }

    async fn abort(&self, request: Request<AbortRequest>) -> Result<Response<AbortResponse>, Status> {
        let id = request.into_inner().request_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("request_id: must not be empty"));
        }
        qaq_proto::validate::id("request_id", &id)?;
        let found = self.cluster.abort(&id).await;
        Ok(Response::new(AbortResponse { found }))
    }

    async fn list_models(&self, _: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        Ok(Response::new(self.cluster.models()))
    }

    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Ok(Response::new(self.cluster.status()))
    }
}
