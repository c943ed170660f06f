//! The forward pass's backend seam. A [`Backend`] owns a model's weights in its device's
//! memory and runs the decoder stack ([`super::decoder::run`], written once) with its own
//! operations: [`super::cpu::CpuBackend`] on the host, `super::gpu::GpuBackend` on a GPU
//! (feature `cuda`). [`super::Llama`] holds one; nothing above the model sees which.

use super::Result;
use super::decoder::{BatchItem, Plan};
use super::weights::HostWeights;

/// Where a model's forward pass runs.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// `cpu` or `cuda:N`.
    fn device(&self) -> String;
    /// On a GPU: the device's memory in use (by every process) and its total, as the driver
    /// reports them. `None` on the CPU or when the driver cannot say.
    fn memory(&self) -> Option<(usize, usize)>;
    /// The host copy of the weights, if this backend keeps one (the CPU backend: its only
    /// copy; a GPU backend keeps none).
    fn host_weights(&self) -> Option<&HostWeights>;
    /// Runs the decoder stack over a checked batch (`plan` was made from `items`) and
    /// returns the logits of `rows` (rows of the plan's fed tokens), `[rows.len(), vocab]`
    /// row-major.
    fn forward(&self, plan: &Plan, items: &mut [BatchItem<'_>], rows: &[usize]) -> Result<Vec<f32>>;
    /// On a GPU: its CUDA context (for transfers off the engine thread, e.g. NCCL).
    #[cfg(feature = "cuda")]
    fn cuda_context(&self) -> Option<std::sync::Arc<qaq_kernels::cuda::cudarc::driver::CudaContext>>;
}
