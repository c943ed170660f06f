//! KV migration over NCCL between GPU workers of one node. A puller that is a GPU worker
//! with NCCL offers it in `ExportKvRequest.nccl` (naming its `--node`); an exporter that
//! is one too, on the same node, answers with an NCCL unique id instead of data chunks,
//! and the snapshot goes device to device in one send (`qaq_kernels::cuda::nccl`). Any
//! other pair, and every CPU worker, streams the snapshot over gRPC as before.
//!
//! Joining a communicator blocks until the peer joins, and an NCCL call cannot be
//! cancelled: both sides run on blocking threads under the pull's timeout, after which
//! the puller prefills; a peer that never joins leaves one blocked thread behind.

use qaq_proto::v1::NcclOffer;

use crate::error::MigrationError;
use crate::model::LoadedModel;

fn nccl(e: impl std::fmt::Display) -> MigrationError {
    MigrationError::Nccl(e.to_string())
}

/// Longest `--node` / `NcclOffer.node` (a DNS name).
pub const MAX_NODE_BYTES: usize = 253;

/// Checks a node name (`what` names the flag or field).
pub fn check_node(what: &str, node: &str) -> Result<(), String> {
    if node.is_empty() || node.len() > MAX_NODE_BYTES || node.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{what}: must be 1 to {MAX_NODE_BYTES} bytes without spaces or control characters"));
    }
    Ok(())
}

/// Whether an exporter on `node` that `can` use NCCL sends over it to a puller that made
/// `offer`: only between GPU workers of one node.
pub fn accepts(offer: Option<&NcclOffer>, node: &str, can: bool) -> bool {
    can && offer.is_some_and(|o| o.node == node)
}

/// Whether this worker can send or receive over NCCL: its model runs on a GPU and the
/// NCCL library loads.
pub fn usable(model: &LoadedModel) -> bool {
    #[cfg(feature = "cuda")]
    if model.model.cuda_context().is_some() {
        return qaq_kernels::cuda::nccl::nccl_available();
    }
    let _ = model;
    false
}

/// The offer a puller on `node` makes, if it can receive over NCCL.
pub fn offer(model: &LoadedModel, node: &str) -> Option<NcclOffer> {
    usable(model).then(|| NcclOffer { node: node.to_string() })
}

/// Exporter: a new communicator id to hand to the puller.
pub fn new_id() -> Result<Vec<u8>, MigrationError> {
    #[cfg(feature = "cuda")]
    return qaq_kernels::cuda::nccl::new_id().map_err(nccl);
    #[cfg(not(feature = "cuda"))]
    Err(nccl("this worker was built without the `cuda` feature"))
}

/// Exporter: sends `bytes` as rank 0 of communicator `id`, on a blocking thread.
pub async fn send(model: &LoadedModel, id: Vec<u8>, bytes: Vec<u8>) -> Result<(), MigrationError> {
    #[cfg(feature = "cuda")]
    {
        let ctx = model.model.cuda_context().ok_or_else(|| nccl("the model is not on a GPU"))?;
        tokio::task::spawn_blocking(move || qaq_kernels::cuda::nccl::send_bytes(&ctx, &id, &bytes))
            .await
            .map_err(|e| nccl(format!("the send task failed: {e}")))?
            .map_err(nccl)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (model, id, bytes);
        Err(nccl("this worker was built without the `cuda` feature"))
    }
}

/// Puller: receives `n` bytes as rank 1 of communicator `id`, on a blocking thread.
pub async fn recv(model: &LoadedModel, id: Vec<u8>, n: usize) -> Result<Vec<u8>, MigrationError> {
    #[cfg(feature = "cuda")]
    {
        let ctx = model.model.cuda_context().ok_or_else(|| nccl("the model is not on a GPU"))?;
        tokio::task::spawn_blocking(move || qaq_kernels::cuda::nccl::recv_bytes(&ctx, &id, n))
            .await
            .map_err(|e| nccl(format!("the receive task failed: {e}")))?
            .map_err(nccl)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (model, id, n);
        Err(nccl("this worker was built without the `cuda` feature"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_only_between_gpu_workers_of_one_node() {
        let offer = NcclOffer { node: "node-a".into() };
        assert!(accepts(Some(&offer), "node-a", true));
        assert!(!accepts(Some(&offer), "node-b", true), "another node: gRPC");
        assert!(!accepts(Some(&offer), "node-a", false), "the exporter cannot: gRPC");
        assert!(!accepts(None, "node-a", true), "no offer (a CPU puller): gRPC");
    }

    #[test]
    fn node_names_are_checked_naming_the_field() {
        assert!(check_node("--node", "gpu-node-7.example").is_ok());
        for bad in ["", "a b", "x\u{7}", &"n".repeat(254)] {
            let e = check_node("nccl.node", bad).unwrap_err();
            assert!(e.starts_with("nccl.node: must be 1 to 253 bytes"), "{e}");
        }
    }
}
