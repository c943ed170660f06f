//! [`Gpu`]: one device's context, its stream, the compiled kernels, and the launches of
//! the QAQ kernels; [`DeviceStream`]: one packed stream's buffers on the device.
//!
//! [`Gpu::open`] checks that the driver library can be loaded before creating a context
//! (creating one without a driver panics inside cudarc) and that the ordinal exists, so
//! a worker asked for `cuda:N` on the wrong machine fails with a clear message.

use super::launch::{self, Shape};
use super::layout::{self, StreamImage};
use super::source::{self, MODULES};
use crate::error::{KernelError, Result};
use crate::quant::{QuantSpec, Scheme, check_group_len};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, DeviceRepr, DriverError, LaunchArgs, PushKernelArg,
    ValidAsZeroBits,
};
use std::collections::HashMap;
use std::sync::Arc;

/// Whether the CUDA driver library (`libcuda.so`) can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Checks, without creating a context, that the driver library loads and reports GPU
/// `ordinal`: the cheap part of [`Gpu::open`], for a worker to fail early.
pub fn probe(ordinal: usize) -> Result<()> {
    if !driver_available() {
        return Err(KernelError::Device(format!(
            "cuda:{ordinal} requested but the CUDA driver library (libcuda.so.1) could not be loaded: \
             this machine has no NVIDIA driver, or it is not on the loader's path"
        )));
    }
    let n = CudaContext::device_count().map_err(drv("counting CUDA devices"))?;
    if ordinal >= n.max(0) as usize {
        return Err(KernelError::Device(format!("cuda:{ordinal} requested but the driver reports {n} device(s)")));
    }
    Ok(())
}

pub(crate) fn drv(what: &str) -> impl Fn(DriverError) -> KernelError + '_ {
    move |e| KernelError::Device(format!("{what}: {e}"))
}

/// One GPU: context, default stream, every kernel loaded.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    ordinal: usize,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("ordinal", &self.ordinal).finish_non_exhaustive()
    }
}

impl Gpu {
    /// Opens device `ordinal`: driver check, context, NVRTC compilation of every module.
    pub fn open(ordinal: usize) -> Result<Self> {
        probe(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(drv("creating the CUDA context"))?;
        let stream = ctx.default_stream();
        let mut funcs = HashMap::new();
        for m in MODULES {
            let module = ctx.load_module(source::compile(&m)?).map_err(drv(m.name))?;
            for &k in m.kernels {
                funcs.insert(k, module.load_function(k).map_err(drv(k))?);
            }
        }
        Ok(Gpu { ctx, stream, funcs, ordinal })
    }

    /// The device's name, as the driver reports it.
    pub fn name(&self) -> Result<String> {
        self.ctx.name().map_err(drv("device name"))
    }
    /// The ordinal this was opened with.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Waits for every queued launch and copy.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(drv("synchronize"))
    }

    pub(crate) fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs.get(name).ok_or_else(|| KernelError::Device(format!("kernel {name} not loaded")))
    }

    /// Copies `x` to a new device buffer (at least one element, so empty inputs still
    /// give a valid pointer).
    pub fn upload<T: DeviceRepr + ValidAsZeroBits + Copy>(&self, x: &[T]) -> Result<CudaSlice<T>> {
        if x.is_empty() {
            return self.zeros(1);
        }
        self.stream.clone_htod(x).map_err(drv("host-to-device copy"))
    }
    /// Copies a device buffer back (after every launch queued before it).
    pub fn download<T: DeviceRepr>(&self, x: &CudaSlice<T>) -> Result<Vec<T>> {
        let v = self.stream.clone_dtoh(x).map_err(drv("device-to-host copy"))?;
        self.synchronize()?;
        Ok(v)
    }
    /// A zeroed device buffer of `n` (at least one) elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(n.max(1)).map_err(drv("device allocation"))
    }

    /// A launch of kernel `name`: push its arguments, then [`fire`] it.
    pub(crate) fn kernel(&self, name: &str) -> Result<LaunchArgs<'_>> {
        Ok(self.stream.launch_builder(self.func(name)?))
    }

    /// Reads a kernel's error word and maps its bits to the CPU path's errors.
    pub(crate) fn check_err(&self, err: &CudaSlice<u32>) -> Result<()> {
        let e = self.download(err)?.first().copied().unwrap_or(0);
        match e {
            0 => Ok(()),
            e if e & 1 != 0 => Err(KernelError::NonFinite { what: "group" }),
            e if e & 2 != 0 => Err(KernelError::NonFinite { what: "group range" }),
            e if e & 4 != 0 => Err(KernelError::Config("width outside 0..=8 (or raw)".to_string())),
            e if e & 8 != 0 => Err(KernelError::Config("a mirror record's slot is outside its layer".to_string())),
            e => Err(KernelError::Device(format!("kernel reported error bits {e:#x}"))),
        }
    }

    /// Quantizes `n = x.len() / d` groups of f16 values (bit patterns) at widths `bits`
    /// into a new device stream: byte for byte what [`crate::store::PackedStream::push`]
    /// stores with quantizer `spec`.
    pub fn quantize_f16(&self, x: &CudaSlice<u16>, d: usize, bits: &[u8], spec: &QuantSpec) -> Result<DeviceStream> {
        let mut s = DeviceStream::for_widths(self, d, spec, bits)?;
        self.quantize_into(x, spec, &mut s)?;
        Ok(s)
    }

    /// Quantizes `s.len()` groups of `x` into `s` at the widths `s` was allocated for
    /// ([`DeviceStream::for_widths`]), overwriting its contents.
    pub fn quantize_into(&self, x: &CudaSlice<u16>, spec: &QuantSpec, s: &mut DeviceStream) -> Result<()> {
        let (n, d) = (s.len, s.d);
        if x.len() < n * d {
            return Err(KernelError::Shape { what: "values", expected: n * d, got: x.len() });
        }
        if n == 0 {
            return Ok(());
        }
        let (k_lo, k_hi) = layout::outlier_counts(spec, d);
        if k_lo + k_hi != s.k {
            return Err(KernelError::Config("quantizer outliers differ from the stream's allocation".to_string()));
        }
        s.scheme = spec.scheme;
        let mut err = self.zeros::<u32>(1)?;
        let (n32, d32, lo, hi, sc) = (n as u32, d as u32, k_lo as u32, k_hi as u32, layout::scheme_code(spec.scheme));
        // SAFETY: parameters in `qaq_quantize`'s order; the stream's buffers were sized
        // from the same offsets the kernel writes at.
        unsafe {
            let mut b = self.kernel("qaq_quantize")?;
            b.arg(x).arg(&n32).arg(&d32).arg(&s.bits).arg(&s.code_off).arg(&s.out_off).arg(&lo).arg(&hi);
            b.arg(&sc).arg(&mut s.codes).arg(&mut s.m).arg(&mut s.s).arg(&mut s.bits_out).arg(&mut s.n_out);
            b.arg(&mut s.out_idx).arg(&mut s.out_val).arg(&mut err);
            fire(b, launch::groups(n)?, "qaq_quantize")?;
        }
        self.check_err(&err)
    }

    /// Reconstructs every group of `s` (`len * d` f32, token-major).
    pub fn dequantize(&self, s: &DeviceStream) -> Result<CudaSlice<f32>> {
        let mut out = self.zeros::<f32>(s.len * s.d)?;
        if s.len == 0 {
            return Ok(out);
        }
        let (n, d, sc) = (s.len as u32, s.d as u32, layout::scheme_code(s.scheme));
        let args = s.args();
        // SAFETY: parameters in `qaq_dequantize`'s order; `out` holds n * d values.
        unsafe {
            let mut b = self.kernel("qaq_dequantize")?;
            args.push(&mut b);
            b.arg(&sc).arg(&n).arg(&d).arg(&mut out);
            fire(b, launch::groups(s.len)?, "qaq_dequantize")?;
        }
        Ok(out)
    }

    /// Scratch and output buffers for attention over `t` tokens, `g` heads of `d`.
    pub fn attn_buffers(&self, t: usize, g: usize, d: usize) -> Result<AttnBuffers> {
        launch::attention_split(t, g, d)?;
        let c = launch::attention_chunks(t);
        Ok(AttnBuffers {
            t,
            cap: t,
            g,
            d,
            out: self.zeros(g * d)?,
            probs: self.zeros(g * t)?,
            window: self.zeros(t)?,
            part_m: self.zeros(c * g)?,
            part_l: self.zeros(c * g)?,
            part_acc: self.zeros(c * g * d)?,
            stats: self.zeros(2 * g)?,
        })
    }

    /// `buf` made ready for attention over `t` tokens, `g` heads of `d`: reused when it
    /// has the room, else allocated with room for twice `t`.
    pub fn fit_attn_buffers<'b>(
        &self,
        buf: &'b mut Option<AttnBuffers>,
        t: usize,
        g: usize,
        d: usize,
    ) -> Result<&'b mut AttnBuffers> {
        launch::attention_split(t, g, d)?;
        if !buf.as_ref().is_some_and(|b| b.g == g && b.d == d && b.cap >= t) {
            *buf = Some(self.attn_buffers(2 * t, g, d)?);
        }
        let b = buf.as_mut().expect("just filled");
        b.t = t;
        Ok(b)
    }

    /// Decode-step attention of `g` query heads (`q`: `g * d`, scaled by 1/sqrt(d))
    /// over packed keys `k` and values `v` of one KV head: `buf.out` (`g * d`),
    /// `buf.probs` (`g * T`) and `buf.window` (`T`, max over the heads).
    pub fn attend_packed(
        &self,
        k: &DeviceStream,
        v: &DeviceStream,
        q: &CudaSlice<f32>,
        buf: &mut AttnBuffers,
    ) -> Result<()> {
        let (t, d) = (buf.t, buf.d);
        if k.len != t || v.len != t || k.d != d || v.d != d || k.scheme != v.scheme {
            return Err(KernelError::Config(format!(
                "attention: K ({} x {}), V ({} x {}) and buffers ({t} x {d}) disagree",
                k.len, k.d, v.len, v.d
            )));
        }
        self.attend_with(buf, &q.slice(..), Kv::Packed(k.args(), v.args(), layout::scheme_code(k.scheme)))
    }

    /// [`Gpu::attend_packed`] over a dense f16 cache (`k`, `v`: `T x d` f16 bits), the
    /// baseline.
    pub fn attend_f16(
        &self,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        q: &CudaSlice<f32>,
        buf: &mut AttnBuffers,
    ) -> Result<()> {
        let n = buf.t * buf.d;
        if k.len() < n || v.len() < n {
            return Err(KernelError::Shape { what: "f16 cache", expected: n, got: k.len().min(v.len()) });
        }
        self.attend_with(buf, &q.slice(..), Kv::F16(k, v))
    }

    /// Attention of `buf.g` query heads (`q`, already scaled) over `kv`: the three
    /// launches behind [`Gpu::attend_packed`], [`Gpu::attend_f16`] and the cache mirror's
    /// attention ([`super::kv::DeviceKv`]).
    pub(crate) fn attend_with(&self, buf: &mut AttnBuffers, q: &CudaView<'_, f32>, kv: Kv<'_>) -> Result<()> {
        let (t, g, d) = (buf.t, buf.g, buf.d);
        if q.len() < g * d {
            return Err(KernelError::Shape { what: "queries", expected: g * d, got: q.len() });
        }
        let (t32, g32, d32, c32) = (t as u32, g as u32, d as u32, launch::attention_chunks(t) as u32);
        let AttnBuffers { out, probs, window, part_m, part_l, part_acc, stats, .. } = buf;
        // SAFETY (all three): parameters in each kernel's order; the buffers were sized
        // by `attn_buffers` for this (t, g, d) and the shapes come from `launch`.
        unsafe {
            let name = match kv {
                Kv::Packed(..) => "qaq_attn_split_packed",
                Kv::F16(..) => "qaq_attn_split_f16",
            };
            let mut b = self.kernel(name)?;
            match &kv {
                Kv::Packed(k, v, sc) => {
                    k.push(&mut b);
                    v.push(&mut b);
                    b.arg(sc);
                }
                Kv::F16(k, v) => _ = b.arg(*k).arg(*v),
            }
            b.arg(q).arg(&t32).arg(&g32).arg(&d32).arg(&mut *probs).arg(&mut *part_m).arg(&mut *part_l);
            b.arg(&mut *part_acc);
            fire(b, launch::attention_split(t, g, d)?, name)?;

            let mut b = self.kernel("qaq_attn_combine")?;
            b.arg(&*part_m).arg(&*part_l).arg(&*part_acc).arg(&c32).arg(&g32).arg(&d32).arg(&mut *out);
            b.arg(&mut *stats);
            fire(b, launch::attention_combine(g), "qaq_attn_combine")?;

            let mut b = self.kernel("qaq_attn_probs")?;
            b.arg(&mut *probs).arg(&*stats).arg(&t32).arg(&g32).arg(&mut *window);
            fire(b, launch::elementwise(t)?, "qaq_attn_probs")?;
        }
        Ok(())
    }
}

/// The K/V source of one attention launch (built on the stack for one launch, so the
/// size of the packed variant's views does not matter).
#[allow(clippy::large_enum_variant)]
pub(crate) enum Kv<'a> {
    /// Packed keys and values, and their scheme's code.
    Packed(StreamArgs<'a>, StreamArgs<'a>, u32),
    F16(&'a CudaSlice<u16>, &'a CudaSlice<u16>),
}

/// The nine buffers of one packed stream as a kernel reads them (`QaqStream` order):
/// a [`DeviceStream`]'s, or one stream of a cache mirror's layer.
pub(crate) struct StreamArgs<'a> {
    pub codes: CudaView<'a, u8>,
    pub code_off: CudaView<'a, u32>,
    pub m: CudaView<'a, u16>,
    pub s: CudaView<'a, u16>,
    pub bits: CudaView<'a, u8>,
    pub n_out: CudaView<'a, u8>,
    pub out_off: CudaView<'a, u32>,
    pub out_idx: CudaView<'a, u8>,
    pub out_val: CudaView<'a, u16>,
}

impl<'a> StreamArgs<'a> {
    fn push<'b>(&'b self, b: &mut LaunchArgs<'b>) {
        b.arg(&self.codes).arg(&self.code_off).arg(&self.m).arg(&self.s).arg(&self.bits).arg(&self.n_out);
        b.arg(&self.out_off).arg(&self.out_idx).arg(&self.out_val);
    }
}

/// Launches a kernel whose arguments `b` holds.
///
/// # Safety
/// The arguments must match the kernel's parameter list in order and type, and every
/// buffer must be as large as the kernel reads or writes for this shape.
pub(crate) unsafe fn fire(mut b: LaunchArgs<'_>, shape: Shape, name: &str) -> Result<()> {
    // SAFETY: per this function's contract.
    unsafe { b.launch(shape.into()) }.map(|_| ()).map_err(drv(name))
}

/// Attention outputs and scratch for one (T, g, d), reusable across steps.
pub struct AttnBuffers {
    t: usize,
    /// Tokens the buffers have room for (`t <= cap`).
    cap: usize,
    g: usize,
    d: usize,
    /// `g * d` outputs.
    pub out: CudaSlice<f32>,
    /// `g * T` probabilities.
    pub probs: CudaSlice<f32>,
    /// `T` per-token maxima over the heads (the QAQ window statistic).
    pub window: CudaSlice<f32>,
    part_m: CudaSlice<f32>,
    part_l: CudaSlice<f32>,
    part_acc: CudaSlice<f32>,
    stats: CudaSlice<f32>,
}

impl AttnBuffers {
    /// Tokens of the last attention (`probs` holds `g` rows of this many).
    pub fn t(&self) -> usize {
        self.t
    }
}

impl std::fmt::Debug for DeviceStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceStream").field("d", &self.d).field("len", &self.len).finish_non_exhaustive()
    }
}

/// One packed stream on the device, in the layout of [`StreamImage`].
pub struct DeviceStream {
    d: usize,
    len: usize,
    /// Outliers per quantized group.
    k: usize,
    scheme: Scheme,
    /// Widths the quantizer reads (input) ...
    bits: CudaSlice<u8>,
    /// ... and the widths it writes with the metadata (equal after a successful launch).
    bits_out: CudaSlice<u8>,
    m: CudaSlice<u16>,
    s: CudaSlice<u16>,
    n_out: CudaSlice<u8>,
    code_off: CudaSlice<u32>,
    out_off: CudaSlice<u32>,
    codes: CudaSlice<u8>,
    out_idx: CudaSlice<u8>,
    out_val: CudaSlice<u16>,
    n_codes: usize,
    n_outliers: usize,
}

impl DeviceStream {
    /// Buffers for `bits.len()` groups of `d` values at widths `bits`, quantized with
    /// `spec` by [`Gpu::quantize_into`].
    pub fn for_widths(gpu: &Gpu, d: usize, spec: &QuantSpec, bits: &[u8]) -> Result<Self> {
        check_group_len(d)?;
        let (k_lo, k_hi) = layout::outlier_counts(spec, d);
        let (code_off, out_off) = layout::offsets(bits, d, k_lo + k_hi)?;
        let n = bits.len();
        let (nc, no) = (code_off[n] as usize, out_off[n] as usize);
        Ok(DeviceStream {
            d,
            len: n,
            k: k_lo + k_hi,
            scheme: spec.scheme,
            bits: gpu.upload(bits)?,
            bits_out: gpu.zeros(n)?,
            m: gpu.zeros(n)?,
            s: gpu.zeros(n)?,
            n_out: gpu.zeros(n)?,
            code_off: gpu.upload(&code_off)?,
            out_off: gpu.upload(&out_off)?,
            codes: gpu.zeros(nc)?,
            out_idx: gpu.zeros(no)?,
            out_val: gpu.zeros(no)?,
            n_codes: nc,
            n_outliers: no,
        })
    }

    /// Uploads a stream image (e.g. [`StreamImage::from_stream`] of a CPU stream).
    pub fn upload(gpu: &Gpu, img: &StreamImage, scheme: Scheme) -> Result<Self> {
        img.validate()?;
        Ok(DeviceStream {
            d: img.d,
            len: img.len(),
            k: img.n_out.iter().zip(&img.bits).find(|(_, b)| **b != crate::quant::RAW).map_or(0, |(k, _)| *k as usize),
            scheme,
            bits: gpu.upload(&img.bits)?,
            bits_out: gpu.upload(&img.bits)?,
            m: gpu.upload(&img.m)?,
            s: gpu.upload(&img.s)?,
            n_out: gpu.upload(&img.n_out)?,
            code_off: gpu.upload(&img.code_off)?,
            out_off: gpu.upload(&img.out_off)?,
            codes: gpu.upload(&img.codes)?,
            out_idx: gpu.upload(&img.out_idx)?,
            out_val: gpu.upload(&img.out_val)?,
            n_codes: img.codes.len(),
            n_outliers: img.out_idx.len(),
        })
    }

    /// Copies the stream back into a (validated) image.
    pub fn download(&self, gpu: &Gpu) -> Result<StreamImage> {
        let n = self.len;
        let take = |mut v: Vec<u8>, k: usize| {
            v.truncate(k);
            v
        };
        let mut img = StreamImage {
            d: self.d,
            bits: take(gpu.download(&self.bits_out)?, n),
            m: gpu.download(&self.m)?,
            s: gpu.download(&self.s)?,
            n_out: take(gpu.download(&self.n_out)?, n),
            code_off: gpu.download(&self.code_off)?,
            out_off: gpu.download(&self.out_off)?,
            codes: take(gpu.download(&self.codes)?, self.n_codes),
            out_idx: take(gpu.download(&self.out_idx)?, self.n_outliers),
            out_val: gpu.download(&self.out_val)?,
        };
        img.m.truncate(n);
        img.s.truncate(n);
        img.out_val.truncate(self.n_outliers);
        img.validate()?;
        Ok(img)
    }

    /// Number of groups.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Group length.
    pub fn d(&self) -> usize {
        self.d
    }
    /// Bytes of the device allocations holding the stream (the quantizer's input
    /// widths excluded).
    pub fn device_bytes(&self) -> usize {
        let n = self.len;
        n * crate::quant::META_BYTES + 8 * (n + 1) + self.n_codes + 3 * self.n_outliers
    }

    fn args(&self) -> StreamArgs<'_> {
        StreamArgs {
            codes: self.codes.slice(..),
            code_off: self.code_off.slice(..),
            m: self.m.slice(..),
            s: self.s.slice(..),
            bits: self.bits_out.slice(..),
            n_out: self.n_out.slice(..),
            out_off: self.out_off.slice(..),
            out_idx: self.out_idx.slice(..),
            out_val: self.out_val.slice(..),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_missing_device_is_a_clear_error() {
        let err = Gpu::open(10_000).unwrap_err().to_string();
        assert!(err.contains("cuda:10000"), "{err}");
        if !driver_available() {
            assert!(err.contains("driver library (libcuda.so.1) could not be loaded"), "{err}");
        } else {
            assert!(err.contains("device(s)"), "{err}");
        }
    }
}
