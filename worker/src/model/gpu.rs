//! The llama forward pass on an NVIDIA GPU (feature `cuda`): weights uploaded once as f16,
//! the dense layers as cuBLAS GEMMs ([`Blas`]: f16 operands, f32 accumulation), RMSNorm,
//! RoPE, SiLU gating, the embedding gather, residual and bias additions as the NVRTC
//! kernels of `qaq-kernels`; the residual stream stays on the device in f32.
//!
//! The KV caches: each sequence's [`KvCache`] appends on the host (QAQ decides widths,
//! encodes and keeps the fp16 backups there, as on a CPU worker). A decode row (one new
//! token) then attends on the device when its cache has a device tier
//! ([`KvCache::attend_on_gpu`]: the packed groups mirrored in device memory, see
//! `qaq_kernels::cuda::kv`), and its output stays there. Prefill rows, and caches without
//! a device tier (the KIVI baseline), attend on the host and their output is copied up.
//!
//! Same contract as [`Llama::forward`]: the batch is checked by the same
//! [`Llama::plan`], so errors read the same on both devices.

use half::f16;
use qaq_kernels::KernelError;
use qaq_kernels::cuda::cudarc::driver::{CudaSlice, DeviceRepr, PinnedHostSlice, ValidAsZeroBits};
use qaq_kernels::cuda::{Blas, Gpu};
use std::sync::Mutex;

use super::llama::{Layer, Mat, Plan};
use super::{BatchItem, Llama, ModelError, Result};

fn dev(e: KernelError) -> ModelError {
    ModelError::Device(e.to_string())
}

/// One layer's weights on the device.
struct GpuLayer {
    attn_norm: CudaSlice<f32>,
    ffn_norm: CudaSlice<f32>,
    wq: DevMat,
    wk: DevMat,
    wv: DevMat,
    wo: DevMat,
    w_gate: DevMat,
    w_up: DevMat,
    w_down: DevMat,
    bq: Option<CudaSlice<f32>>,
    bk: Option<CudaSlice<f32>>,
    bv: Option<CudaSlice<f32>>,
}

/// A weight matrix `[rows, cols]` on the device, f16 bit patterns, row-major.
struct DevMat {
    data: CudaSlice<u16>,
    rows: usize,
    cols: usize,
}

/// f16 bit patterns of `x` (round to nearest even, as the kernels' `cvt.rn`).
pub fn f16_bits(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| f16::from_f32(v).to_bits()).collect()
}

/// A model's weights on one GPU and the handles that run them.
pub struct GpuLlama {
    gpu: Gpu,
    blas: Blas,
    embed: DevMat,
    layers: Vec<GpuLayer>,
    norm: CudaSlice<f32>,
    lm_head: Option<DevMat>,
    /// Device bytes of the weights (what [`GpuLlama::upload`] allocated).
    weight_bytes: usize,
    name: String,
    /// Page-locked host buffers the layers' Q, K and V rows are copied into
    /// (asynchronously, then one wait per layer), grown to the largest batch seen.
    staging: Mutex<Vec<PinnedHostSlice<f32>>>,
}

impl std::fmt::Debug for GpuLlama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuLlama").field("gpu", &self.gpu).field("weight_bytes", &self.weight_bytes).finish()
    }
}

impl GpuLlama {
    /// Opens GPU `ordinal` (driver check, kernels compiled by NVRTC, cuBLAS handle) and
    /// uploads `model`'s weights: matrices as f16, norms and biases as f32.
    pub fn upload(model: &Llama, ordinal: usize) -> Result<Self> {
        let gpu = Gpu::open(ordinal).map_err(dev)?;
        let blas = Blas::new(&gpu).map_err(dev)?;
        let name = gpu.name().unwrap_or_else(|_| "unknown GPU".to_string());
        let mut bytes = 0usize;
        let mut mat = |m: &Mat| -> Result<DevMat> {
            bytes += m.data.len() * 2;
            Ok(DevMat { data: gpu.upload(&f16_bits(&m.data)).map_err(dev)?, rows: m.rows, cols: m.cols })
        };
        let embed = mat(&model.embed)?;
        let lm_head = model.lm_head.as_ref().map(&mut mat).transpose()?;
        let mut layers = Vec::with_capacity(model.layers.len());
        for l in &model.layers {
            let Layer { wq, wk, wv, wo, w_gate, w_up, w_down, .. } = l;
            let (wq, wk, wv, wo) = (mat(wq)?, mat(wk)?, mat(wv)?, mat(wo)?);
            let (w_gate, w_up, w_down) = (mat(w_gate)?, mat(w_up)?, mat(w_down)?);
            layers.push((l, [wq, wk, wv, wo, w_gate, w_up, w_down]));
        }
        let mut vec32 = |v: &[f32]| -> Result<CudaSlice<f32>> {
            bytes += v.len() * 4;
            gpu.upload(v).map_err(dev)
        };
        let norm = vec32(&model.norm)?;
        let mut dev_layers = Vec::with_capacity(layers.len());
        for (l, [wq, wk, wv, wo, w_gate, w_up, w_down]) in layers {
            dev_layers.push(GpuLayer {
                attn_norm: vec32(&l.attn_norm)?,
                ffn_norm: vec32(&l.ffn_norm)?,
                bq: l.bq.as_deref().map(&mut vec32).transpose()?,
                bk: l.bk.as_deref().map(&mut vec32).transpose()?,
                bv: l.bv.as_deref().map(&mut vec32).transpose()?,
                wq,
                wk,
                wv,
                wo,
                w_gate,
                w_up,
                w_down,
            });
        }
        gpu.synchronize().map_err(dev)?;
        Ok(GpuLlama {
            gpu,
            blas,
            embed,
            layers: dev_layers,
            norm,
            lm_head,
            weight_bytes: bytes,
            name,
            staging: Mutex::new(Vec::new()),
        })
    }

    /// The GPU's ordinal.
    pub fn ordinal(&self) -> usize {
        self.gpu.ordinal()
    }
    /// The GPU's name, as the driver reports it.
    pub fn device_name(&self) -> String {
        self.name.clone()
    }
    /// The CUDA context.
    pub fn context(&self) -> &std::sync::Arc<qaq_kernels::cuda::cudarc::driver::CudaContext> {
        self.gpu.context()
    }
    /// The device's memory in use and its total, from the driver.
    pub fn memory(&self) -> Option<(usize, usize)> {
        let (free, total) = self.gpu.context().mem_get_info().ok()?;
        Some((total.saturating_sub(free), total))
    }
    /// Device bytes holding the weights.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.gpu.zeros(n).map_err(dev)
    }

    /// `x [n, cols]` (f32) through `w` (+ bias): `[n, rows]` f32.
    fn linear(
        &self,
        w: &DevMat,
        x16: &CudaSlice<u16>,
        n: usize,
        bias: Option<&CudaSlice<f32>>,
    ) -> Result<CudaSlice<f32>> {
        let mut y = self.zeros::<f32>(n * w.rows)?;
        self.blas.linear(&w.data, w.rows, w.cols, x16, n, &mut y).map_err(dev)?;
        if let Some(b) = bias {
            self.gpu.add_bias(&mut y, b, n, w.rows).map_err(dev)?;
        }
        Ok(y)
    }

    /// The f16 copy of `n` values (a GEMM operand).
    fn half(&self, x: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<u16>> {
        let mut y = self.zeros::<u16>(n)?;
        self.gpu.to_f16(x, &mut y, n).map_err(dev)?;
        Ok(y)
    }

    /// RMSNorm of `rows` rows of `x` with weight `w`.
    fn rms_norm(&self, cpu: &Llama, x: &CudaSlice<f32>, w: &CudaSlice<f32>, rows: usize) -> Result<CudaSlice<f32>> {
        let h = cpu.cfg.hidden_size;
        let mut y = self.zeros::<f32>(rows * h)?;
        self.gpu.rmsnorm(x, w, &mut y, rows, h, cpu.cfg.rms_eps as f32).map_err(dev)?;
        Ok(y)
    }

    /// [`Llama::forward`] (`all == false`: the logits of each item's last token) or
    /// [`Llama::forward_all`] (`all`: of every fed token) on the GPU: the logits, row-major,
    /// and their number of rows.
    pub(super) fn forward(&self, cpu: &Llama, items: &mut [BatchItem<'_>], all: bool) -> Result<(Vec<f32>, usize)> {
        let Plan { ids, positions, spans } = cpu.plan(items)?;
        // The engine thread is not the one that created the context; cuBLAS needs it
        // current on the calling thread.
        self.gpu
            .context()
            .bind_to_thread()
            .map_err(|e| ModelError::Device(format!("binding the CUDA context: {e}")))?;
        let x = self.hidden(cpu, items, &ids, &positions, &spans)?;
        let rows: Vec<usize> =
            if all { (0..ids.len()).collect() } else { spans.iter().map(|&(off, len)| off + len - 1).collect() };
        let logits = self.logits(cpu, &x, &rows)?;
        Ok((logits, rows.len()))
    }

    fn hidden(
        &self,
        cpu: &Llama,
        items: &mut [BatchItem<'_>],
        ids: &[u32],
        positions: &[usize],
        spans: &[(usize, usize)],
    ) -> Result<CudaSlice<f32>> {
        let cfg = &cpu.cfg;
        let (hd, nh, nkv, h, inter) =
            (cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_size, cfg.intermediate_size);
        let (n, qw, kvw) = (ids.len(), nh * hd, nkv * hd);
        let g = &self.gpu;
        let ids_d = g.upload(ids).map_err(dev)?;
        let pos: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let pos_d = g.upload(&pos).map_err(dev)?;
        let mut x = self.zeros::<f32>(n * h)?;
        g.embed_f16(&self.embed.data, &ids_d, cfg.vocab_size, h, &mut x).map_err(dev)?;
        let mut attn = vec![0f32; n * qw];
        for (li, l) in self.layers.iter().enumerate() {
            let hn = self.half(&self.rms_norm(cpu, &x, &l.attn_norm, n)?, n * h)?;
            let mut q = self.linear(&l.wq, &hn, n, l.bq.as_ref())?;
            let mut k = self.linear(&l.wk, &hn, n, l.bk.as_ref())?;
            let v = self.linear(&l.wv, &hn, n, l.bv.as_ref())?;
            g.rope(&mut q, &pos_d, nh, hd, cfg.rope_theta).map_err(dev)?;
            g.rope(&mut k, &pos_d, nkv, hd, cfg.rope_theta).map_err(dev)?;
            // Appends happen on the host (widths, encoding, backups); attention on the
            // device where the cache has a device tier.
            let mut staging = self.staging.lock().unwrap_or_else(|p| p.into_inner());
            let [qh, kh, vh] = self.rows_to_host(&mut staging, [(&q, n * qw), (&k, n * kvw), (&v, n * kvw)])?;
            let mut attn_d = self.zeros::<f32>(n * qw)?;
            for (it, &(off, len)) in items.iter_mut().zip(spans) {
                it.kv.append(li, &kh[off * kvw..(off + len) * kvw], &vh[off * kvw..(off + len) * kvw])?;
                let (qr, rows) = (&qh[off * qw..(off + len) * qw], off * qw..(off + len) * qw);
                if len == 1 && it.kv.attend_on_gpu(g, li, qr, &mut attn_d.slice_mut(rows.clone()))? {
                    continue;
                }
                it.kv.attend(li, qr, len, &mut attn[rows.clone()])?;
                g.stream()
                    .memcpy_htod(&attn[rows.clone()], &mut attn_d.slice_mut(rows))
                    .map_err(|e| ModelError::Device(format!("uploading attention rows: {e}")))?;
            }
            let a = self.half(&attn_d, n * qw)?;
            let o = self.linear(&l.wo, &a, n, None)?;
            g.add(&mut x, &o, n * h).map_err(dev)?;
            let hn = self.half(&self.rms_norm(cpu, &x, &l.ffn_norm, n)?, n * h)?;
            let gate = self.linear(&l.w_gate, &hn, n, None)?;
            let up = self.linear(&l.w_up, &hn, n, None)?;
            let mut act = self.zeros::<f32>(n * inter)?;
            g.silu_mul(&gate, &up, &mut act, n * inter).map_err(dev)?;
            let down = self.linear(&l.w_down, &self.half(&act, n * inter)?, n, None)?;
            g.add(&mut x, &down, n * h).map_err(dev)?;
        }
        for it in items.iter_mut() {
            it.kv.end_step();
        }
        Ok(x)
    }

    /// Copies the first `n` values of each device buffer into the page-locked staging
    /// buffers (grown when too small), asynchronously, then waits once.
    fn rows_to_host<'s>(
        &self,
        staging: &'s mut Vec<PinnedHostSlice<f32>>,
        src: [(&CudaSlice<f32>, usize); 3],
    ) -> Result<[&'s [f32]; 3]> {
        let derr = |what: &'static str| move |e| ModelError::Device(format!("{what}: {e}"));
        staging.truncate(3);
        for (i, &(_, n)) in src.iter().enumerate() {
            if staging.get(i).is_some_and(|p| p.len() >= n) {
                continue;
            }
            // SAFETY: the memory is zeroed below before anything reads it.
            let mut p = unsafe { self.gpu.context().alloc_pinned_with_flags::<f32>(2 * n.max(1), 0) }
                .map_err(derr("allocating page-locked staging"))?;
            p.as_mut_slice().map_err(derr("page-locked staging"))?.fill(0.0);
            if i < staging.len() {
                staging[i] = p;
            } else {
                staging.push(p);
            }
        }
        for (p, &(d, n)) in staging.iter_mut().zip(&src) {
            self.gpu.stream().memcpy_dtoh(&d.slice(..n), p).map_err(derr("device-to-host copy"))?;
        }
        self.gpu.synchronize().map_err(dev)?;
        let mut out: [&[f32]; 3] = [&[]; 3];
        for ((o, p), &(_, n)) in out.iter_mut().zip(staging.iter()).zip(&src) {
            *o = &p.as_slice().map_err(derr("page-locked staging"))?[..n];
        }
        Ok(out)
    }

    /// Final-norm logits of the given rows of the last hidden state.
    fn logits(&self, cpu: &Llama, x: &CudaSlice<f32>, rows: &[usize]) -> Result<Vec<f32>> {
        let h = cpu.cfg.hidden_size;
        let m = rows.len();
        // Every row in order (teacher forcing): no gather.
        let all = rows.iter().enumerate().all(|(i, &r)| i == r) && x.len() == m * h;
        let mut sel = self.zeros::<f32>(if all { 1 } else { m * h })?;
        if !all {
            let stream = self.gpu.stream();
            for (i, &r) in rows.iter().enumerate() {
                stream
                    .memcpy_dtod(&x.slice(r * h..(r + 1) * h), &mut sel.slice_mut(i * h..(i + 1) * h))
                    .map_err(|e| ModelError::Device(format!("selecting hidden rows: {e}")))?;
            }
        }
        let hn = self.half(&self.rms_norm(cpu, if all { x } else { &sel }, &self.norm, m)?, m * h)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = self.linear(head, &hn, m, None)?;
        self.gpu.download(&logits).map_err(dev).map(|mut v| {
            v.truncate(m * head.rows);
            v
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut m = Llama::from_weights(cfg.clone(), super::super::llama::random_weights(&cfg, 3)).unwrap();
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
