//! `qaq.v1.Generation`, the client API over gRPC: a thin adapter onto the
//! request path both fronts share ([`crate::front`]).

use std::pin::Pin;
use std::time::Instant;

use futures::{Stream, StreamExt};
use qaq_proto::v1::generation_server::Generation;
use qaq_proto::v1::{
    AbortRequest, AbortResponse, ClusterStatusRequest, ClusterStatusResponse, GenerateRequest, GenerateResponse,
    ListModelsRequest, ListModelsResponse,
};
use tonic::{Request, Response, Status};

use crate::cluster::Cluster;
use crate::metrics::Protocol;
use crate::{deadline, front};

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

/// The response stream type of Generate.
pub type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Generation for GenerationService {
    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let received = Instant::now();
        let timeout = deadline::from_metadata(request.metadata());
        let started = front::generate(&self.cluster, request.into_inner(), received, timeout, Protocol::Grpc).await?;
        Ok(Response::new(Box::pin(started.stream.map(|r| r.map_err(Status::from)))))
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
