//! `qaq.v1.Registry`, called by workers to join the cluster and renew leases.

use qaq_proto::v1::registry_server::Registry;
use qaq_proto::v1::{
    DeregisterRequest, DeregisterResponse, HeartbeatRequest, HeartbeatResponse, RegisterRequest, RegisterResponse,
};
use tonic::{Request, Response, Status};

use crate::cluster::Cluster;

/// The worker registry service over a [`Cluster`].
#[derive(Debug, Clone)]
pub struct RegistryService {
    cluster: Cluster,
}

impl RegistryService {
    /// Serves `cluster`.
    pub fn new(cluster: Cluster) -> Self {
        Self { cluster }
    }
}

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        Ok(Response::new(self.cluster.register(request.get_ref())?))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        Ok(Response::new(self.cluster.heartbeat(request.get_ref())?))
    }

    async fn deregister(&self, request: Request<DeregisterRequest>) -> Result<Response<DeregisterResponse>, Status> {
        let DeregisterRequest { worker_id: id, secret } = request.get_ref();
        if self.cluster.deregister(id, secret)? {
            tracing::info!(worker_id = %id, "worker deregistered");
        }
        Ok(Response::new(DeregisterResponse {}))
    }
}
