//! Bit-width policy: the QAQ formulas, the ||Q||^2 tracker, the attention window, and
//! the [`KvPolicy`] enum with its string syntax.
//!
//! Both formulas use the step width `E = sqrt(12) * sigma_bound` (the quantization
//! step whose round-to-nearest error has std `sigma_bound`):
//! * keys:   `E_K = sqrt(12 / qn2 * ln(T^3/(T-1) * sigma_S^2 + 1))` (K-bound),
//! * values: `E_V = sqrt(12 / T) * sigma_X / a_t` (V-bound, `a_t` = window max),
//! * [`BitFormula::Paper`]: `B = ceil(log2(r / E))`;
//!   [`BitFormula::Reference`]: `B = ceil(log2(r / (2E) + 1))` (the "+1" and factor 2),
//!
//! then clamped to `[b_min, b_max]`. `qn2` is the squared norm of the query the softmax
//! sees, i.e. `||q||^2 / D` (the 1/sqrt(D) scaling kept), by default the online 90th
//! percentile per (layer, KV head), pooled over the query heads sharing the KV head.
//! Computation is in f64, so the reference code's fp16 rounding to 0 bits does not occur.
//! Degenerate cases: `T <= 1` (one key: softmax is exactly 1), `a_t = 0`, `r = 0` or any
//! NaN give `b_min`.

use crate::error::{KernelError, Result};
use crate::quant::{MAX_BITS, OutlierMode, Outliers, QuantSpec, Scheme};
use std::str::FromStr;

/// Which bit-count formula.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BitFormula {
    /// `ceil(log2(r / E))` (paper §4.1).
    #[default]
    Paper,
    /// `ceil(log2(r / (2E) + 1))` (reference implementation).
    Reference,
}

/// Key step width `E_K`; infinite for `t <= 1`.
pub fn key_step(t: usize, qn2: f64, sigma_s: f64) -> f64 {
    if t <= 1 {
        return f64::INFINITY;
    }
    let tf = t as f64;
    (12.0 / qn2 * (tf * tf * tf / (tf - 1.0) * sigma_s * sigma_s).ln_1p()).sqrt()
}

/// Value step width `E_V`; infinite for `a <= 0`.
#[inline]
pub fn value_step(t: usize, a: f64, sigma_x: f64) -> f64 {
    value_step_from(value_step_numerator(t, sigma_x), t, a)
}

/// `sqrt(12 / T) * sigma_X`, the part of [`value_step`] shared by all tokens of a step.
#[inline]
pub fn value_step_numerator(t: usize, sigma_x: f64) -> f64 {
    (12.0 / t as f64).sqrt() * sigma_x
}

/// [`value_step`] from its precomputed numerator (the same operations, so the same bits).
#[inline]
pub fn value_step_from(numerator: f64, t: usize, a: f64) -> f64 {
    if a <= 0.0 || t == 0 {
        return f64::INFINITY;
    }
    numerator / a
}

/// `x.log2().ceil()`, bit for bit, without the libm call in the common case: for a
/// normal positive `x = (1 + f) 2^E` with `1e-12 < f < 1 - 1e-12` the answer is `E + 1`
/// (log2 is then at least 1.4e-12 above `E` and 7.2e-13 below `E + 1`, far more than
/// the few-ulp (< 5e-13 for |E| <= 1023) error of any libm log2); everything else (powers
/// of two and their neighbours, zero, subnormals, inf, NaN, negatives) calls log2.
#[inline]
pub fn ceil_log2(x: f64) -> f64 {
    if x.is_normal() && x > 0.0 {
        let b = x.to_bits();
        let e = ((b >> 52) & 0x7ff) as i64 - 1023;
        let f = f64::from_bits((b & ((1u64 << 52) - 1)) | (1023u64 << 52)) - 1.0;
        if f > 1e-12 && f < 1.0 - 1e-12 {
            // ceil of a value in (-1, 0) is -0.0.
            return if e == -1 { -0.0 } else { (e + 1) as f64 };
        }
    }
    x.log2().ceil()
}

/// Unclamped bit count for range `r` and step `e` (may be negative; NaN -> i32::MIN).
#[inline]
pub fn raw_bits(r: f64, e: f64, formula: BitFormula) -> i32 {
    let v = match formula {
        BitFormula::Paper => ceil_log2(r / e),
        BitFormula::Reference => ceil_log2(r / (2.0 * e) + 1.0),
    };
    if v.is_nan() { i32::MIN } else { v.clamp(-1000.0, 1000.0) as i32 }
}

/// Clamped bit count.
#[inline]
pub fn bits(r: f64, e: f64, formula: BitFormula, b_min: u8, b_max: u8) -> u8 {
    raw_bits(r, e, formula).clamp(b_min as i32, b_max as i32) as u8
}

/// [`bits`]`(r, e, ..)` without a division, from `x`, an approximation of `r / e`
/// within a relative 1e-14 (such as `r * (1 / e)`, or `r * a * (1 / n)` for
/// `e = n / a`: a few roundings, below 1e-15), or `None` when `x` is too close to a
/// power of two (within a relative 2e-12, after the reference formula's `/ 2 + 1`) for
/// that to be certain, or not a positive normal number (the caller then calls [`bits`]).
///
/// Why it is exact: the log2 argument `y` that [`bits`] computes is then within a
/// relative 1e-14 of this function's `z` (`x`, or `x / 2 + 1`, whose own rounding adds
/// 2.2e-16), so `y` has `z`'s binary exponent `E` and a fraction in `(1e-12, 1 - 1e-12)`,
/// where [`ceil_log2`] answers `E + 1`, as this function does.
#[inline]
pub fn bits_near(x: f64, formula: BitFormula, b_min: u8, b_max: u8) -> Option<u8> {
    let z = match formula {
        BitFormula::Paper => x,
        BitFormula::Reference => x * 0.5 + 1.0,
    };
    if !(z.is_normal() && z > 0.0) {
        return None;
    }
    let b = z.to_bits();
    let e = ((b >> 52) & 0x7ff) as i32 - 1023;
    let f = f64::from_bits((b & ((1u64 << 52) - 1)) | (1023u64 << 52)) - 1.0;
    (f > 2e-12 && f < 1.0 - 2e-12).then(|| (e + 1).clamp(b_min as i32, b_max as i32) as u8)
}

/// Where ||Q||^2 comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum QNorm {
    /// Online percentile (0..=1, paper: 0.9) of observed `||q||^2 / D`.
    Percentile(f64),
    /// A constant (the reference code uses 300, in unscaled units).
    Constant(f64),
}

/// Online percentile of `||q||^2 / D` samples: a log-spaced histogram (1/16 octave
/// bins over 2^-24..2^24), so memory is fixed; the answer is the upper edge of the bin
/// holding the percentile (at most 4.4% above the exact sample value, i.e. conservative).
#[derive(Clone, Debug)]
pub struct QNormTracker {
    bins: Vec<u32>,
    n: u64,
}

const BINS_PER_OCTAVE: f64 = 16.0;
const LOG_MIN: f64 = -24.0;
const N_BINS: usize = 48 * 16;

impl Default for QNormTracker {
    fn default() -> Self {
        QNormTracker { bins: vec![0; N_BINS], n: 0 }
    }
}

impl QNormTracker {
    /// The histogram and the sample count (for [`crate::PolicyCache::snapshot`]).
    pub(crate) fn parts(&self) -> (&[u32], u64) {
        (&self.bins, self.n)
    }
    /// The inverse of [`QNormTracker::parts`]; `None` unless `bins` has the tracker's size.
    pub(crate) fn from_parts(bins: Vec<u32>, n: u64) -> Option<Self> {
        (bins.len() == N_BINS).then_some(QNormTracker { bins, n })
    }
    /// Records one sample (non-finite or non-positive samples are ignored).
    pub fn observe(&mut self, v: f64) {
        if !(v.is_finite() && v > 0.0) {
            return;
        }
        let i = ((v.log2() - LOG_MIN) * BINS_PER_OCTAVE).floor().clamp(0.0, (N_BINS - 1) as f64) as usize;
        self.bins[i] += 1;
        self.n += 1;
    }
    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.n
    }
    /// The `p`-quantile (upper bin edge), or `None` without samples.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let want = ((p.clamp(0.0, 1.0) * self.n as f64).ceil() as u64).max(1);
        let mut acc = 0u64;
        for (i, &c) in self.bins.iter().enumerate() {
            acc += c as u64;
            if acc >= want {
                return Some(2f64.powf(LOG_MIN + (i + 1) as f64 / BINS_PER_OCTAVE));
            }
        }
        None
    }
}

/// Where a token moving *down* is re-encoded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DownSource {
    /// From the current codes (cheap; exact nesting for the midpoint scheme).
    #[default]
    Codes,
    /// From the fp16 host backup when present (else from the codes).
    Backup,
}

/// Which rows of a multi-row step (a prefill chunk) feed the attention windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PrefillFeed {
    /// The last `window` rows, one observation each (the reference code's
    /// "last n prompt rows").
    #[default]
    Last,
    /// As `Last`, and the oldest of those observations is raised to the
    /// chunk's other rows' attention, each row's probability scaled by
    /// `sqrt(T_row / T)` (the V-bound's `sqrt(T) * S` at that row's length), so
    /// a token that any query of the chunk attended to keeps its width.
    All,
}

/// QAQ hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QaqParams {
    /// sigma_S max (key target).
    pub sigma_s: f64,
    /// sigma_X max (value target).
    pub sigma_x: f64,
    /// Minimum width (0..=8).
    pub b_min: u8,
    /// Maximum width (b_min..=8); new tokens are stored at this width.
    pub b_max: u8,
    /// Attention window n (>= 1).
    pub window: usize,
    /// Bit formula.
    pub formula: BitFormula,
    /// ||Q||^2 source.
    pub qnorm: QNorm,
    /// Quantizer.
    pub quant: QuantSpec,
    /// Source for moving down.
    pub down: DownSource,
    /// Re-quantize every `every` steps (>= 1).
    pub every: u32,
    /// Window feeding in multi-row steps.
    pub prefill: PrefillFeed,
    /// Outlier fraction of the values when it differs from the keys' (`quant.outliers`);
    /// `None`: the same. Values tolerate coarse widths better than keys, and at head_dim
    /// 64 two outliers cost 0.75 bits per value, so dropping them is a real saving.
    pub v_alpha: Option<f64>,
    /// A floor on the `T` of the key bound (0: none, the paper). The paper's allowed
    /// attention-logit error variance `ln(T^3/(T-1) sigma_S^2 + 1)` is tiny on a
    /// 50-token prompt for any sigma_S that is safe at 2k tokens, so short prompts keep
    /// their keys at 8 bits; with `k_t`, contexts shorter than `k_t` get the bound at
    /// `T = k_t` and longer ones the paper's.
    pub k_t: usize,
    /// A ceiling on the `T` of the key bound (0: none, the paper). The paper's bound
    /// assumes attention spread evenly over all `T` tokens, so it loosens without limit
    /// as the context grows (about 0.7 bits fewer per key from 2k to 8k tokens), while
    /// real attention stays concentrated on few tokens; with `k_tmax`, contexts longer
    /// than `k_tmax` keep the bound at `T = k_tmax`.
    pub k_tmax: usize,
    /// The first `sinks` tokens (attention sinks) stay at `b_max` (0: none).
    pub sinks: usize,
    /// Per-channel key scaling exponent `beta` in [0, 1] (0: off). Keys are stored as
    /// `k_c / s_c` and queries multiplied by `s_c` (so `q . k` is unchanged), with
    /// `s_c = max_t |k_tc|^beta` over the first rows a layer receives (the prompt),
    /// normalised to RMS 1; per-token groups then see channels of similar range instead
    /// of a few massive channels that set every token's step.
    pub k_scale: f64,
    /// Whether keys wait for a full attention window before leaving `b_max` (the
    /// reference code's rule, `true`). The key bound uses no attention (only `T` and
    /// ||Q||^2), so with `false` a key gets its bound's width in the step it arrives;
    /// values still wait for their window. Measured (`docs/results`, stop 12): `false`
    /// stores 3–4% fewer bytes on short prompts at the same agreement, and changes
    /// nothing measurable at 2k–8k (perplexity, passkeys).
    pub k_window: bool,
    /// Keys and values stored rotated (`+rot`, see [`crate::cache::Rotation`]).
    pub rotate: bool,
}

impl Default for QaqParams {
    fn default() -> Self {
        QaqParams {
            sigma_s: 0.01,
            sigma_x: 0.01,
            b_min: 0,
            b_max: 8,
            window: 5,
            formula: BitFormula::Paper,
            qnorm: QNorm::Percentile(0.9),
            quant: QuantSpec::default(),
            down: DownSource::Codes,
            every: 1,
            prefill: PrefillFeed::Last,
            v_alpha: None,
            k_t: 0,
            k_tmax: 0,
            sinks: 0,
            k_scale: 0.0,
            k_window: true,
            rotate: false,
        }
    }
}

impl QaqParams {
    /// The reference implementation's behaviour: "+1" formula, mean-centred grid,
    /// q_norm = 300 constant.
    pub fn reference_code() -> Self {
        QaqParams {
            formula: BitFormula::Reference,
            qnorm: QNorm::Constant(300.0),
            quant: QuantSpec { scheme: Scheme::MeanCentred, outliers: Outliers::PAPER },
            ..Default::default()
        }
    }
    /// qaq's tuned setting (`qaq-tuned`, the worker's default until wave 2), measured in
    /// `docs/results`: the paper's method with per-channel key scaling (`kscale=1`), the
    /// key bound's `T` held within [512, 2048] (`kt=512,ktmax=2048`), keys at their
    /// bound's width from the step they arrive (`kwin=0`), `sigma_S = 0.001`,
    /// `sigma_X = 0.03`, and values kept at 1 bit or more (`bmin=1`). Stop 12's ceiling
    /// of 1024 held 8k perplexity better but lost a third of the 4k passkeys (61/100
    /// against fp16's 95/100); 2048 keeps them (33 of 34 where fp16 solves 31).
    pub fn tuned() -> Self {
        QaqParams {
            sigma_s: 0.001,
            sigma_x: 0.03,
            b_min: 1,
            k_scale: 1.0,
            k_t: 512,
            k_tmax: 2048,
            k_window: false,
            ..Default::default()
        }
    }
    /// The quantizer of the values (the keys use `quant`).
    pub fn value_quant(&self) -> QuantSpec {
        let mut q = self.quant;
        if let Some(a) = self.v_alpha {
            q.outliers.alpha = a;
        }
        q
    }
    /// The key step width in a context of `t_total` tokens: [`key_step`] at
    /// `T = max(t_total, k_t)`, then at most `k_tmax` (when set); infinite for one token
    /// (its softmax is exactly 1).
    pub fn key_step_for(&self, t_total: usize, qn2: f64) -> f64 {
        if t_total <= 1 {
            return f64::INFINITY;
        }
        let t = t_total.max(self.k_t);
        key_step(if self.k_tmax > 0 { t.min(self.k_tmax) } else { t }, qn2, self.sigma_s)
    }
    /// Validates ranges.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(KernelError::Config(m));
        if self.b_min > self.b_max || self.b_max > MAX_BITS {
            return bad(format!("need 0 <= b_min <= b_max <= 8, got {}..={}", self.b_min, self.b_max));
        }
        if self.window == 0 || self.every == 0 {
            return bad("window and every must be >= 1".into());
        }
        if !(self.sigma_s > 0.0 && self.sigma_x > 0.0 && self.sigma_s.is_finite() && self.sigma_x.is_finite()) {
            return bad("sigma_s and sigma_x must be positive".into());
        }
        if !(0.0..0.5).contains(&self.quant.outliers.alpha) {
            return bad(format!("alpha must be in [0, 0.5), got {}", self.quant.outliers.alpha));
        }
        if let Some(a) = self.v_alpha
            && !(0.0..0.5).contains(&a)
        {
            return bad(format!("valpha must be in [0, 0.5), got {a}"));
        }
        if !(0.0..=1.0).contains(&self.k_scale) {
            return bad(format!("kscale must be in [0, 1], got {}", self.k_scale));
        }
        if self.k_t == 1 {
            return bad("kt must be 0 (no floor) or >= 2".into());
        }
        if self.k_tmax != 0 && self.k_tmax < self.k_t.max(2) {
            return bad(format!("ktmax must be 0 (no ceiling) or >= max(kt, 2) = {}", self.k_t.max(2)));
        }
        match self.qnorm {
            QNorm::Percentile(p) if (0.0..=1.0).contains(&p) => Ok(()),
            QNorm::Constant(c) if c > 0.0 && c.is_finite() => Ok(()),
            _ => bad("qnorm: percentile in [0,1] or a positive constant".into()),
        }
    }
}

/// Per-side mode of a uniform baseline: fp16 or a fixed width.
#[derive(Clone, Copy, PartialEq, Default)]
pub struct UniformSpec {
    /// Key width (`None` = fp16).
    pub k_bits: Option<u8>,
    /// Value width (`None` = fp16).
    pub v_bits: Option<u8>,
    /// Keep 1% outliers exact (the paper's "non-attention quantization").
    pub outliers: bool,
    /// Keys and values stored rotated (`+rot`, see [`crate::cache::Rotation`]).
    pub rotate: bool,
    /// The `recent` most recent tokens stay in fp16; a token leaving that window is
    /// encoded at the widths above from its fp16 value (`recent=N`; 0: none).
    pub recent: usize,
    /// The first `sinks` tokens (attention sinks) stay in fp16 (`sinks=N`; 0: none).
    pub sinks: usize,
}

/// Written as before the fp16 windows existed when they are off, so that stored
/// results and snapshots, which name a policy by its `Debug` form, keep matching.
impl std::fmt::Debug for UniformSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("UniformSpec");
        d.field("k_bits", &self.k_bits)
            .field("v_bits", &self.v_bits)
            .field("outliers", &self.outliers)
            .field("rotate", &self.rotate);
        if self.recent != 0 || self.sinks != 0 {
            d.field("recent", &self.recent).field("sinks", &self.sinks);
        }
        d.finish()
    }
}

/// The largest `recent` / `sinks` a policy string may ask for (tokens).
pub const MAX_FP16_WINDOW: usize = 1 << 20;

/// KIVI-style baseline: keys per channel over groups of `group` tokens, values per token,
/// the `residual` most recent tokens in fp16.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KiviSpec {
    /// Width for both (KIVI: 2).
    pub bits: u8,
    /// Key channel group G (tokens).
    pub group: usize,
    /// fp16 residual window R (tokens).
    pub residual: usize,
    /// Keys and values stored rotated (`+rot`, see [`crate::cache::Rotation`]).
    pub rotate: bool,
}

impl Default for KiviSpec {
    fn default() -> Self {
        KiviSpec { bits: 2, group: 32, residual: 128, rotate: false }
    }
}

/// What the cache does with K/V.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvPolicy {
    /// No quantization.
    Fp16,
    /// Uniform width per token (K-only / V-only when one side is `None`).
    Uniform(UniformSpec),
    /// KIVI-style.
    Kivi(KiviSpec),
    /// QAQ.
    Qaq(QaqParams),
}

impl KvPolicy {
    /// Whether keys and values are stored rotated (`+rot`).
    pub fn rotated(&self) -> bool {
        match self {
            KvPolicy::Fp16 => false,
            KvPolicy::Uniform(u) => u.rotate,
            KvPolicy::Kivi(k) => k.rotate,
            KvPolicy::Qaq(p) => p.rotate,
        }
    }

    /// The same policy with keys and values stored rotated (fp16 stays as it is).
    pub fn with_rotation(self) -> Self {
        match self {
            KvPolicy::Fp16 => KvPolicy::Fp16,
            KvPolicy::Uniform(u) => KvPolicy::Uniform(UniformSpec { rotate: true, ..u }),
            KvPolicy::Kivi(k) => KvPolicy::Kivi(KiviSpec { rotate: true, ..k }),
            KvPolicy::Qaq(p) => KvPolicy::Qaq(QaqParams { rotate: true, ..p }),
        }
    }
}

/// The accepted policy strings (shown in parse errors).
pub const POLICY_SYNTAX: &str = "fp16 | uniform:N[:noout][:recent=R][:sinks=S] | uniform:K/V[:noout][:recent=R][:sinks=S] | uniform-k:N | uniform-v:N | kivi[:G:R[:BITS]] | \
qaq[:key=value,...] | qaq-tuned[:key=value,...] (keys: sigma_s, sigma_x, bmin, bmax, window, alpha, valpha, outliers=total|perside, \
formula=paper|code, quant=midpoint|mean, qnorm=p90|pNN|<constant>, down=codes|backup, every, \
prefill=last|all, kt, ktmax, sinks, kscale, kwin=0|1) | qaq-ref (reference-code variant); qaq starts from the paper's constants, qaq-tuned from \
sigma_s=0.001,sigma_x=0.03,bmin=1,kscale=1,kt=512,ktmax=2048,kwin=0; N in 0..=8; uniform's recent=R and sinks=S keep \
the R most recent and the S first tokens in fp16; any but fp16 may end in +rot \
(keys and values stored rotated by a fixed randomized Hadamard transform)";

impl FromStr for KvPolicy {
    type Err = KernelError;
    fn from_str(s: &str) -> Result<Self> {
        let err = |reason: String| KernelError::Policy { input: s.to_string(), reason, accepted: POLICY_SYNTAX };
        let width = |t: &str| -> Result<u8> {
            match t.parse::<u8>() {
                Ok(n) if n <= MAX_BITS => Ok(n),
                _ => Err(err(format!("bad width {t:?}"))),
            }
        };
        let num = |t: &str| t.parse::<f64>().map_err(|_| err(format!("bad number {t:?}")));
        let int = |t: &str| t.parse::<usize>().map_err(|_| err(format!("bad integer {t:?}")));
        let lower = s.trim().to_ascii_lowercase();
        let (lower, rotate) = match lower.strip_suffix("+rot") {
            Some(base) => (base.to_string(), true),
            None => (lower, false),
        };
        let parts: Vec<&str> = lower.splitn(2, ':').collect();
        let (head, rest) = (parts[0], parts.get(1).copied());
        let pol = match (head, rest) {
            ("fp16", None) => KvPolicy::Fp16,
            ("uniform", Some(r)) => {
                let mut it = r.split(':');
                // N, or K/V: keys at K bits, values at V.
                let (k, v) = match it.next().unwrap_or("").split_once('/') {
                    Some((k, v)) => (width(k)?, width(v)?),
                    None => {
                        let n = width(r.split(':').next().unwrap_or(""))?;
                        (n, n)
                    }
                };
                let mut u = UniformSpec { k_bits: Some(k), v_bits: Some(v), outliers: true, ..Default::default() };
                let window = |v: &str| -> Result<usize> {
                    match int(v)? {
                        n if n <= MAX_FP16_WINDOW => Ok(n),
                        n => Err(err(format!("{n} tokens: at most {MAX_FP16_WINDOW}"))),
                    }
                };
                for o in it {
                    match o.split_once('=') {
                        None if o == "noout" => u.outliers = false,
                        Some(("recent", v)) => u.recent = window(v)?,
                        Some(("sinks", v)) => u.sinks = window(v)?,
                        _ => return Err(err(format!("unknown uniform option {o:?} (noout, recent=N, sinks=N)"))),
                    }
                }
                KvPolicy::Uniform(u)
            }
            ("uniform-k", Some(r)) => KvPolicy::Uniform(UniformSpec {
                k_bits: Some(width(r)?),
                v_bits: None,
                outliers: true,
                ..Default::default()
            }),
            ("uniform-v", Some(r)) => KvPolicy::Uniform(UniformSpec {
                k_bits: None,
                v_bits: Some(width(r)?),
                outliers: true,
                ..Default::default()
            }),
            ("kivi", r) => {
                let mut k = KiviSpec::default();
                if let Some(r) = r {
                    let v: Vec<&str> = r.split(':').collect();
                    if v.len() < 2 || v.len() > 3 {
                        return Err(err("kivi takes G:R or G:R:BITS".into()));
                    }
                    k.group = int(v[0])?;
                    k.residual = int(v[1])?;
                    if let Some(b) = v.get(2) {
                        k.bits = width(b)?;
                    }
                }
                if k.group == 0 {
                    return Err(err("kivi group must be >= 1".into()));
                }
                KvPolicy::Kivi(k)
            }
            ("qaq-ref", None) => KvPolicy::Qaq(QaqParams::reference_code()),
            ("qaq" | "qaq-tuned", r) => {
                let mut p = if head == "qaq" { QaqParams::default() } else { QaqParams::tuned() };
                for kv in r.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
                    let Some((k, v)) = kv.split_once('=') else {
                        return Err(err(format!("expected key=value, got {kv:?}")));
                    };
                    match k {
                        "sigma_s" => p.sigma_s = num(v)?,
                        "sigma_x" => p.sigma_x = num(v)?,
                        "bmin" => p.b_min = width(v)?,
                        "bmax" => p.b_max = width(v)?,
                        "window" => p.window = int(v)?,
                        "every" => p.every = int(v)?.try_into().map_err(|_| err("every too large".into()))?,
                        "alpha" => p.quant.outliers.alpha = num(v)?,
                        "valpha" => p.v_alpha = Some(num(v)?),
                        "kt" => p.k_t = int(v)?,
                        "ktmax" => p.k_tmax = int(v)?,
                        "sinks" => p.sinks = int(v)?,
                        "kscale" => p.k_scale = num(v)?,
                        "kwin" => {
                            p.k_window = match v {
                                "1" => true,
                                "0" => false,
                                _ => return Err(err(format!("kwin={v:?}: 0 or 1"))),
                            }
                        }
                        "outliers" => {
                            p.quant.outliers.mode = match v {
                                "total" => OutlierMode::Total,
                                "perside" => OutlierMode::PerSide,
                                _ => return Err(err(format!("outliers={v:?}"))),
                            }
                        }
                        "formula" => {
                            p.formula = match v {
                                "paper" => BitFormula::Paper,
                                "code" => BitFormula::Reference,
                                _ => return Err(err(format!("formula={v:?}"))),
                            }
                        }
                        "quant" => {
                            p.quant.scheme = match v {
                                "midpoint" => Scheme::Midpoint,
                                "mean" => Scheme::MeanCentred,
                                _ => return Err(err(format!("quant={v:?}"))),
                            }
                        }
                        "prefill" => {
                            p.prefill = match v {
                                "last" => PrefillFeed::Last,
                                "all" => PrefillFeed::All,
                                _ => return Err(err(format!("prefill={v:?}"))),
                            }
                        }
                        "down" => {
                            p.down = match v {
                                "codes" => DownSource::Codes,
                                "backup" => DownSource::Backup,
                                _ => return Err(err(format!("down={v:?}"))),
                            }
                        }
                        "qnorm" => {
                            p.qnorm = match v.strip_prefix('p') {
                                Some(pc) => QNorm::Percentile(num(pc)? / 100.0),
                                None => QNorm::Constant(num(v)?),
                            }
                        }
                        _ => return Err(err(format!("unknown qaq key {k:?}"))),
                    }
                }
                p.validate().map_err(|e| err(e.to_string()))?;
                KvPolicy::Qaq(p)
            }
            _ => return Err(err("unknown policy".into())),
        };
        if rotate {
            return match pol {
                KvPolicy::Fp16 => Err(err("+rot rotates what a policy quantizes; fp16 quantizes nothing".into())),
                p => Ok(p.with_rotation()),
            };
        }
        Ok(pol)
    }
}

/// Attention windows of one (layer, KV head): for every token, a ring of the last `n`
/// observed probabilities (max over the query heads sharing the KV head).
///
/// Stored slot-major (slot `s` of every token in one row), so that a pass over all
/// tokens reads and writes each row in order.
#[derive(Clone, Debug)]
pub struct Windows {
    n: usize,
    /// `rows[s][t]`: slot `s` of token `t`'s ring.
    rows: Vec<Vec<f32>>,
    seen: Vec<u32>,
    /// `seen % n` per token: the slot of the next push (kept, so a push divides nothing).
    pos: Vec<u32>,
}

impl Windows {
    /// Windows of length `n`.
    pub fn new(n: usize) -> Self {
        let n = n.max(1);
        Windows { n, rows: vec![Vec::new(); n], seen: Vec::new(), pos: Vec::new() }
    }
    /// Window length, every token's ring (token-major: token `t`'s slots at
    /// `t * n .. (t + 1) * n`) and observation count (for snapshots).
    pub(crate) fn parts(&self) -> (usize, Vec<f32>, &[u32]) {
        let vals = (0..self.seen.len()).flat_map(|t| self.rows.iter().map(move |r| r[t])).collect();
        (self.n, vals, &self.seen)
    }
    /// The inverse of [`Windows::parts`]; `None` when the lengths disagree.
    pub(crate) fn from_parts(n: usize, vals: Vec<f32>, seen: Vec<u32>) -> Option<Self> {
        if n == 0 || vals.len() != seen.len() * n {
            return None;
        }
        let rows = (0..n).map(|s| vals.iter().skip(s).step_by(n).copied().collect()).collect();
        let pos = seen.iter().map(|&c| (c as usize % n) as u32).collect();
        Some(Windows { n, rows, seen, pos })
    }
    /// Makes room for `t` tokens.
    pub fn grow(&mut self, t: usize) {
        for r in &mut self.rows {
            r.resize(t, 0.0);
        }
        self.seen.resize(t, 0);
        self.pos.resize(t, 0);
    }
    /// Pushes probability `p` for token `t` (into the slot `seen % n`; the count
    /// saturates, and with it the slot).
    #[inline]
    pub fn push(&mut self, t: usize, p: f32) {
        let slot = self.pos[t] as usize;
        self.rows[slot][t] = p;
        if self.seen[t] != u32::MAX {
            self.seen[t] += 1;
            self.pos[t] = if slot + 1 == self.n { 0 } else { slot as u32 + 1 };
        }
    }
    /// [`Windows::push`], then whether token `t`'s window is full and the maximum of its
    /// window as a width decision reads it: [`Windows::max`], except that where
    /// `f32::max` may pick either zero of a tie of +0 and -0, this picks the first seen
    /// (a width reads any zero alike).
    #[inline]
    pub(crate) fn push_full_max(&mut self, t: usize, p: f32) -> (bool, f32) {
        self.push(t, p);
        let mut m = 0f32;
        for r in &self.rows {
            let v = r[t];
            m = if v > m { v } else { m };
        }
        (self.seen[t] as usize >= self.n, m)
    }
    /// Whether token `t` has `n` observations.
    pub fn full(&self, t: usize) -> bool {
        self.seen.get(t).is_some_and(|&s| s as usize >= self.n)
    }
    /// Max over the window of token `t` (over what has been observed).
    pub fn max(&self, t: usize) -> f32 {
        self.rows.iter().map(|r| r[t]).fold(0.0, f32::max)
    }
    /// Number of tokens tracked.
    pub fn len(&self) -> usize {
        self.seen.len()
    }
    /// Whether no token is tracked.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
    /// The rows, counts and next slots, for a pass over every token
    /// ([`crate::simd::window_pass`]).
    pub(crate) fn raw_mut(&mut self) -> (&mut [Vec<f32>], &mut [u32], &mut [u32]) {
        (&mut self.rows, &mut self.seen, &mut self.pos)
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
