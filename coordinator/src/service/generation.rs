//! `qaq.v1.Generation`, the client API.

use std::pin::Pin;
use std::time::Instant;

use futures::Stream;
use qaq_proto::v1::generation_server::Generation;
use qaq_proto::v1::{
    AbortRequest, AbortResponse, ClusterStatusRequest, ClusterStatusResponse, GenerateRequest, GenerateResponse,
    ListModelsRequest, ListModelsResponse,
};
use tonic::{Request, Response, Status};

use crate::cluster::Cluster;
use crate::deadline;
use crate::error::GenerateError;
use crate::metrics as m;
use crate::stream::Forward;

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
        let admission = self.cluster.admit(&mut req).map_err(|e| {
            count_rejection(&e, received);
            Status::from(e)
        })?;
        tracing::debug!(request_id = %admission.request_id, worker_id = %admission.worker_id, ?timeout, "placed");
        let mut forward = Forward::new(self.cluster.clone(), admission, received, timeout);
        forward.start(req).await?;
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
