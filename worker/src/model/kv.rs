//! The KV-cache seam between the forward pass and cache implementations.
//!
//! The model never owns a cache: each forward call receives one
//! [`KvCache`] per sequence. A cache stores post-RoPE keys and values and
//! computes attention itself, so that compressed caches (QAQ) can attend over
//! their packed representation without the model knowing.

/// Shapes a cache needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// Floats per token row of keys (or values) in one layer.
    pub fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// Floats per query row in one layer.
    pub fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }
}

/// Errors raised by caches.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("layer {layer} out of range (model has {n_layers})")]
    Layer { layer: usize, n_layers: usize },
    #[error("bad row length: {what} has {got} floats, expected a multiple of {width}")]
    Shape { what: &'static str, got: usize, width: usize },
    #[error("attention over {n_q} query rows but only {len} cached tokens")]
    Causal { n_q: usize, len: usize },
    #[error("non-finite value in {0}")]
    NonFinite(&'static str),
    #[error("{0}")]
    Other(String),
}

/// A per-sequence KV cache, driven layer by layer by the forward pass.
///
/// In one forward step, for every layer in order, the model calls
/// [`append`](KvCache::append) with the new tokens' keys and values and then
/// [`attend`](KvCache::attend) with their queries; after the last layer it
/// calls [`end_step`](KvCache::end_step).
pub trait KvCache: Send {
    /// Tokens fully cached (in every layer).
    fn len(&self) -> usize;
    /// Whether no token is cached.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Appends `n` tokens to `layer`: `k` and `v` are `[n, n_kv_heads * head_dim]`, post-RoPE.
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), KvError>;
    /// Causal attention for the last `n_q` cached positions of `layer`:
    /// `q` is `[n_q, n_heads * head_dim]` (post-RoPE, unscaled); `out` receives
    /// `[n_q, n_heads * head_dim]`.
    fn attend(&mut self, layer: usize, q: &[f32], n_q: usize, out: &mut [f32]) -> Result<(), KvError>;
    /// Called once after all layers of a forward step.
    fn end_step(&mut self) {}
    /// The cache's device tier, where a GPU backend attends decode rows
    /// ([`super::decoder::cache_step`]); `None`: the cache has none (the CPU reference, the
    /// KIVI baseline, an aborted sequence) and its rows attend on the host. Deliberately
    /// without a default: a cache wrapper must say what it forwards.
    fn device_tier(&mut self) -> Option<&mut dyn DeviceTier>;
    /// Bytes the cache holds (device tier).
    fn bytes_used(&self) -> usize;
}

/// A cache's device tier: its packed groups mirrored in the memory of the GPU the forward
/// pass runs on.
pub trait DeviceTier {
    /// Attends one decode query row of `layer` (`[n_heads * head_dim]`, post-RoPE, unscaled)
    /// on the device: what [`KvCache::attend`] does for one row, with the output row written
    /// where `call` says. `Ok(false)`: the tier declines this cache (e.g. its keys are not
    /// packed groups) and the caller attends on the host.
    fn attend_on_device(&mut self, call: &mut DeviceCall<'_>, layer: usize, q: &[f32]) -> Result<bool, KvError>;
}

/// What a GPU backend hands a [`DeviceTier`] for one row: the GPU and the output row in its
/// memory.
#[cfg(feature = "cuda")]
pub struct DeviceCall<'a> {
    pub gpu: &'a qaq_kernels::cuda::Gpu,
    pub out: qaq_kernels::cuda::cudarc::driver::CudaViewMut<'a, f32>,
}

/// What a GPU backend hands a [`DeviceTier`] for one row; a build without the `cuda`
/// feature has no GPU backend, so no value of this type exists.
#[cfg(not(feature = "cuda"))]
pub struct DeviceCall<'a> {
    never: std::convert::Infallible,
    _row: std::marker::PhantomData<&'a mut [f32]>,
}

#[cfg(not(feature = "cuda"))]
impl DeviceCall<'_> {
    /// Proof that no call reaches a device in this build.
    pub fn unreachable(&self) -> ! {
        match self.never {}
    }
}

/// Full-precision (f32) cache: the reference implementation of [`KvCache`].
#[derive(Debug)]
pub struct DenseKv {
    shape: KvShape,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl DenseKv {
    pub fn new(shape: KvShape) -> Self {
        Self { shape, keys: vec![Vec::new(); shape.n_layers], values: vec![Vec::new(); shape.n_layers] }
    }

    fn layer_len(&self, layer: usize) -> usize {
        self.keys[layer].len() / self.shape.kv_width()
    }

    fn check_layer(&self, layer: usize) -> Result<(), KvError> {
        if layer >= self.shape.n_layers {
            return Err(KvError::Layer { layer, n_layers: self.shape.n_layers });
        }
        Ok(())
    }
}

impl KvCache for DenseKv {
    fn len(&self) -> usize {
        self.layer_len(self.shape.n_layers - 1)
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), KvError> {
        self.check_layer(layer)?;
        let w = self.shape.kv_width();
        for (what, rows) in [("k", k), ("v", v)] {
            if rows.len() % w != 0 || rows.len() != k.len() {
                return Err(KvError::Shape { what, got: rows.len(), width: w });
            }
        }
        self.keys[layer].extend_from_slice(k);
        self.values[layer].extend_from_slice(v);
        Ok(())
    }

    fn attend(&mut self, layer: usize, q: &[f32], n_q: usize, out: &mut [f32]) -> Result<(), KvError> {
        self.check_layer(layer)?;
        dense_attention(&self.shape, &self.keys[layer], &self.values[layer], q, n_q, out)
    }

    fn device_tier(&mut self) -> Option<&mut dyn DeviceTier> {
        None
    }

    fn bytes_used(&self) -> usize {
        (self.keys.iter().map(Vec::len).sum::<usize>() + self.values.iter().map(Vec::len).sum::<usize>()) * 4
    }
}

/// Causal multi-head attention with grouped KV heads over dense f32 rows:
/// query row `i` of `n_q` sits at position `len - n_q + i` and sees tokens
/// `0..=that position`.
pub fn dense_attention(
    shape: &KvShape,
    keys: &[f32],
    values: &[f32],
    q: &[f32],
    n_q: usize,
    out: &mut [f32],
) -> Result<(), KvError> {
    let (hd, kvw, qw) = (shape.head_dim, shape.kv_width(), shape.q_width());
    let len = keys.len() / kvw;
    if q.len() != n_q * qw || out.len() != n_q * qw {
        return Err(KvError::Shape { what: "q/out", got: q.len(), width: qw });
    }
    if n_q > len {
        return Err(KvError::Causal { n_q, len });
    }
    let group = shape.n_heads / shape.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut scores = vec![0f32; len];
    for i in 0..n_q {
        let visible = len - n_q + i + 1;
        for h in 0..shape.n_heads {
            let kvh = h / group;
            let qh = &q[i * qw + h * hd..i * qw + (h + 1) * hd];
            let mut max = f32::NEG_INFINITY;
            for (t, s) in scores[..visible].iter_mut().enumerate() {
                let kh = &keys[t * kvw + kvh * hd..t * kvw + (kvh + 1) * hd];
                *s = qaq_kernels::simd::scalar::dot(qh, kh) * scale;
                max = max.max(*s);
            }
            let mut sum = 0.0;
            for s in &mut scores[..visible] {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out[i * qw + h * hd..i * qw + (h + 1) * hd];
            o.fill(0.0);
            for (t, s) in scores[..visible].iter().enumerate() {
                let p = s / sum;
                let vh = &values[t * kvw + kvh * hd..t * kvw + (kvh + 1) * hd];
                for (a, b) in o.iter_mut().zip(vh) {
                    *a += p * b;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_token_attention_returns_its_value() {
        let shape = KvShape { n_layers: 1, n_heads: 2, n_kv_heads: 1, head_dim: 4 };
        let mut kv = DenseKv::new(shape);
        kv.append(0, &[1.0, 0.0, 0.0, 0.0], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        let mut out = vec![0.0; 8];
        kv.attend(0, &[0.5; 8], 1, &mut out).unwrap();
        assert_eq!(out, vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(kv.len(), 1);
        assert_eq!(kv.bytes_used(), 32);
    }

    #[test]
    fn causal_rows_see_only_their_prefix() {
        let shape = KvShape { n_layers: 1, n_heads: 1, n_kv_heads: 1, head_dim: 2 };
        let mut kv = DenseKv::new(shape);
        kv.append(0, &[0.0, 0.0, 0.0, 0.0], &[1.0, 1.0, 3.0, 3.0]).unwrap();
        let mut out = vec![0.0; 4];
        kv.attend(0, &[0.0; 4], 2, &mut out).unwrap();
        // Row 0 sees token 0 only; row 1 averages both (equal scores).
        assert_eq!(out, vec![1.0, 1.0, 2.0, 2.0]);
        assert!(kv.attend(0, &[0.0; 6], 3, &mut [0.0; 6]).is_err());
        assert!(kv.append(1, &[0.0; 2], &[0.0; 2]).is_err());
        assert!(kv.append(0, &[0.0; 3], &[0.0; 3]).is_err());
    }
}
