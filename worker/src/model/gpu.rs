//! The GPU backend (feature `cuda`): the weights uploaded once (matrices as f16, norms
//! and biases as f32) and the decoder stack ([`super::decoder::run`]) on the device:
//! dense layers as cuBLAS GEMMs (f16 operands, f32 accumulation); RMSNorm, RoPE, SiLU
//! gating, the embedding gather, residual and bias additions as the NVRTC kernels of
//! `qaq-kernels`; the residual stream stays on the device in f32.
//!
//! The KV caches: each sequence's [`KvCache`](super::KvCache) appends on the host (QAQ
//! decides widths, encodes and keeps the fp16 backups there, as on a CPU worker). A decode
//! row (one new token) then attends on the device when its cache has a device tier
//! ([`KvCache::device_tier`](super::KvCache::device_tier): the packed groups mirrored in
//! device memory, see `qaq_kernels::cuda::kv`), and its output stays there. Prefill rows,
//! and caches without a device tier (the KIVI baseline), attend on the host and their
//! output is copied up. The Q, K and V rows come down through page-locked buffers, one
//! wait per layer.

use std::sync::{Arc, Mutex};

use half::f16;
use qaq_kernels::KernelError;
use qaq_kernels::cuda::cudarc::driver::{CudaContext, CudaSlice, DeviceRepr, PinnedHostSlice, ValidAsZeroBits};
use qaq_kernels::cuda::{Blas, Gpu};

use super::backend::Backend;
use super::decoder::{self, Attended, BatchItem, Ops, Plan};
use super::kv::{DeviceCall, DeviceTier};
use qaq_kernels::qmat::QMatrix;

use super::weights::{HostWeights, Weights};
use super::{LlamaConfig, ModelError, Result};

fn dev(e: KernelError) -> ModelError {
    ModelError::Device(e.to_string())
}

fn drv(what: &'static str) -> impl Fn(qaq_kernels::cuda::cudarc::driver::DriverError) -> ModelError {
    move |e| ModelError::Device(format!("{what}: {e}"))
}

/// A weight matrix `[rows, cols]` on the device, f16 bit patterns, row-major.
#[derive(Debug)]
pub struct DevMat {
    data: CudaSlice<u16>,
    rows: usize,
    cols: usize,
}

/// f16 bit patterns of `x` (round to nearest even, as the kernels' `cvt.rn`).
pub fn f16_bits(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| f16::from_f32(v).to_bits()).collect()
}

/// A model's weights on one GPU and the handles that run them.
pub struct GpuBackend {
    cfg: LlamaConfig,
    gpu: Gpu,
    blas: Blas,
    weights: Weights<DevMat, CudaSlice<f32>>,
    /// Device bytes of the weights (what [`GpuBackend::upload`] allocated).
    weight_bytes: usize,
    name: String,
    /// Page-locked host buffers the layers' Q, K and V rows are copied into
    /// (asynchronously, then one wait per layer), grown to the largest batch seen.
    staging: Mutex<Vec<PinnedHostSlice<f32>>>,
}

impl std::fmt::Debug for GpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBackend").field("gpu", &self.gpu).field("weight_bytes", &self.weight_bytes).finish()
    }
}

impl GpuBackend {
    /// Opens GPU `ordinal` (driver check, kernels compiled by NVRTC, cuBLAS handle) and
    /// uploads the weights: matrices as f16, norms and biases as f32.
    pub fn upload(cfg: &LlamaConfig, host: &HostWeights, ordinal: usize) -> Result<Self> {
        let gpu = Gpu::open(ordinal).map_err(dev)?;
        let blas = Blas::new(&gpu).map_err(dev)?;
        let name = gpu.name().unwrap_or_else(|_| "unknown GPU".to_string());
        let bytes = std::cell::Cell::new(0usize);
        let weights = host.map(
            |m: &QMatrix| -> Result<DevMat> {
                let (rows, cols) = (m.rows(), m.cols());
                bytes.set(bytes.get() + rows * cols * 2);
                Ok(DevMat { data: gpu.upload(&f16_bits(&m.dequantize())).map_err(dev)?, rows, cols })
            },
            |v: &Vec<f32>| -> Result<CudaSlice<f32>> {
                bytes.set(bytes.get() + v.len() * 4);
                gpu.upload(v).map_err(dev)
            },
        )?;
        gpu.synchronize().map_err(dev)?;
        Ok(GpuBackend {
            cfg: cfg.clone(),
            gpu,
            blas,
            weights,
            weight_bytes: bytes.get(),
            name,
            staging: Mutex::new(Vec::new()),
        })
    }

    /// The GPU's name, as the driver reports it.
    pub fn device_name(&self) -> String {
        self.name.clone()
    }

    /// Device bytes holding the weights.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.gpu.zeros(n).map_err(dev)
    }

    /// Copies the first `n` values of each device buffer into the page-locked staging
    /// buffers (grown when too small), asynchronously, then waits once.
    fn rows_to_host<'s>(
        &self,
        staging: &'s mut Vec<PinnedHostSlice<f32>>,
        src: [(&CudaSlice<f32>, usize); 3],
    ) -> Result<[&'s [f32]; 3]> {
        staging.truncate(3);
        for (i, &(_, n)) in src.iter().enumerate() {
            if staging.get(i).is_some_and(|p| p.len() >= n) {
                continue;
            }
            // SAFETY: the memory is zeroed below before anything reads it.
            let mut p = unsafe { self.gpu.context().alloc_pinned_with_flags::<f32>(2 * n.max(1), 0) }
                .map_err(drv("allocating page-locked staging"))?;
            p.as_mut_slice().map_err(drv("page-locked staging"))?.fill(0.0);
            if i < staging.len() {
                staging[i] = p;
            } else {
                staging.push(p);
            }
        }
        for (p, &(d, n)) in staging.iter_mut().zip(&src) {
            self.gpu.stream().memcpy_dtoh(&d.slice(..n), p).map_err(drv("device-to-host copy"))?;
        }
        self.gpu.synchronize().map_err(dev)?;
        let mut out: [&[f32]; 3] = [&[]; 3];
        for ((o, p), &(_, n)) in out.iter_mut().zip(staging.iter()).zip(&src) {
            *o = &p.as_slice().map_err(drv("page-locked staging"))?[..n];
        }
        Ok(out)
    }
}

impl Backend for GpuBackend {
    fn device(&self) -> String {
        format!("cuda:{}", self.gpu.ordinal())
    }

    fn memory(&self) -> Option<(usize, usize)> {
        let (free, total) = self.gpu.context().mem_get_info().ok()?;
        Some((total.saturating_sub(free), total))
    }

    fn host_weights(&self) -> Option<&HostWeights> {
        None
    }

    fn forward(&self, plan: &Plan, items: &mut [BatchItem<'_>], rows: &[usize]) -> Result<Vec<f32>> {
        // The engine thread is not the one that created the context; cuBLAS needs it
        // current on the calling thread.
        self.gpu.context().bind_to_thread().map_err(drv("binding the CUDA context"))?;
        let pos: Vec<u32> = plan.positions.iter().map(|&p| p as u32).collect();
        let pass = GpuPass {
            b: self,
            plan,
            ids: self.gpu.upload(&plan.ids).map_err(dev)?,
            pos: self.gpu.upload(&pos).map_err(dev)?,
        };
        decoder::run(&pass, &self.cfg, &self.weights, items, rows)
    }

    fn cuda_context(&self) -> Option<Arc<CudaContext>> {
        Some(self.gpu.context().clone())
    }
}

/// One forward pass on the GPU: the plan, and its token ids and positions on the device.
struct GpuPass<'a> {
    b: &'a GpuBackend,
    plan: &'a Plan,
    ids: CudaSlice<u32>,
    pos: CudaSlice<u32>,
}

impl GpuPass<'_> {
    fn n(&self) -> usize {
        self.plan.ids.len()
    }
}

impl Ops for GpuPass<'_> {
    type Mat = DevMat;
    type Vec = CudaSlice<f32>;
    type Buf = CudaSlice<f32>;
    type In = CudaSlice<u16>;

    fn embed(&self, table: &DevMat) -> Result<CudaSlice<f32>> {
        let mut x = self.b.zeros::<f32>(self.n() * table.cols)?;
        self.b.gpu.embed_f16(&table.data, &self.ids, table.rows, table.cols, &mut x).map_err(dev)?;
        Ok(x)
    }

    fn rms_norm(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let (rows, h) = (self.n(), w.len());
        let mut y = self.b.zeros::<f32>(rows * h)?;
        self.b.gpu.rmsnorm(x, w, &mut y, rows, h, self.b.cfg.rms_eps as f32).map_err(dev)?;
        Ok(y)
    }

    fn operand(&self, x: CudaSlice<f32>) -> Result<CudaSlice<u16>> {
        let mut y = self.b.zeros::<u16>(x.len())?;
        self.b.gpu.to_f16(&x, &mut y, x.len()).map_err(dev)?;
        Ok(y)
    }

    fn linear(&self, w: &DevMat, x: &CudaSlice<u16>, bias: Option<&CudaSlice<f32>>) -> Result<CudaSlice<f32>> {
        let n = x.len() / w.cols;
        let mut y = self.b.zeros::<f32>(n * w.rows)?;
        self.b.blas.linear(&w.data, w.rows, w.cols, x, n, &mut y).map_err(dev)?;
        if let Some(b) = bias {
            self.b.gpu.add_bias(&mut y, b, n, w.rows).map_err(dev)?;
        }
        Ok(y)
    }

    fn rope(&self, x: &mut CudaSlice<f32>, heads: usize) -> Result<()> {
        let cfg = &self.b.cfg;
        self.b.gpu.rope(x, &self.pos, heads, cfg.head_dim, cfg.rope_theta).map_err(dev)
    }

    fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>) -> Result<()> {
        let n = x.len();
        self.b.gpu.add(x, y, n).map_err(dev)
    }

    fn silu_mul(&self, gate: CudaSlice<f32>, up: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let n = gate.len();
        let mut act = self.b.zeros::<f32>(n)?;
        self.b.gpu.silu_mul(&gate, up, &mut act, n).map_err(dev)?;
        Ok(act)
    }

    fn attention(
        &self,
        layer: usize,
        items: &mut [BatchItem<'_>],
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>> {
        let cfg = &self.b.cfg;
        let (n, qw, kvw) = (self.n(), cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        let spans = &self.plan.spans;
        // Appends happen on the host (widths, encoding, backups); decode rows attend on
        // the device where the cache has a device tier.
        let mut staging = self.b.staging.lock().unwrap_or_else(|p| p.into_inner());
        let [qh, kh, vh] = self.b.rows_to_host(&mut staging, [(q, n * qw), (k, n * kvw), (v, n * kvw)])?;
        let mut out_d = self.b.zeros::<f32>(n * qw)?;
        let mut out_h = vec![0f32; n * qw];
        let gpu = &self.b.gpu;
        let mut on_device = |tier: &mut dyn DeviceTier, i: usize, qr: &[f32]| -> Result<bool> {
            let off = spans[i].0;
            let mut call = DeviceCall { gpu, out: out_d.slice_mut(off * qw..(off + 1) * qw) };
            Ok(tier.attend_on_device(&mut call, layer, qr)?)
        };
        let at = decoder::cache_step(items, spans, layer, [qh, kh, vh], (qw, kvw), &mut out_h, Some(&mut on_device))?;
        for (&(off, len), a) in spans.iter().zip(at) {
            if a == Attended::Host {
                let rows = off * qw..(off + len) * qw;
                gpu.stream()
                    .memcpy_htod(&out_h[rows.clone()], &mut out_d.slice_mut(rows))
                    .map_err(drv("uploading attention rows"))?;
            }
        }
        Ok(out_d)
    }

    fn logits(&self, x: &CudaSlice<f32>, norm: &CudaSlice<f32>, head: &DevMat, rows: &[usize]) -> Result<Vec<f32>> {
        let h = self.b.cfg.hidden_size;
        let m = rows.len();
        // Every row in order (teacher forcing): no gather.
        let all = rows.iter().enumerate().all(|(i, &r)| i == r) && x.len() == m * h;
        let sel = if all {
            None
        } else {
            let mut sel = self.b.zeros::<f32>(m * h)?;
            for (i, &r) in rows.iter().enumerate() {
                self.b
                    .gpu
                    .stream()
                    .memcpy_dtod(&x.slice(r * h..(r + 1) * h), &mut sel.slice_mut(i * h..(i + 1) * h))
                    .map_err(drv("selecting hidden rows"))?;
            }
            Some(sel)
        };
        let sel = sel.as_ref().unwrap_or(x);
        let mut hn = self.b.zeros::<f32>(m * h)?;
        self.b.gpu.rmsnorm(sel, norm, &mut hn, m, h, self.b.cfg.rms_eps as f32).map_err(dev)?;
        let logits = self.linear(head, &self.operand(hn)?, None)?;
        let mut v = self.b.gpu.download(&logits).map_err(dev)?;
        v.truncate(m * head.rows);
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Llama;
    use crate::model::weights::random_weights;

    #[test]
    fn f16_bits_round_to_nearest_even_like_the_kernels() {
        let b = f16_bits(&[0.0, 1.0, -2.5, 65504.0, 1.0 + 1.0 / 4096.0]);
        assert_eq!(b[..4], [0x0000, 0x3c00, 0xc100, 0x7bff]);
        // Halfway between 1.0 and its successor 1 + 2^-10 rounds to even (1.0).
        assert_eq!(b[4], 0x3c00);
    }

    #[test]
    fn a_gpu_model_needs_a_gpu_and_says_so() {
        let cfg = super::super::LlamaConfig::tiny();
        let mut m = Llama::from_weights(cfg.clone(), random_weights(&cfg, 3)).unwrap();
        match m.use_gpu(0) {
            Ok(_) => assert_eq!(m.device(), "cuda:0"),
            Err(e) if !qaq_kernels::cuda::driver_available() => {
                let e = e.to_string();
                assert!(e.contains("cuda:0") && e.contains("driver library"), "{e}");
            }
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("NVRTC") || e.contains("cuBLAS") || e.contains("cuda:0"), "{e}");
            }
        }
        if !qaq_kernels::cuda::driver_available() {
            assert_eq!(m.device(), "cpu");
        }
    }
}
