//! Portable versions of the composed kernels: the reference group encoder and decoder
//! (the format described in [`crate::quant`]) and attention over packed K/V, group by
//! group. They are the [`super::Level::Scalar`] path and the references of the x86
//! kernels; like the code they came from, they call the dispatching primitives
//! (`simd::prim`), so at the AVX2 level they are "portable structure, vector
//! primitives", bit for bit what they always computed.

use super::input::Input;
use super::prim::{axpy, dot, f16_bytes_to_f32, pack_append, unpack_f32};
use crate::base::{
    GroupMeta, GroupRef, MAX_BITS, MAX_GROUP, QuantSpec, RAW, Scheme, Sink, StreamView, check_finite, check_group_len,
    f16_down, f16_up, h2f,
};
use crate::error::{KernelError, Result};
use half::f16;

#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for c in x.chunks_exact(8) {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + x.chunks_exact(8).remainder().iter().sum::<f32>()
}

#[inline(always)]
fn lane_min_max(x: &[f32]) -> (f32, f32) {
    let mut mn = [f32::INFINITY; 8];
    let mut mx = [f32::NEG_INFINITY; 8];
    for c in x.chunks_exact(8) {
        for i in 0..8 {
            mn[i] = if c[i] < mn[i] { c[i] } else { mn[i] };
            mx[i] = if c[i] > mx[i] { c[i] } else { mx[i] };
        }
    }
    (fold_lanes(mn, |a, b| if a < b { a } else { b }), fold_lanes(mx, |a, b| if a > b { a } else { b }))
}

/// Cross-lane reduction in a fixed tree, lanes (i+4, i), then (i+2, i), then (1, 0), with
/// `pick(a, b)` = `a < b ? a : b` (or `>`): deterministic even for +-0.
#[inline(always)]
fn fold_lanes(mut a: [f32; 8], pick: impl Fn(f32, f32) -> f32) -> f32 {
    for i in 0..4 {
        a[i] = pick(a[i + 4], a[i]);
    }
    for i in 0..2 {
        a[i] = pick(a[i + 2], a[i]);
    }
    pick(a[1], a[0])
}

/// Fast path for at most one outlier per side (the default at head_dim <= 200).
#[inline(always)]
fn select_small(x: &[f32], k_lo: usize, k_hi: usize, idx: &mut [u8; MAX_GROUP], n_idx: &mut usize) -> (f32, f32, f32) {
    *n_idx = 0;
    let (mn, mx) = lane_min_max(x);
    let sum_all = lane_sum(x);
    if k_lo + k_hi == 0 {
        return (mn, mx, sum_all);
    }
    let imin = x.iter().position(|&v| v == mn).unwrap_or(0);
    let imax = x.iter().rposition(|&v| v == mx).unwrap_or(0);
    let imax = if imax == imin && k_lo == 1 { if imin == 0 { 1 } else { 0 } } else { imax };
    let mut w = [0f32; MAX_GROUP];
    let w = &mut w[..x.len()];
    w.copy_from_slice(x);
    let mut sum = sum_all;
    let mut ex = [usize::MAX; 2];
    if k_lo == 1 {
        ex[0] = imin;
    }
    if k_hi == 1 {
        ex[1] = imax;
    }
    for &e in ex.iter().filter(|&&e| e != usize::MAX) {
        sum -= x[e];
        w[e] = f32::INFINITY;
    }
    let (imn, _) = lane_min_max(w);
    for &e in ex.iter().filter(|&&e| e != usize::MAX) {
        w[e] = f32::NEG_INFINITY;
    }
    let (_, imx) = lane_min_max(w);
    if ex[0] > ex[1] {
        ex.swap(0, 1);
    }
    for &e in ex.iter().filter(|&&e| e != usize::MAX) {
        idx[*n_idx] = e as u8;
        *n_idx += 1;
    }
    (imn, imx, sum)
}

/// Picks outliers; returns the inlier (min, max, sum) and fills `idx` (sorted).
#[inline(always)]
fn select_outliers(
    x: &[f32],
    k_lo: usize,
    k_hi: usize,
    idx: &mut [u8; MAX_GROUP],
    n_idx: &mut usize,
) -> (f32, f32, f32) {
    *n_idx = 0;
    if k_lo + k_hi > 0 {
        let mut taken = [false; MAX_GROUP];
        for pass in 0..k_lo + k_hi {
            let low = pass < k_lo;
            let mut best = usize::MAX;
            for (i, &v) in x.iter().enumerate() {
                if taken[i] {
                    continue;
                }
                if best == usize::MAX || (low && v < x[best]) || (!low && v > x[best]) {
                    best = i;
                }
            }
            taken[best] = true;
        }
        for i in (0..x.len()).filter(|&i| taken[i]) {
            idx[*n_idx] = i as u8;
            *n_idx += 1;
        }
    }
    let (mut mn, mut mx, mut sum) = (f32::INFINITY, f32::NEG_INFINITY, 0f32);
    let mut next = idx[..*n_idx].iter().peekable();
    for (i, &v) in x.iter().enumerate() {
        if next.peek().is_some_and(|&&j| j as usize == i) {
            next.next();
            continue;
        }
        mn = mn.min(v);
        mx = mx.max(v);
        sum += v;
    }
    (mn, mx, sum)
}

/// Appends one group of up to [`MAX_GROUP`] values stored raw: each as f16, little-endian
/// (f16 input copied as is). Values outside f16's finite range are an error and append
/// nothing.
#[inline(always)]
pub(crate) fn encode_raw<T: Input>(x: &[T], codes: &mut Vec<u8>) -> Result<GroupMeta> {
    let mut h = [f16::ZERO; MAX_GROUP];
    if !T::halves(x, &mut h[..x.len()]) {
        return Err(KernelError::NonFinite { what: "group" });
    }
    let at = codes.len();
    codes.resize(at + 2 * x.len(), 0);
    for (c, v) in codes[at..].chunks_exact_mut(2).zip(&h) {
        c.copy_from_slice(&v.to_le_bytes());
    }
    Ok(GroupMeta { m: f16::ZERO, s: f16::ZERO, bits: RAW, n_out: 0 })
}

/// The reference group encoder ([`crate::quant::encode_group`]'s semantics on every
/// CPU). Always inlined, so the AVX2 level can compile it with its features.
#[inline(always)]
pub(crate) fn encode_group(x: &[f32], bits: u8, spec: &QuantSpec, out: &mut Sink<'_>) -> Result<GroupMeta> {
    let Sink { codes, out_idx, out_val } = out;
    let d = x.len();
    check_group_len(d)?;
    if bits == RAW {
        return encode_raw(x, codes);
    }
    check_finite(x, "group")?;
    if bits > MAX_BITS {
        return Err(KernelError::Config(format!("width {bits} outside 0..=8")));
    }
    let (k_lo, k_hi) = spec.outliers.capped(d);
    let mut idx_buf = [0u8; MAX_GROUP];
    let mut n_idx = 0usize;
    let (mn, mx, sum) = if k_lo <= 1 && k_hi <= 1 {
        select_small(x, k_lo, k_hi, &mut idx_buf, &mut n_idx)
    } else {
        select_outliers(x, k_lo, k_hi, &mut idx_buf, &mut n_idx)
    };
    let idx = &idx_buf[..n_idx];
    let n_in = (d - idx.len()) as f32;
    let levels = (1u32 << bits) as f32;
    let mut c = [0u8; MAX_GROUP];
    let (m, s) = match spec.scheme {
        Scheme::Midpoint => {
            // `+ 0.0` maps -0 to +0, so the metadata does not depend on which of two
            // equal zeros the min/max search met first.
            let m = f16_down(mn + 0.0);
            let s = f16_up(((mx + 0.0) - m.to_f32()) / levels);
            if !s.is_finite() {
                return Err(KernelError::NonFinite { what: "group range" });
            }
            let (mf, sf) = (m.to_f32(), s.to_f32());
            if bits > 0 && sf > 0.0 {
                let inv = 1.0 / sf;
                let top = (1u32 << bits) - 1;
                // (v - mf) >= 0 for inliers, so truncation is floor; outliers clamp.
                let topf = top as f32;
                for (ci, &v) in c.iter_mut().zip(x) {
                    let q = ((v - mf) * inv).max(0.0).min(topf);
                    // SAFETY: `q` is finite (finite inputs, `inv` <= 2^24) and in [0, 255].
                    *ci = unsafe { q.to_int_unchecked::<i32>() } as u8;
                }
            }
            (m, s)
        }
        Scheme::MeanCentred => {
            let m = f16::from_f32(sum / n_in);
            let s = f16::from_f32((mx - mn) / levels);
            if !s.is_finite() {
                return Err(KernelError::NonFinite { what: "group range" });
            }
            if bits > 0 {
                let (mf, sf) = (m.to_f32(), s.to_f32());
                let half_lv = (1u32 << (bits - 1)) as f32;
                let inv = if sf > 0.0 { 1.0 / sf } else { 0.0 };
                for (ci, &v) in c.iter_mut().zip(x) {
                    let q = ((v - mf) * inv).round_ties_even().clamp(-half_lv, half_lv - 1.0);
                    *ci = (q + half_lv) as u8;
                }
            }
            (m, s)
        }
    };
    for &i in idx {
        c[i as usize] = 0;
        out_idx.push(i);
        out_val.push(f16::from_f32(x[i as usize]));
    }
    if bits > 0 {
        pack_append(&c[..d], bits, codes);
    }
    Ok(GroupMeta { m, s, bits, n_out: idx.len() as u8 })
}

/// The reference group decoder ([`crate::quant::decode_group`]).
pub(crate) fn decode_group(g: GroupRef<'_>, scheme: Scheme, out: &mut [f32]) {
    let GroupRef { meta, codes, out_idx, out_val } = g;
    if meta.bits == RAW {
        f16_bytes_to_f32(codes, out);
        return;
    }
    let base = meta.base(scheme);
    let s = meta.s.to_f32();
    if meta.bits == 0 {
        out.fill(base);
    } else {
        unpack_f32(codes, meta.bits, out);
        for v in out.iter_mut() {
            *v = base + *v * s;
        }
    }
    for (&i, &v) in out_idx.iter().zip(out_val) {
        if let Some(o) = out.get_mut(i as usize) {
            *o = v.to_f32();
        }
    }
}

/// Scores `scores[j * T + t] = q_j . k_hat_t` of `g` queries over packed keys, group by
/// group: `q . x_hat = base * sum(q) + s * (q . c) + sum_outliers q_i (v_i - base)`.
pub(crate) fn packed_scores(s: StreamView<'_>, qs: &[f32], g: usize, scores: &mut [f32]) {
    let (d, t_total) = (s.d, s.len);
    let sumq: Vec<f32> = (0..g).map(|j| qs[j * d..(j + 1) * d].iter().sum()).collect();
    let mut tmp = vec![0f32; d];
    let mut t = 0usize;
    for b in s.blocks {
        b.for_each(d, |_, gr| {
            let m: GroupMeta = gr.meta;
            if m.bits == RAW {
                f16_bytes_to_f32(gr.codes, &mut tmp);
                for j in 0..g {
                    scores[j * t_total + t] = dot(&qs[j * d..(j + 1) * d], &tmp);
                }
            } else {
                let base = m.base(s.scheme);
                let sc = h2f(m.s);
                if m.bits > 0 {
                    unpack_f32(gr.codes, m.bits, &mut tmp);
                }
                for j in 0..g {
                    let q = &qs[j * d..(j + 1) * d];
                    let mut v = base * sumq[j];
                    if m.bits > 0 {
                        v += sc * dot(q, &tmp);
                    }
                    for (&i, &ov) in gr.out_idx.iter().zip(gr.out_val) {
                        v += q[i as usize] * (h2f(ov) - base);
                    }
                    scores[j * t_total + t] = v;
                }
            }
            t += 1;
        });
    }
}

/// In-place softmax of each of the `g` rows of length `t` in `x`.
pub(crate) fn softmax_rows(x: &mut [f32], g: usize, t: usize) {
    for row in x.chunks_exact_mut(t.max(1)).take(g) {
        let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for v in row.iter_mut() {
            *v = (*v - mx).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// `out[j * d ..] = sum_t probs[j * T + t] * v_hat_t` for `g` query heads: `p * s * c`
/// per group plus one scalar `p * base` per query head, outliers corrected.
pub(crate) fn weighted_values(v: StreamView<'_>, probs: &[f32], g: usize, out: &mut [f32]) {
    let (d, t_total) = (v.d, v.len);
    out[..g * d].fill(0.0);
    let mut cst = vec![0f32; g];
    let mut tmp = vec![0f32; d];
    let mut t = 0usize;
    for b in v.blocks {
        b.for_each(d, |_, gr| {
            let m = gr.meta;
            if m.bits == RAW {
                f16_bytes_to_f32(gr.codes, &mut tmp);
                for j in 0..g {
                    axpy(&mut out[j * d..(j + 1) * d], probs[j * t_total + t], &tmp);
                }
            } else {
                let base = m.base(v.scheme);
                let sc = h2f(m.s);
                if m.bits > 0 {
                    unpack_f32(gr.codes, m.bits, &mut tmp);
                }
                for j in 0..g {
                    let p = probs[j * t_total + t];
                    let acc = &mut out[j * d..(j + 1) * d];
                    if m.bits > 0 {
                        axpy(acc, p * sc, &tmp);
                    }
                    cst[j] += p * base;
                    for (&i, &ov) in gr.out_idx.iter().zip(gr.out_val) {
                        acc[i as usize] += p * (h2f(ov) - base);
                    }
                }
            }
            t += 1;
        });
    }
    for j in 0..g {
        for o in &mut out[j * d..(j + 1) * d] {
            *o += cst[j];
        }
    }
}
