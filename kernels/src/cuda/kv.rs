//! [`DeviceKv`]: the device tier of one sequence's cache (a [`PolicyCache`] with packed
//! keys: QAQ, fp16 or uniform). Its packed groups live in device memory in the mirror
//! layout of [`crate::cache::mirror`], and decode-step attention runs there
//! (`qaq_attn_split_packed` over the layer's arenas).
//!
//! The host cache stays the one implementation of its policy: it stores each appended
//! token (and, QAQ, its fp16 backup), decides every width, re-encodes groups (upward
//! from the backups), and keeps the windows and the ||Q||^2 tracker. What changed since the last
//! step is copied to the device before a layer attends: appended groups and re-encoded
//! ones, as one update per layer ([`crate::cache::mirror::Update`]: a metadata scatter
//! launch and two arena copies). The attention's per-token window maximum comes back to
//! the host, which is all QAQ needs from the probabilities
//! ([`PolicyCache::observe_window`]). So a GPU worker attends over exactly the bytes the
//! CPU reference holds, and its widths follow the same rules.

use super::device::{Gpu, Kv, StreamArgs, drv, fire};
use super::launch;
use super::layout::scheme_code;
use crate::cache::PolicyCache;
use crate::cache::mirror::{LayerBook, Layout, RECORD_WORDS, Update};
use crate::error::{KernelError, Result};
use crate::store::PackedStream;
use cudarc::driver::{CudaSlice, CudaViewMut, PushKernelArg};

use super::device::AttnBuffers;

/// One layer's mirror buffers on the device.
struct LayerBuffers {
    layout: Layout,
    m: CudaSlice<u16>,
    s: CudaSlice<u16>,
    bits: CudaSlice<u8>,
    n_out: CudaSlice<u8>,
    code_off: CudaSlice<u32>,
    out_off: CudaSlice<u32>,
    codes: CudaSlice<u8>,
    out_idx: CudaSlice<u8>,
    out_val: CudaSlice<u16>,
}

impl LayerBuffers {
    fn alloc(gpu: &Gpu, l: Layout) -> Result<Self> {
        let n = l.slots();
        Ok(LayerBuffers {
            layout: l,
            m: gpu.zeros(n)?,
            s: gpu.zeros(n)?,
            bits: gpu.zeros(n)?,
            n_out: gpu.zeros(n)?,
            code_off: gpu.zeros(n)?,
            out_off: gpu.zeros(n)?,
            codes: gpu.zeros(l.cap_codes)?,
            out_idx: gpu.zeros(l.cap_out)?,
            out_val: gpu.zeros(l.cap_out)?,
        })
    }

    /// Stream `s`'s view of the buffers.
    fn stream(&self, s: usize) -> StreamArgs<'_> {
        let r = s * self.layout.cap_tokens..(s + 1) * self.layout.cap_tokens;
        StreamArgs {
            codes: self.codes.slice(..),
            code_off: self.code_off.slice(r.clone()),
            m: self.m.slice(r.clone()),
            s: self.s.slice(r.clone()),
            bits: self.bits.slice(r.clone()),
            n_out: self.n_out.slice(r.clone()),
            out_off: self.out_off.slice(r),
            out_idx: self.out_idx.slice(..),
            out_val: self.out_val.slice(..),
        }
    }
}

/// The device tier of one sequence's cache.
pub struct DeviceKv {
    books: Vec<LayerBook>,
    layers: Vec<Option<LayerBuffers>>,
    n_kv: usize,
    g: usize,
    d: usize,
    scheme: u32,
    /// One attention scratch per KV head, reused across layers and steps.
    attn: Vec<Option<AttnBuffers>>,
    uploaded: u64,
    /// A rotated cache's signs ([`crate::cache::Rotation::signs`]) on the device,
    /// uploaded on first use: its attention outputs are rotated back there.
    signs: Option<CudaSlice<f32>>,
}

impl std::fmt::Debug for DeviceKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKv").field("bytes", &self.bytes()).finish_non_exhaustive()
    }
}

impl DeviceKv {
    /// A device tier for `cache` (nothing allocated until a layer is synchronised).
    /// From now on the cache records what re-quantization re-encodes. Errors for caches
    /// the attention kernel cannot read: KIVI keys (per-channel groups), keys and values
    /// under different reconstruction schemes, more than 8 query heads per KV head.
    pub fn new(cache: &mut dyn PolicyCache) -> Result<Self> {
        let cfg = *cache.config();
        let (k, v) = cache.streams(0, 0).ok_or_else(|| {
            KernelError::Config("the device KV tier needs packed keys (not the KIVI baseline)".to_string())
        })?;
        if k.spec().scheme != v.spec().scheme {
            return Err(KernelError::Config(
                "the device KV tier needs keys and values under one reconstruction scheme".to_string(),
            ));
        }
        let (g, d) = (cfg.group(), cfg.head_dim);
        launch::attention_split(1, g, d)?;
        let scheme = scheme_code(k.spec().scheme);
        cache.track_rewrites();
        Ok(DeviceKv {
            books: (0..cfg.n_layers).map(|_| LayerBook::new(2 * cfg.n_kv_heads)).collect(),
            layers: (0..cfg.n_layers).map(|_| None).collect(),
            n_kv: cfg.n_kv_heads,
            g,
            d,
            scheme,
            attn: (0..cfg.n_kv_heads).map(|_| None).collect(),
            uploaded: 0,
            signs: None,
        })
    }

    /// Device bytes of the mirror's buffers (their allocations, free room and garbage
    /// included; attention scratch excluded).
    pub fn bytes(&self) -> usize {
        self.books.iter().map(LayerBook::bytes).sum()
    }

    /// Bytes copied host-to-device by the updates so far.
    pub fn uploaded_bytes(&self) -> u64 {
        self.uploaded
    }

    /// Brings layer `layer`'s device copy up to date with `cache`.
    pub fn sync(&mut self, gpu: &Gpu, cache: &mut dyn PolicyCache, layer: usize) -> Result<()> {
        let book = self.books.get_mut(layer).ok_or(KernelError::Layer { layer, n_layers: cache.config().n_layers })?;
        // The layer is in range: only a cache of another shape lacks a head here.
        let missing = || KernelError::Config(format!("layer {layer}: the cache has fewer KV heads than its tier"));
        let mut rewritten = Vec::with_capacity(2 * self.n_kv);
        for h in 0..self.n_kv {
            let [k, v] = cache.take_rewrites(layer, h).ok_or_else(missing)?;
            rewritten.push(k);
            rewritten.push(v);
        }
        let mut streams: Vec<&PackedStream> = Vec::with_capacity(2 * self.n_kv);
        for h in 0..self.n_kv {
            let (k, v) = cache.streams(layer, h).ok_or_else(missing)?;
            streams.push(k);
            streams.push(v);
        }
        let upd = book.plan(&streams, &rewritten)?;
        if upd.is_empty() {
            return Ok(());
        }
        self.uploaded += upd.upload_bytes() as u64;
        apply(gpu, &mut self.layers[layer], &upd)
    }

    /// Decode-step attention of one query row (`n_q_heads * head_dim`, post-RoPE,
    /// unscaled) over `layer` of `cache` on the device: synchronises the layer, writes
    /// the output row (`n_q_heads * head_dim`) into `out`, and feeds the cache's windows
    /// and ||Q||^2 tracker as [`PolicyCache::attend`] does.
    pub fn attend(
        &mut self,
        gpu: &Gpu,
        cache: &mut dyn PolicyCache,
        layer: usize,
        q: &[f32],
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let (g, d) = (self.g, self.d);
        let qs = cache.decode_queries(layer, q)?;
        if out.len() < qs.len() {
            return Err(KernelError::Shape { what: "attention output", expected: qs.len(), got: out.len() });
        }
        self.sync(gpu, cache, layer)?;
        let t = cache.len(layer);
        let bufs = self.layers[layer].as_ref().ok_or_else(|| KernelError::Config("layer not mirrored".to_string()))?;
        let q_dev = gpu.upload(&qs)?;
        let mut windows = Vec::with_capacity(self.n_kv);
        for h in 0..self.n_kv {
            let buf = gpu.fit_attn_buffers(&mut self.attn[h], t, g, d)?;
            let kv = Kv::Packed(bufs.stream(2 * h), bufs.stream(2 * h + 1), self.scheme);
            gpu.attend_with(buf, &q_dev.slice(h * g * d..(h + 1) * g * d), kv)?;
            gpu.stream()
                .memcpy_dtod(&buf.out.slice(..g * d), &mut out.slice_mut(h * g * d..(h + 1) * g * d))
                .map_err(drv("copying the attention output"))?;
            windows.push(gpu.stream().clone_dtoh(&buf.window.slice(..t)).map_err(drv("device-to-host copy"))?);
        }
        // A rotated cache attended in the rotated space of its values (the queries came
        // rotated from `decode_queries`): rotate the outputs back.
        if let Some(r) = cache.rotation() {
            if self.signs.is_none() {
                self.signs = Some(gpu.upload(r.signs())?);
            }
            let signs = self.signs.as_ref().expect("uploaded above");
            let n = self.n_kv * g;
            gpu.unrotate_heads(&mut out.slice_mut(..n * d), signs, n, d)?;
        }
        gpu.synchronize()?;
        for (h, w) in windows.iter().enumerate() {
            cache.observe_window(layer, h, &qs[h * g * d..(h + 1) * g * d], w)?;
        }
        Ok(())
    }
}

/// Applies `u` to a layer's device buffers (allocating them anew when it says so).
fn apply(gpu: &Gpu, slot: &mut Option<LayerBuffers>, u: &Update) -> Result<()> {
    if let Some(l) = u.realloc {
        // The old buffers are freed first: a rebuild needs room for one copy only.
        *slot = None;
        *slot = Some(LayerBuffers::alloc(gpu, l)?);
    }
    let b = slot.as_mut().ok_or_else(|| KernelError::Config("update of a layer never allocated".to_string()))?;
    let n = u.groups();
    let stream = gpu.stream();
    if !u.codes.is_empty() {
        let at = u.codes_at;
        stream
            .memcpy_htod(&u.codes, &mut b.codes.slice_mut(at..at + u.codes.len()))
            .map_err(drv("uploading mirror codes"))?;
    }
    if !u.out_idx.is_empty() {
        let r = u.out_at..u.out_at + u.out_idx.len();
        stream.memcpy_htod(&u.out_idx, &mut b.out_idx.slice_mut(r.clone())).map_err(drv("uploading outliers"))?;
        stream.memcpy_htod(&u.out_val, &mut b.out_val.slice_mut(r)).map_err(drv("uploading outliers"))?;
    }
    if n == 0 {
        return Ok(());
    }
    debug_assert_eq!(u.records.len(), n * RECORD_WORDS);
    let rec = gpu.upload(&u.records)?;
    let mut err = gpu.zeros::<u32>(1)?;
    let (n32, slots) = (n as u32, b.layout.slots() as u32);
    // SAFETY: parameters in `qaq_kv_scatter`'s order; `rec` holds n records and the
    // kernel checks each slot against `slots`, the length of the six metadata buffers.
    unsafe {
        let mut k = gpu.kernel("qaq_kv_scatter")?;
        k.arg(&rec).arg(&n32).arg(&slots).arg(&mut b.m).arg(&mut b.s).arg(&mut b.bits).arg(&mut b.n_out);
        k.arg(&mut b.code_off).arg(&mut b.out_off).arg(&mut err);
        fire(k, launch::elementwise(n)?, "qaq_kv_scatter")?;
    }
    gpu.check_err(&err)
}
