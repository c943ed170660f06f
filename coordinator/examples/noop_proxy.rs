//! A no-op `qaq.v1.Generation` proxy: the floor of the coordinator-overhead
//! benchmark. It forwards every Generate to one worker's Worker.Submit on a
//! single channel and pipes the response stream back unchanged: no
//! validation, placement, admission, request table, failover or metrics. What
//! `qaq bench` measures through it is the cost of one more gRPC hop on the
//! machine; what the coordinator adds on top of that is its own.
//!
//! ```text
//! qaq-echo-worker --listen 127.0.0.1:7001 &
//! cargo run --release -p qaq-coordinator --example noop_proxy -- 127.0.0.1:7002 127.0.0.1:7001 &
//! qaq bench --addr http://127.0.0.1:7002 --worker-addr http://127.0.0.1:7001 --requests 3000 --rate 1000
//! ```

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::Stream;
use qaq_proto::v1::generation_server::{Generation, GenerationServer};
use qaq_proto::v1::worker_client::WorkerClient;
use qaq_proto::v1::{
    AbortRequest, AbortResponse, ClusterStatusRequest, ClusterStatusResponse, GenerateRequest, GenerateResponse,
    ListModelsRequest, ListModelsResponse, SubmitRequest,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

struct Proxy {
    worker: WorkerClient<Channel>,
    next_id: AtomicU64,
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Generation for Proxy {
    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let mut req = request.into_inner();
        req.request_id = format!("noop-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let submit = SubmitRequest { request: Some(req), ..Default::default() };
        let stream = self.worker.clone().submit(submit).await?.into_inner();
        Ok(Response::new(Box::pin(stream)))
    }

    async fn abort(&self, _: Request<AbortRequest>) -> Result<Response<AbortResponse>, Status> {
        Err(Status::unimplemented("noop_proxy forwards Generate only"))
    }

    async fn list_models(&self, _: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        Err(Status::unimplemented("noop_proxy forwards Generate only"))
    }

    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Err(Status::unimplemented("noop_proxy forwards Generate only"))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(worker)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: noop_proxy LISTEN_ADDR WORKER_ADDR");
    };
    let listen: std::net::SocketAddr =
        listen.parse().map_err(|e| anyhow::anyhow!("LISTEN_ADDR: {listen:?} is not a socket address: {e}"))?;
    let channel = qaq_proto::client::endpoint(&worker)?.tcp_nodelay(true).connect().await?;
    let proxy = Proxy { worker: WorkerClient::new(channel), next_id: AtomicU64::new(0) };
    println!("noop_proxy: listening on {listen}, forwarding to {worker}");
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(GenerationServer::new(proxy))
        .serve(listen)
        .await?;
    Ok(())
}
