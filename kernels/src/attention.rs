//! Attention of the query heads of one KV head over stored keys and values, computed
//! group by group from the packed codes (never materialising an fp32 cache), plus the
//! dense f32 / f16 references used by tests and benchmarks. The kernels are in
//! [`crate::simd`] (portable and fused x86 versions); this module is their API over the
//! key stores.
//!
//! For a quantized group `x_hat = base + c * s` (outliers: exact value at code 0), so
//! `q . x_hat = base * sum(q) + s * (q . c) + sum_outliers q_i (v_i - base)`, and the value
//! side accumulates `p * s * c` per group plus one scalar `p * base` per query head.
//! Queries passed in are already scaled by `1/sqrt(D)`.

use crate::kivi::KiviKeys;
use crate::simd;
use crate::store::{Bytes, PackedStream};
use std::ops::Range;

/// Key storage of one (layer, KV head).
#[derive(Clone, Debug)]
pub enum KStore {
    /// Per-token groups (QAQ, uniform, fp16).
    Packed(PackedStream),
    /// KIVI per-channel keys.
    Kivi(KiviKeys),
}

impl KStore {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        match self {
            KStore::Packed(s) => s.len(),
            KStore::Kivi(k) => k.len(),
        }
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Decodes token `t`.
    pub fn decode(&self, t: usize, out: &mut [f32]) -> bool {
        match self {
            KStore::Packed(s) => s.decode(t, out),
            KStore::Kivi(k) => k.decode(t, out),
        }
    }
    /// Byte accounting.
    pub fn bytes(&self) -> Bytes {
        match self {
            KStore::Packed(s) => s.bytes(),
            KStore::Kivi(k) => k.bytes(),
        }
    }
}

/// Scores `scores[j * T + t] = q_j . k_hat_t` for the `g` queries in `qs` (`g * d`),
/// portable path.
pub fn scores(k: &KStore, qs: &[f32], g: usize, scores: &mut [f32]) {
    match k {
        KStore::Kivi(kk) => kk.scores(qs, g, scores),
        KStore::Packed(s) => simd::portable::packed_scores(s.view(), qs, g, scores),
    }
}

/// In-place softmax of each of the `g` rows of length `t` in `x` (portable path).
pub fn softmax_rows(x: &mut [f32], g: usize, t: usize) {
    simd::portable::softmax_rows(x, g, t)
}

/// `out[j * d ..] = sum_t probs[j * T + t] * v_hat_t` for `g` query heads (portable
/// path).
pub fn weighted_values(v: &PackedStream, probs: &[f32], g: usize, out: &mut [f32]) {
    simd::portable::weighted_values(v.view(), probs, g, out)
}

/// Full attention of `g` query heads over packed K/V: writes `out` (`g * d`) and
/// `probs` (`g * T`). Uses the fused AVX2 kernels when the CPU has them (see
/// [`crate::simd`]), else [`attend_packed_reference`].
pub fn attend_packed(k: &KStore, v: &PackedStream, qs: &[f32], g: usize, out: &mut [f32], probs: &mut [f32]) {
    let keys = match k {
        KStore::Packed(s) => Some(s.view()),
        KStore::Kivi(kk) => {
            kk.scores(qs, g, probs);
            None
        }
    };
    simd::attend_packed(keys, v.view(), qs, g, out, probs)
}

/// The first half of [`attend_packed`]: the probabilities (`probs`, `g * T`) of `g`
/// query heads over the `t` keys of `k`.
pub fn attend_probs(k: &KStore, qs: &[f32], g: usize, t: usize, probs: &mut [f32]) {
    let keys = match k {
        KStore::Packed(s) => Some(s.view()),
        KStore::Kivi(kk) => {
            kk.scores(qs, g, probs);
            None
        }
    };
    simd::attend_probs(keys, qs, g, t, probs)
}

/// The second half of [`attend_packed`]: `out` (`g * d`) from the probabilities.
pub fn attend_values(v: &PackedStream, probs: &[f32], g: usize, out: &mut [f32]) {
    simd::attend_values(v.view(), probs, g, out)
}

/// The scores (before the softmax) of `g` query heads over the `n` keys of blocks
/// `blocks` of `k`: `scores`, `g * n`, row `j` for head `j`. Each is the score
/// [`attend_probs`] computes for that token.
pub(crate) fn block_scores(k: &PackedStream, blocks: Range<usize>, qs: &[f32], g: usize, scores: &mut [f32]) {
    simd::packed_scores(k.view_blocks(blocks), qs, g, scores)
}

/// The share of the tokens of blocks `blocks` of `v` in [`attend_values`]: `out`
/// (`g * d`) from their probabilities `probs` (`g * n`, row `j` for head `j`). Over all
/// the blocks it is `attend_values` itself.
pub(crate) fn block_values(v: &PackedStream, blocks: Range<usize>, probs: &[f32], g: usize, out: &mut [f32]) {
    simd::attend_values(v.view_blocks(blocks), probs, g, out)
}

/// The portable path of [`attend_packed`] (also the reference its SIMD path is tested
/// against).
pub fn attend_packed_reference(k: &KStore, v: &PackedStream, qs: &[f32], g: usize, out: &mut [f32], probs: &mut [f32]) {
    let t = v.len();
    scores(k, qs, g, probs);
    softmax_rows(probs, g, t);
    weighted_values(v, probs, g, out);
}

/// Reference attention over a dense f32 cache (`k`, `v`: `T * d`, token-major).
pub fn attend_dense_f32(k: &[f32], v: &[f32], d: usize, qs: &[f32], g: usize, out: &mut [f32], probs: &mut [f32]) {
    let t_total = k.len() / d;
    for (t, kr) in k.chunks_exact(d).enumerate() {
        for j in 0..g {
            probs[j * t_total + t] = simd::dot(&qs[j * d..(j + 1) * d], kr);
        }
    }
    softmax_rows(probs, g, t_total);
    out[..g * d].fill(0.0);
    for (t, vr) in v.chunks_exact(d).enumerate() {
        for j in 0..g {
            simd::axpy(&mut out[j * d..(j + 1) * d], probs[j * t_total + t], vr);
        }
    }
}

/// Exact causal attention of several query rows over a dense f32 cache. Where the level
/// has register tiles for the head dim ([`simd::dense_scores`], [`simd::dense_values`]:
/// AVX-512), each row's scores and its weighted values are [`attend_dense_f32`]'s bit
/// for bit, the rows sharing their loads, and the softmax between them is the level's
/// vectorized one (as in decode attention; the portable one's serial sum and scalar exp
/// would cost as much as the rest); elsewhere the rows are [`attend_dense_f32`]'s. Row `r` of the batch `qs` (`[r][g][d]`) is attended
/// when it is in `rows`, over the first `tvs[n]` tokens of `k` and `v` for `r =
/// rows[n]`; its `g * tv` probabilities go to `probs[r * g * stride..]` (laid out as
/// `attend_dense_f32` lays them, `[g][tv]`), its output to `out[n * g * d..][..g * d]`.
#[allow(clippy::too_many_arguments)]
pub fn attend_dense_rows(
    k: &[f32],
    v: &[f32],
    d: usize,
    qs: &[f32],
    g: usize,
    (rows, tvs): (&[usize], &[usize]),
    stride: usize,
    out: &mut [f32],
    probs: &mut [f32],
) {
    assert!(rows.len() == tvs.len() && out.len() >= rows.len() * g * d);
    assert!(rows.iter().zip(tvs).all(|(&r, &tv)| tv <= stride && (r + 1) * g * d <= qs.len()));
    let q: Vec<f32> = rows.iter().flat_map(|&r| qs[r * g * d..(r + 1) * g * d].iter().copied()).collect();
    let lens: Vec<usize> = tvs.iter().flat_map(|&tv| std::iter::repeat_n(tv, g)).collect();
    let offs: Vec<usize> =
        rows.iter().zip(tvs).flat_map(|(&r, &tv)| (0..g).map(move |j| r * g * stride + j * tv)).collect();
    if simd::dense_scores(k, d, &q, &lens, &offs, probs) {
        for (&r, &tv) in rows.iter().zip(tvs) {
            simd::softmax_rows(&mut probs[r * g * stride..r * g * stride + g * tv], g, tv);
        }
        if simd::dense_values(v, d, probs, &lens, &offs, out) {
            return;
        }
    }
    for (n, (&r, &tv)) in rows.iter().zip(tvs).enumerate() {
        let (o, p) = (&mut out[n * g * d..(n + 1) * g * d], &mut probs[r * g * stride..r * g * stride + g * tv]);
        attend_dense_f32(&k[..tv * d], &v[..tv * d], d, &q[n * g * d..(n + 1) * g * d], g, o, p);
    }
}

/// Reference attention over a dense fp16 cache (little-endian f16 bytes, token-major).
pub fn attend_dense_f16(k: &[u8], v: &[u8], d: usize, qs: &[f32], g: usize, out: &mut [f32], probs: &mut [f32]) {
    let t_total = k.len() / (2 * d);
    let mut tmp = vec![0f32; d];
    for (t, kr) in k.chunks_exact(2 * d).enumerate() {
        simd::f16_bytes_to_f32(kr, &mut tmp);
        for j in 0..g {
            probs[j * t_total + t] = simd::dot(&qs[j * d..(j + 1) * d], &tmp);
        }
    }
    softmax_rows(probs, g, t_total);
    out[..g * d].fill(0.0);
    for (t, vr) in v.chunks_exact(2 * d).enumerate() {
        simd::f16_bytes_to_f32(vr, &mut tmp);
        for j in 0..g {
            simd::axpy(&mut out[j * d..(j + 1) * d], probs[j * t_total + t], &tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{QuantSpec, RAW};

    /// The fused SIMD path (taken by `attend_packed` on AVX2 machines) against the
    /// portable reference: every width, raw groups, outliers, both schemes, GQA group
    /// sizes 1..=5, head dims with and without a 32-value remainder, KIVI keys.
    #[test]
    fn simd_attention_matches_reference() {
        use crate::kivi::KiviKeys;
        use crate::quant::{OutlierMode, Outliers, Scheme};
        let mut rng = crate::testutil::Rng(12345);
        let mut rnd = move || rng.f();
        for d in [8usize, 24, 64, 72, 128] {
            for (scheme, alpha) in [
                (Scheme::Midpoint, 0.01),
                (Scheme::Midpoint, 0.0),
                (Scheme::Midpoint, 0.05),
                (Scheme::MeanCentred, 0.01),
            ] {
                let spec = QuantSpec { scheme, outliers: Outliers { alpha, mode: OutlierMode::Total } };
                let n = 150;
                let mut ks = PackedStream::new(d, spec, false);
                let mut vs = PackedStream::new(d, spec, false);
                let mut kv = KiviKeys::new(d, 2, 16, 8);
                for t in 0..n {
                    let row: Vec<f32> = (0..d).map(|_| half::f16::from_f32(rnd() * 3.0).to_f32()).collect();
                    ks.push(&row, [0u8, 1, 2, 3, 4, 5, 6, 7, 8, RAW][t % 10]).unwrap();
                    kv.push(&row).unwrap();
                    let vrow: Vec<f32> = row.iter().map(|x| half::f16::from_f32(x * 0.7 - 0.1).to_f32()).collect();
                    vs.push(&vrow, [3u8, RAW, 0, 8, 1, 5, 2][t % 7]).unwrap();
                }
                for keys in [KStore::Packed(ks.clone()), KStore::Kivi(kv.clone())] {
                    for g in 1..=5 {
                        let qs: Vec<f32> = (0..g * d).map(|_| rnd() * 0.5).collect();
                        let (mut o1, mut p1) = (vec![0f32; g * d], vec![0f32; g * n]);
                        let (mut o2, mut p2) = (vec![0f32; g * d], vec![0f32; g * n]);
                        attend_packed(&keys, &vs, &qs, g, &mut o1, &mut p1);
                        attend_packed_reference(&keys, &vs, &qs, g, &mut o2, &mut p2);
                        let norm = o2.iter().map(|x| x * x).sum::<f32>().sqrt();
                        let diff = o1.iter().zip(&o2).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
                        assert!(diff <= 1e-5 * norm, "d {d} g {g} {spec:?}: rel {}", diff / norm);
                        for (a, b) in p1.iter().zip(&p2) {
                            assert!((a - b).abs() <= 1e-5 * b.abs().max(1e-4), "d {d} g {g}: {a} vs {b}");
                        }
                    }
                }
            }
        }
    }

    /// Blocks whose groups are all quantized (one width per block, or every width in
    /// turn), with and without outliers, at every head dim the AVX-512 kernels take
    /// (64 to 256) and 1..=6 query heads: against the portable reference. On CPUs with
    /// AVX512_VNNI the blocks of one width take the 16-bit integer value tiles, whose
    /// weights are rounded to 16 bits against each block's largest, so a sharp peak sets
    /// the step of the block's other weights: their outputs are held to 4e-4 of the
    /// output's norm (measured: 0.4e-4 to 2.5e-4 here; the values themselves are stored
    /// to 1-8 bits), the f32 paths to 1e-5. The probabilities are f32 on the other
    /// paths (to 3e-5: at head dim 256 a score sums 256 products); with AVX512_VNNI the
    /// scores are 16-bit integer products against queries rounded to 16 bits (an error
    /// of `max|q| / 65534` per channel), and the probabilities are held to 1e-3
    /// (measured: at most 5.4e-4, at head dim 256 with 8-bit codes).
    #[test]
    fn quantized_blocks_match_reference_at_every_wide_head_dim() {
        use crate::quant::{OutlierMode, Outliers, Scheme};
        let mut rng = crate::testutil::Rng(777);
        let mut rnd = move || rng.f();
        for d in [64usize, 128, 192, 256] {
            for alpha in [0.0, 0.02] {
                for mixed in [false, true] {
                    let spec =
                        QuantSpec { scheme: Scheme::Midpoint, outliers: Outliers { alpha, mode: OutlierMode::Total } };
                    let n = 64 * 3 + 17;
                    let (mut ks, mut vs) = (PackedStream::new(d, spec, false), PackedStream::new(d, spec, false));
                    for t in 0..n {
                        let bits = if mixed { 1 + (t % 8) as u8 } else { 1 + (t / 64 % 8) as u8 * 3 % 8 };
                        let row: Vec<f32> = (0..d).map(|_| half::f16::from_f32(rnd() * 3.0).to_f32()).collect();
                        ks.push(&row, bits).unwrap();
                        let vrow: Vec<f32> = row.iter().map(|x| half::f16::from_f32(x * 0.7 - 0.1).to_f32()).collect();
                        vs.push(&vrow, bits).unwrap();
                    }
                    let keys = KStore::Packed(ks);
                    for g in 1..=6 {
                        let qs: Vec<f32> = (0..g * d).map(|_| rnd() * 0.5).collect();
                        let (mut o1, mut p1) = (vec![0f32; g * d], vec![0f32; g * n]);
                        let (mut o2, mut p2) = (vec![0f32; g * d], vec![0f32; g * n]);
                        attend_packed(&keys, &vs, &qs, g, &mut o1, &mut p1);
                        attend_packed_reference(&keys, &vs, &qs, g, &mut o2, &mut p2);
                        let ptol = if crate::simd::vnni() { 1e-3 } else { 3e-5 };
                        for (a, b) in p1.iter().zip(&p2) {
                            assert!((a - b).abs() <= ptol * b.abs().max(1e-4), "d {d} g {g}: {a} vs {b}");
                        }
                        let norm = o2.iter().map(|x| x * x).sum::<f32>().sqrt();
                        let diff = o1.iter().zip(&o2).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
                        let tol = if crate::simd::vnni() { 4e-4 } else { 1e-5 };
                        assert!(diff <= tol * norm, "d {d} g {g} alpha {alpha} mixed {mixed}: rel {}", diff / norm);
                    }
                }
            }
        }
    }

    #[test]
    fn packed_equals_dense_over_dequantised() {
        let d = 16;
        let mut ks = PackedStream::new(d, QuantSpec::default(), false);
        let mut vs = PackedStream::new(d, QuantSpec::default(), false);
        let n = 150;
        for t in 0..n {
            let row: Vec<f32> =
                (0..d).map(|i| half::f16::from_f32(((t * 13 + i * 7) % 17) as f32 / 5.0 - 1.5).to_f32()).collect();
            let bits = [0u8, 1, 2, 3, 4, 5, 6, 7, 8, RAW][t % 10];
            ks.push(&row, bits).unwrap();
            vs.push(&row.iter().map(|x| -x).collect::<Vec<_>>(), [3u8, RAW, 0][t % 3]).unwrap();
        }
        let (kst, g) = (KStore::Packed(ks), 3);
        let qs: Vec<f32> = (0..g * d).map(|i| ((i * 5) % 9) as f32 / 9.0 - 0.4).collect();
        let (mut out, mut probs) = (vec![0f32; g * d], vec![0f32; g * n]);
        attend_packed(&kst, &vs, &qs, g, &mut out, &mut probs);
        let (mut kd, mut vd) = (vec![0f32; n * d], vec![0f32; n * d]);
        for t in 0..n {
            assert!(kst.decode(t, &mut kd[t * d..(t + 1) * d]));
            assert!(vs.decode(t, &mut vd[t * d..(t + 1) * d]));
        }
        let (mut o2, mut p2) = (vec![0f32; g * d], vec![0f32; g * n]);
        attend_dense_f32(&kd, &vd, d, &qs, g, &mut o2, &mut p2);
        let norm = o2.iter().map(|x| x * x).sum::<f32>().sqrt();
        let diff = out.iter().zip(&o2).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
        assert!(diff <= 1e-5 * norm, "rel {}", diff / norm);
        for (a, b) in probs.iter().zip(&p2) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1e-3));
        }
        assert!((probs[..n].iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }

    /// The model's shape at long context: head dim 64, 4,096 tokens, every width mix the
    /// policies produce, with and without outliers.
    #[test]
    fn packed_equals_dense_at_head_dim_64_and_4k_tokens() {
        use crate::quant::{Outliers, Scheme};
        let (d, n, g) = (64, 4096, 3);
        let mut seed = 12345u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5
        };
        for alpha in [0.0, 0.01] {
            for widths in [[2u8, 3, 2, 3], [4, 4, 4, 4], [5, 6, 7, 8], [3, 4, 5, RAW]] {
                let spec = QuantSpec { scheme: Scheme::Midpoint, outliers: Outliers { alpha, ..Outliers::PAPER } };
                let (mut ks, mut vs) = (PackedStream::new(d, spec, false), PackedStream::new(d, spec, false));
                for t in 0..n {
                    // One channel with a large offset, as real keys have.
                    let row: Vec<f32> = (0..d)
                        .map(|i| half::f16::from_f32(rnd() * 4.0 + if i == 3 { 20.0 } else { 0.0 }).to_f32())
                        .collect();
                    ks.push(&row, widths[t % 4]).unwrap();
                    vs.push(&row, [1u8, 2, 1, RAW][t % 4]).unwrap();
                }
                let qs: Vec<f32> = (0..g * d).map(|_| rnd()).collect();
                let kst = KStore::Packed(ks);
                let (mut out, mut probs) = (vec![0f32; g * d], vec![0f32; g * n]);
                attend_packed(&kst, &vs, &qs, g, &mut out, &mut probs);
                let (mut kd, mut vd) = (vec![0f32; n * d], vec![0f32; n * d]);
                for t in 0..n {
                    assert!(kst.decode(t, &mut kd[t * d..(t + 1) * d]) && vs.decode(t, &mut vd[t * d..(t + 1) * d]));
                }
                let (mut o2, mut p2) = (vec![0f32; g * d], vec![0f32; g * n]);
                attend_dense_f32(&kd, &vd, d, &qs, g, &mut o2, &mut p2);
                let dp = probs.iter().zip(&p2).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                let dout = out.iter().zip(&o2).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                // The integer scores of AVX512_VNNI: probabilities to 5e-5 (measured 1.3e-5).
                let ptol = if crate::simd::vnni() { 5e-5 } else { 1e-5 };
                assert!(dp < ptol && dout < 1e-3, "alpha {alpha}, widths {widths:?}: probs {dp}, output {dout}");
            }
        }
    }

    /// The multi-row attention is the row-by-row one: bit for bit the primitives' scores
    /// and weighted values around the level's softmax (the vectorized one where the tiles
    /// run, else the portable one, i.e. `attend_dense_f32` exactly), and within float
    /// rounding of `attend_dense_f32` anyway. Head dims the tiles serve (16, 48, 64, 128)
    /// and not (8, 72), GQA group sizes, rows skipped, contexts shorter than a tile and
    /// longer than a key block.
    #[test]
    fn dense_rows_are_the_row_by_row_attention() {
        let mut rng = crate::testutil::Rng(777);
        let mut rnd = move || rng.f();
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for (d, g, n, first) in [
            (64, 3, 19, 1),
            (64, 3, 9, 1200),
            (128, 2, 11, 40),
            (16, 5, 7, 3),
            (48, 1, 6, 530),
            (8, 3, 5, 9),
            (72, 2, 4, 20),
        ] {
            let t_total = first + n - 1;
            let k: Vec<f32> = (0..t_total * d).map(|_| rnd() * 2.0).collect();
            let v: Vec<f32> = (0..t_total * d).map(|_| rnd()).collect();
            let qs: Vec<f32> = (0..n * g * d).map(|_| rnd() * 0.3).collect();
            let tiles = simd::dense_scores(&k, d, &qs[..g * d], &[1], &[0], &mut [0f32; 1]);
            for skip in [usize::MAX, 3] {
                let rows: Vec<usize> = (0..n).filter(|r| r % skip != 2).collect();
                let tvs: Vec<usize> = rows.iter().map(|r| first + r).collect();
                let mut out = vec![0f32; rows.len() * g * d];
                let mut probs = vec![f32::NAN; n * g * t_total];
                attend_dense_rows(&k, &v, d, &qs, g, (&rows, &tvs), t_total, &mut out, &mut probs);
                for (i, (&r, &tv)) in rows.iter().zip(&tvs).enumerate() {
                    let q = &qs[r * g * d..(r + 1) * g * d];
                    let (mut o, mut p) = (vec![0f32; g * d], vec![0f32; g * tv]);
                    attend_dense_f32(&k[..tv * d], &v[..tv * d], d, q, g, &mut o, &mut p);
                    let at = r * g * t_total;
                    let (got_p, got_o) = (&probs[at..at + g * tv], &out[i * g * d..(i + 1) * g * d]);
                    let close = |a: &[f32], b: &[f32], tol: f32| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol);
                    assert!(close(got_p, &p, 2e-6) && close(got_o, &o, 2e-5), "d {d} g {g} row {r}");
                    if tiles {
                        // The reference with the level's softmax.
                        for j in 0..g {
                            for t in 0..tv {
                                p[j * tv + t] = simd::dot(&q[j * d..(j + 1) * d], &k[t * d..(t + 1) * d]);
                            }
                        }
                        simd::softmax_rows(&mut p, g, tv);
                        o.fill(0.0);
                        for t in 0..tv {
                            for j in 0..g {
                                simd::axpy(&mut o[j * d..(j + 1) * d], p[j * tv + t], &v[t * d..(t + 1) * d]);
                            }
                        }
                    }
                    assert_eq!(bits(got_p), bits(&p), "d {d} g {g} row {r}: probabilities");
                    assert_eq!(bits(got_o), bits(&o), "d {d} g {g} row {r}: output");
                }
            }
        }
    }
}
