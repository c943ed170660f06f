//! Reference quantizers of [`super::QMatrix::from_f32`]: simple, search-free choices of
//! scales (per-block min/max or signed max-magnitude, 6/4/8-bit sub-block scales
//! relative to the largest), each code rounded with the stored (f16-rounded) scales.
//! They write ggml's block layouts (see `simd::ggml`).

use crate::simd::ggml::{QFormat, QK, QK_K};
use half::f16;

/// Rounds to f16 and back.
fn h(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

fn put_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// `round(v / step)` clamped to `lo..=hi` (0 when `step` is 0).
fn code(v: f32, step: f32, lo: i32, hi: i32) -> i32 {
    if step == 0.0 { 0.clamp(lo, hi) } else { ((v / step).round() as i32).clamp(lo, hi) }
}

/// The value of largest magnitude (the first one).
fn signed_max(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)))
}

/// Appends the bytes of one row of `f` quantized from `x` (`cols` values, a whole
/// number of blocks).
pub(super) fn quantize_row(f: QFormat, x: &[f32], out: &mut Vec<u8>) {
    match f {
        QFormat::F32 => x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        QFormat::F16 => x.iter().for_each(|&v| put_f16(out, v)),
        QFormat::BF16 => x.iter().for_each(|&v| out.extend_from_slice(&bf16_bits(v).to_le_bytes())),
        QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q5_0 | QFormat::Q5_1 | QFormat::Q8_0 => {
            x.chunks_exact(QK).for_each(|b| block32(f, b, out))
        }
        QFormat::Q2_K => x.chunks_exact(QK_K).for_each(|b| q2_k(b, out)),
        QFormat::Q3_K => x.chunks_exact(QK_K).for_each(|b| q3_k(b, out)),
        QFormat::Q4_K | QFormat::Q5_K => x.chunks_exact(QK_K).for_each(|b| q45_k(f == QFormat::Q5_K, b, out)),
        QFormat::Q6_K => x.chunks_exact(QK_K).for_each(|b| q6_k(b, out)),
    }
}

/// f32 to bfloat16 bits, rounding to nearest even (NaN stays a quiet NaN).
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// One block of a 32-value format.
fn block32(f: QFormat, x: &[f32], out: &mut Vec<u8>) {
    let mut q = [0i32; QK];
    match f {
        QFormat::Q4_1 | QFormat::Q5_1 => {
            let top = if f == QFormat::Q4_1 { 15 } else { 31 };
            let (lo, hi) = min_max(x);
            let (d, m) = (h((hi - lo) / top as f32), h(lo));
            put_f16(out, d);
            put_f16(out, m);
            for (c, &v) in q.iter_mut().zip(x) {
                *c = code(v - m, d, 0, top);
            }
        }
        QFormat::Q8_0 => {
            let d = h(x.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0);
            put_f16(out, d);
            for (c, &v) in q.iter_mut().zip(x) {
                *c = code(v, d, -127, 127);
            }
            out.extend(q.iter().map(|&c| c as i8 as u8));
            return;
        }
        _ => {
            let half = if f == QFormat::Q4_0 { 8 } else { 16 };
            let d = h(signed_max(x) / -(half as f32));
            put_f16(out, d);
            for (c, &v) in q.iter_mut().zip(x) {
                *c = code(v, d, -half, half - 1) + half;
            }
        }
    }
    if matches!(f, QFormat::Q5_0 | QFormat::Q5_1) {
        let bits = q.iter().enumerate().fold(0u32, |b, (i, &c)| b | (((c >> 4) as u32 & 1) << i));
        out.extend_from_slice(&bits.to_le_bytes());
    }
    out.extend((0..16).map(|i| ((q[i] & 0xF) | ((q[i + 16] & 0xF) << 4)) as u8));
}

/// Per sub-block of `len` values: the step `(max - min') / top` and the offset
/// `-min'` (`min' = min(min, 0)`), for the formats with mins.
fn steps_mins(x: &[f32], len: usize, top: f32) -> (Vec<f32>, Vec<f32>) {
    x.chunks_exact(len)
        .map(|s| {
            let (lo, hi) = min_max(s);
            let lo = lo.min(0.0);
            ((hi - lo) / top, -lo)
        })
        .unzip()
}

/// Scales `v` (non-negative) to codes of `0..=top` relative to their largest: the
/// f16-rounded super-scale and the codes.
fn superscale(v: &[f32], top: i32) -> (f32, Vec<i32>) {
    let d = h(v.iter().fold(0f32, |a, &b| a.max(b)) / top as f32);
    (d, v.iter().map(|&s| code(s, d, 0, top)).collect())
}

/// `Q4_K` (`five == false`) or `Q5_K`.
fn q45_k(five: bool, x: &[f32], out: &mut Vec<u8>) {
    let top = if five { 31 } else { 15 };
    let (steps, mins) = steps_mins(x, 32, top as f32);
    let (d, sc) = superscale(&steps, 63);
    let (dmin, mn) = superscale(&mins, 63);
    put_f16(out, d);
    put_f16(out, dmin);
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = (sc[j] as u8 & 63) | (((sc[j + 4] >> 4) as u8) << 6);
        s[j + 4] = (mn[j] as u8 & 63) | (((mn[j + 4] >> 4) as u8) << 6);
        s[j + 8] = (sc[j + 4] as u8 & 0xF) | ((mn[j + 4] as u8 & 0xF) << 4);
    }
    out.extend_from_slice(&s);
    let q: Vec<i32> = (0..QK_K).map(|e| code(x[e] + dmin * mn[e / 32] as f32, d * sc[e / 32] as f32, 0, top)).collect();
    if five {
        out.extend((0..32).map(|l| (0..8).fold(0u8, |b, g| b | (((q[32 * g + l] >> 4) & 1) as u8) << g)));
    }
    for c in 0..4 {
        out.extend((0..32).map(|l| ((q[64 * c + l] & 0xF) | ((q[64 * c + 32 + l] & 0xF) << 4)) as u8));
    }
}

/// `Q2_K`.
fn q2_k(x: &[f32], out: &mut Vec<u8>) {
    let (steps, mins) = steps_mins(x, 16, 3.0);
    let (d, sc) = superscale(&steps, 15);
    let (dmin, mn) = superscale(&mins, 15);
    out.extend((0..16).map(|j| (sc[j] | (mn[j] << 4)) as u8));
    let q: Vec<i32> = (0..QK_K).map(|e| code(x[e] + dmin * mn[e / 16] as f32, d * sc[e / 16] as f32, 0, 3)).collect();
    for hh in 0..2 {
        out.extend((0..32).map(|l| (0..4).fold(0u8, |b, k| b | (q[128 * hh + 32 * k + l] as u8) << (2 * k))));
    }
    put_f16(out, d);
    put_f16(out, dmin);
}

/// Signed sub-block scales `max_magnitude_value / -half`, and the f16 super-scale with
/// the codes of `-lim..lim` (clamped to `lo..=hi`) that represent them.
fn signed_scales(x: &[f32], len: usize, half: f32, lim: i32, lo: i32, hi: i32) -> (f32, Vec<i32>) {
    let s: Vec<f32> = x.chunks_exact(len).map(|b| signed_max(b) / -half).collect();
    let d = h(s.iter().fold(0f32, |a, v| a.max(v.abs())) / lim as f32);
    (d, s.iter().map(|&v| code(v, d, lo, hi)).collect())
}

/// `Q3_K`.
fn q3_k(x: &[f32], out: &mut Vec<u8>) {
    let (d, sc) = signed_scales(x, 16, 4.0, 32, -32, 31);
    let q: Vec<i32> = (0..QK_K).map(|e| code(x[e], d * sc[e / 16] as f32, -4, 3) + 4).collect();
    out.extend((0..32).map(|l| (0..8).fold(0u8, |b, g| b | (((q[32 * g + l] >> 2) & 1) as u8) << g)));
    for hh in 0..2 {
        out.extend((0..32).map(|l| (0..4).fold(0u8, |b, k| b | ((q[128 * hh + 32 * k + l] & 3) as u8) << (2 * k))));
    }
    let u: Vec<u8> = sc.iter().map(|&s| (s + 32) as u8).collect();
    let mut s = [0u8; 12];
    for j in 0..16 {
        if j < 8 {
            s[j] |= u[j] & 0xF;
        } else {
            s[j - 8] |= (u[j] & 0xF) << 4;
        }
        s[8 + j % 4] |= (u[j] >> 4) << (2 * (j / 4));
    }
    out.extend_from_slice(&s);
    put_f16(out, d);
}

/// `Q6_K`.
fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    let (d, sc) = signed_scales(x, 16, 32.0, 127, -128, 127);
    let q: Vec<i32> = (0..QK_K).map(|e| code(x[e], d * sc[e / 16] as f32, -32, 31) + 32).collect();
    for hh in 0..2 {
        for half in 0..2 {
            out.extend((0..32).map(|l| {
                let e = 128 * hh + 32 * half + l;
                ((q[e] & 0xF) | ((q[e + 64] & 0xF) << 4)) as u8
            }));
        }
    }
    for hh in 0..2 {
        out.extend(
            (0..32).map(|l| (0..4).fold(0u8, |b, k| b | (((q[128 * hh + 32 * k + l] >> 4) & 3) as u8) << (2 * k))),
        );
    }
    out.extend(sc.iter().map(|&s| s as i8 as u8));
    put_f16(out, d);
}
