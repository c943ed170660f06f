//! AVX-512 attention over the packed cache of one KV head, for head dims that are a
//! multiple of 64 (up to 256): the AVX-512 level's version of [`super::attention`].
//!
//! The AVX2 kernels unpack 8 codes at a time (`pdep`, two widenings, a conversion) into
//! 8-lane vectors, so a quantized group costs more instructions than an fp16 one and a
//! compressed cache decodes no faster than fp16 although it reads a quarter of the bytes.
//! Here a group's 64 codes of any width are unpacked at once into bytes
//! ([`super::quant512::codes64`]: a masked load, `vpermb`, `vpmultishiftqb`, a mask) and
//! widened to four 16-lane vectors; raw (fp16) groups are four 16-lane conversions. The
//! arithmetic is the AVX2 kernels' (f32 fused multiply-adds against the query heads of
//! the KV head, the per-group constants and outliers added the same way, the same
//! softmax); only the summation order differs, so results agree with them and with the
//! portable path to float rounding (the tests in [`crate::attention`] compare them).
//! With AVX512_VNNI, quantized blocks take 16-bit integer products instead: the scores
//! against queries rounded to 16 bits ([`scores_block_int`]), the values with weights
//! rounded to 16 bits ([`values_tile_int`]); each rounding is at most 1/65534 of the
//! largest query channel or weight, far below the codes' own step.
//!
//! Per-token scalar work is what bounded these kernels on a compressed cache (scans of a
//! block's groups for raw ones, outliers and one width, each token's constants from its
//! f16 metadata): a block's metadata is read 16 tokens at a time ([`meta_words`], its
//! `repr(C)` layout), its [`Kind`] decided once, and a block at one width unpacks its
//! codes with constants made once ([`Unpack`]).

use super::attention::{add_rows, group_consts, offsets, prefetch_block, transpose_q};
use super::dense512::tree16;
use super::quant512::{Unpack, codes64};
use crate::base::{Block, MAX_GROUP, RAW, StreamView};

/// Tokens per block of the packed stream (`crate::store::BLOCK_TOKENS`; the kernels
/// assert it).
const BLOCK: usize = 64;
use crate::simd::prim::x86::h2f_f16c;
use std::arch::x86_64::*;

/// Whether these kernels take head dim `d`.
pub(crate) fn fits(d: usize) -> bool {
    d.is_multiple_of(64) && d <= MAX_GROUP
}

/// Per quarter `q` of 64 code bytes, the `vpermb` indices that move byte `16 q + i` to
/// byte 0 of dword `i` (the other bytes are zeroed by [`DWORD_LOW`]).
static WIDEN_IDX: [[u8; 64]; 4] = {
    let mut t = [[0u8; 64]; 4];
    let mut q = 0;
    while q < 4 {
        let mut i = 0;
        while i < 16 {
            t[q][4 * i] = (16 * q + i) as u8;
            i += 1;
        }
        q += 1;
    }
    t
};

/// Byte 0 of every dword.
const DWORD_LOW: u64 = 0x1111_1111_1111_1111;

/// The `vpermb` indices of [`WIDEN_IDX`], loaded once per kernel call.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
fn widen_idx() -> [__m512i; 4] {
    // SAFETY: 64 bytes each.
    std::array::from_fn(|q| unsafe { _mm512_loadu_si512(WIDEN_IDX[q].as_ptr() as *const _) })
}

/// Codes `16 q .. 16 q + 16` of the code bytes `w` ([`codes64`]) as f32: one zeroing
/// `vpermb` and a conversion.
#[inline(always)]
unsafe fn widen(w: __m512i, idx: &[__m512i; 4], q: usize) -> __m512 {
    // SAFETY: AVX-512 F/BW/VBMI are enabled in every caller.
    unsafe { _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(DWORD_LOW, idx[q], w)) }
}

/// Where the kernels prefetch from while they take block `b`: the next block's codes at
/// the offset of the group they are at (a block ahead), or past `b`'s own.
fn next_codes(next: Option<&Block>, b: &Block) -> *const u8 {
    next.map_or(b.codes.as_ptr().wrapping_add(b.codes.len()), |n| n.codes.as_ptr())
}

/// 16 little-endian f16 values at `p` as f32.
#[inline(always)]
unsafe fn raw16(p: *const u8) -> __m512 {
    // SAFETY: 32 bytes readable at `p` (callers); AVX-512F enabled in every caller.
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
}

/// The 8-lane sum of the two halves of `a` (the horizontal sum then goes on in
/// [`hsum4`]).
#[inline(always)]
unsafe fn fold(a: __m512) -> __m256 {
    // SAFETY: AVX-512F enabled in every caller.
    unsafe {
        _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a))))
    }
}

/// Scores of all `g` query heads over packed keys, four heads per pass; with `vnni`,
/// blocks without raw groups in 16-bit integer products ([`scores_block_int`]).
///
/// # Safety
/// The level is AVX-512 (F/BW/VL/VBMI, with AVX2, FMA, F16C), and AVX512_VNNI when
/// `vnni`; [`fits`]`(d)`; `qs.len() >= g * d`, `scores.len() >= g * T`.
pub(crate) unsafe fn packed_scores(s: StreamView<'_>, qs: &[f32], g: usize, scores: &mut [f32], vnni: bool) {
    assert!(fits(s.d));
    let mut qt = [[0f32; 4]; MAX_GROUP];
    let mut j0 = 0;
    while j0 < g {
        transpose_q(qs, s.d, g, j0, &mut qt);
        // SAFETY: per the contract; each call covers heads j0 .. min(j0 + 4, g).
        unsafe {
            match ((g - j0).min(4), s.d / 64) {
                (1, 1) => scores_nh::<1, 1>(s, qs, &qt, j0, scores, vnni),
                (2, 1) => scores_nh::<2, 1>(s, qs, &qt, j0, scores, vnni),
                (3, 1) => scores_nh::<3, 1>(s, qs, &qt, j0, scores, vnni),
                (_, 1) => scores_nh::<4, 1>(s, qs, &qt, j0, scores, vnni),
                (1, 2) => scores_nh::<1, 2>(s, qs, &qt, j0, scores, vnni),
                (2, 2) => scores_nh::<2, 2>(s, qs, &qt, j0, scores, vnni),
                (3, 2) => scores_nh::<3, 2>(s, qs, &qt, j0, scores, vnni),
                (_, 2) => scores_nh::<4, 2>(s, qs, &qt, j0, scores, vnni),
                (1, 3) => scores_nh::<1, 3>(s, qs, &qt, j0, scores, vnni),
                (2, 3) => scores_nh::<2, 3>(s, qs, &qt, j0, scores, vnni),
                (_, 3) => scores_nh::<3, 3>(s, qs, &qt, j0, scores, vnni),
                (1, _) => scores_nh::<1, 4>(s, qs, &qt, j0, scores, vnni),
                (2, _) => scores_nh::<2, 4>(s, qs, &qt, j0, scores, vnni),
                (_, _) => scores_nh::<3, 4>(s, qs, &qt, j0, scores, vnni),
            }
        }
        // Three heads per pass where a head's query is 3 or 4 chunks (register room).
        j0 += if s.d > 128 { (g - j0).min(3) } else { 4 };
    }
}

/// The sums of the 8 lanes of each of `b[0..8]`, in order: a `vhaddps` tree and one
/// 128-bit exchange.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum8x8(b: &[__m256; 8]) -> __m256 {
    let h01 = _mm256_hadd_ps(b[0], b[1]);
    let h23 = _mm256_hadd_ps(b[2], b[3]);
    let h45 = _mm256_hadd_ps(b[4], b[5]);
    let h67 = _mm256_hadd_ps(b[6], b[7]);
    let lo = _mm256_hadd_ps(h01, h23);
    let hi = _mm256_hadd_ps(h45, h67);
    _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(lo, hi), _mm256_permute2f128_ps::<0x31>(lo, hi))
}

/// Scores of `NH` query heads (`qs` rows `j0..j0 + NH`) over keys of `NC` chunks of 64.
///
/// Block by block: each token's dot products `q_j . c` are folded to 8 lanes and kept;
/// at the end of the block they are summed eight tokens at a time ([`hsum8x8`]), scaled
/// and offset per token (`s * dot + base * sum(q_j)`) and stored as contiguous runs of
/// the score rows; then the outliers' `q_j[i] * (v_i - base)` are added. No token waits
/// on the previous one's horizontal sum. With `vnni`, a block without raw groups takes
/// [`scores_block_int`] instead of the f32 products.
///
/// # Safety
/// As [`packed_scores`]; `d == 64 NC`; `qt` of heads `j0..`.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma,f16c,bmi2")]
unsafe fn scores_nh<const NH: usize, const NC: usize>(
    s: StreamView<'_>,
    qs: &[f32],
    qt: &[[f32; 4]],
    j0: usize,
    scores: &mut [f32],
    vnni: bool,
) {
    let d = s.d;
    let t_total = s.len;
    assert!(d == 64 * NC && qs.len() >= (j0 + NH) * d && scores.len() >= (j0 + NH) * t_total && NH <= 4);
    let offs = offsets(s.scheme);
    let mut sumq = [0f32; 4];
    for (j, sq) in sumq.iter_mut().enumerate().take(NH) {
        *sq = qs[(j0 + j) * d..(j0 + j + 1) * d].iter().sum();
    }
    // The query heads' vectors, [head][16-lane vector].
    let mut q = [[_mm512_setzero_ps(); 16]; NH];
    for (j, row) in q.iter_mut().enumerate() {
        for (v, x) in row.iter_mut().enumerate().take(4 * NC) {
            // SAFETY: (j0 + j) * d + 16 v + 16 <= qs.len() (asserted).
            *x = unsafe { _mm512_loadu_ps(qs.as_ptr().add((j0 + j) * d + 16 * v)) };
        }
    }
    let widx = widen_idx();
    // The queries in 16 bits, for the integer blocks.
    // SAFETY: AVX-512 F/BW (the level); `qs` holds heads j0 .. j0 + NH (asserted).
    let qw = if vnni { Some(unsafe { query_words::<NH, NC>(qs, d, j0) }) } else { None };
    // Each block's bases, for its outliers.
    let mut bases = [0f32; BLOCK];
    let mut t0 = 0usize;
    for (bi, b) in s.blocks.iter().enumerate() {
        prefetch_block(s.blocks.get(bi + 1));
        let n = b.len();
        assert!(n <= BLOCK && t0 + n <= t_total);
        // SAFETY: the level.
        let kind = unsafe { kind(b) };
        if let Some((qw, back)) = &qw
            && !kind.raw
        {
            // SAFETY: VNNI with `qw`; the block's tokens are t0 .. t0 + n of the rows.
            unsafe {
                scores_block_int::<NH, NC>(
                    b,
                    next_codes(s.blocks.get(bi + 1), b),
                    kind.width,
                    &offs,
                    qw,
                    back,
                    &sumq,
                    (j0, t0, t_total),
                    &mut bases,
                    scores,
                )
            };
        } else {
            // SAFETY: as this function's contract.
            unsafe { scores_block::<NH, NC>(b, &offs, &q, &widx, &sumq, (j0, t0, t_total), &mut bases, scores) };
        }
        if kind.outliers {
            let mut oo = 0usize;
            for (i, m) in b.meta.iter().enumerate() {
                let no = m.n_out as usize;
                for (&oi, &ov) in b.out_idx[oo..oo + no].iter().zip(&b.out_val[oo..oo + no]) {
                    let delta = h2f_f16c(ov) - bases[i];
                    for j in 0..NH {
                        scores[(j0 + j) * t_total + t0 + i] += qt[oi as usize][j] * delta;
                    }
                }
                oo += no;
            }
        }
        t0 += n;
    }
}

/// The score rows of heads `j0..j0 + NH` over one block whose first token is `t0`
/// (`at = (j0, t0, T)`), before its outliers, in f32 products: per token, the dot
/// products with its codes (or raw values) folded to 8 lanes, then [`store_scores`].
/// Fills `bases` with the block's per-token bases.
///
/// # Safety
/// As [`scores_nh`]; `q` holds the heads' queries (`4 NC` vectors each).
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma,f16c,bmi2")]
unsafe fn scores_block<const NH: usize, const NC: usize>(
    b: &Block,
    offs: &[f32; 9],
    q: &[[__m512; 16]; NH],
    widx: &[__m512i; 4],
    sumq: &[f32; 4],
    at: (usize, usize, usize),
    bases: &mut [f32; BLOCK],
    scores: &mut [f32],
) {
    let d = 64 * NC;
    let mut folded = [[_mm256_setzero_ps(); BLOCK]; NH];
    let mut steps = [0f32; BLOCK];
    let (cp, mut co) = (b.codes.as_ptr(), 0usize);
    for (i, m) in b.meta.iter().enumerate() {
        let (base, sc, cb) = group_consts(m, offs, d);
        (steps[i], bases[i]) = (sc, base);
        let mut acc = [_mm512_setzero_ps(); NH];
        if m.bits == RAW {
            for v in 0..4 * NC {
                // SAFETY: a raw group holds 2 d bytes at `co`.
                let x = unsafe { raw16(cp.add(co + 32 * v)) };
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(q[j][v], x, *a);
                }
            }
        } else if m.bits > 0 {
            for c in 0..NC {
                // SAFETY: the group's 8 bits bytes per chunk are inside the codes.
                let w = unsafe { codes64(cp.add(co + 8 * c * m.bits as usize), m.bits, 64) };
                for qd in 0..4 {
                    // SAFETY: features enabled.
                    let x = unsafe { widen(w, widx, qd) };
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(q[j][4 * c + qd], x, *a);
                    }
                }
            }
        }
        for (f, a) in folded.iter_mut().zip(&acc) {
            // SAFETY: features enabled.
            f[i] = unsafe { fold(*a) };
        }
        co += cb;
    }
    let n = b.len();
    // SAFETY: features enabled; the block's tokens are within the rows (the caller).
    unsafe {
        store_scores::<NH>(n, &steps, bases, sumq, &[1.0; NH], at, scores, |j, i| {
            folded[j][n.min(i + 8)..i + 8].fill(_mm256_setzero_ps());
            hsum8x8(folded[j][i..i + 8].try_into().expect("8 tokens"))
        })
    };
}

/// Per half `h` of 64 code bytes, the `vpermb` indices that move byte `32 h + i` to
/// byte 0 of word `i` (the high bytes are zeroed by [`WORD_LOW`]).
static WORD_IDX: [[u8; 64]; 2] = {
    let mut t = [[0u8; 64]; 2];
    let mut h = 0;
    while h < 2 {
        let mut i = 0;
        while i < 32 {
            t[h][2 * i] = (32 * h + i) as u8;
            i += 1;
        }
        h += 1;
    }
    t
};

/// The queries of heads `j0..j0 + NH` in 16 bits for [`scores_block_int`]: per head,
/// rounded against its largest magnitude (`w_i = round(32767 q_i / max)`, an error of
/// at most `max / 65534` per channel), as `2 NC` vectors of 32 words (channels
/// `32 k .. 32 k + 32`), and the scale back (`max / 32767`).
///
/// # Safety
/// AVX-512 F/BW; `d == 64 NC`, `qs.len() >= (j0 + NH) * d`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn query_words<const NH: usize, const NC: usize>(
    qs: &[f32],
    d: usize,
    j0: usize,
) -> ([[__m512i; 8]; NH], [f32; NH]) {
    assert!(d == 64 * NC && qs.len() >= (j0 + NH) * d);
    let mut qw = [[_mm512_setzero_si512(); 8]; NH];
    let mut back = [0f32; NH];
    for j in 0..NH {
        let row = &qs[(j0 + j) * d..(j0 + j + 1) * d];
        let mx = row.iter().fold(0f32, |a, x| a.max(x.abs()));
        if mx <= 0.0 {
            continue;
        }
        back[j] = mx / 32767.0;
        let to = _mm512_set1_ps(32767.0 / mx);
        let words = |v: usize| {
            // SAFETY: 16 v + 16 <= d floats of the row.
            let x = unsafe { _mm512_loadu_ps(row.as_ptr().add(16 * v)) };
            _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(x, to)))
        };
        for (k, w) in qw[j].iter_mut().enumerate().take(2 * NC) {
            *w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(words(2 * k)), words(2 * k + 1));
        }
    }
    (qw, back)
}

/// Per field `f` of [`crate::base::GroupMeta`]'s three words (`m`, `s`, width and
/// outlier count), the `vpermt2w` indices that gather word `f` of 16 tokens' metadata
/// (96 bytes) into words 0..16.
static META_IDX: [[u16; 32]; 3] = {
    let mut t = [[0u16; 32]; 3];
    let mut f = 0;
    while f < 3 {
        let mut i = 0;
        while i < 16 {
            t[f][i] = (3 * i + f) as u16;
            i += 1;
        }
        f += 1;
    }
    t
};

/// `offs` ([`offsets`]) in the first 9 of 16 lanes, for `vpermps` by width.
#[inline]
#[target_feature(enable = "avx512f")]
fn offsets16(offs: &[f32; 9]) -> __m512 {
    let mut t = [0f32; 16];
    t[..9].copy_from_slice(offs);
    // SAFETY: 16 floats.
    unsafe { _mm512_loadu_ps(t.as_ptr()) }
}

/// The steps and bases of tokens `i0 .. i0 + 16` of `b` (lanes past the block's end 0),
/// from their metadata read 16 at a time: the values [`group_consts`] gives one token at
/// a time (`m + offset(width) * s`, a multiply then an add; raw groups base 0, step 1).
///
/// # Safety
/// AVX-512 F/BW; `i0 < b.len()`; `offs16` from [`offsets16`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn meta16(b: &Block, i0: usize, offs16: __m512) -> (__m512, __m512) {
    // SAFETY: per the contract.
    let [m, s, w] = unsafe { meta_words(b, i0) };
    let (m, s) = (_mm512_cvtph_ps(m), _mm512_cvtph_ps(s));
    let bits = _mm512_and_si512(_mm512_cvtepu16_epi32(w), _mm512_set1_epi32(0xff));
    let raw = _mm512_cmpeq_epi32_mask(bits, _mm512_set1_epi32(RAW as i32));
    let base = _mm512_add_ps(m, _mm512_mul_ps(_mm512_permutexvar_ps(bits, offs16), s));
    (_mm512_mask_mov_ps(s, raw, _mm512_set1_ps(1.0)), _mm512_mask_mov_ps(base, raw, _mm512_setzero_ps()))
}

/// The three metadata words of tokens `i0 .. i0 + 16` of `b` (`m`, `s`, and the width
/// with the outlier count in the high byte), 16 words each, 0 past the block's end: two
/// masked loads of the `repr(C)` metadata and one `vpermt2w` per word.
///
/// # Safety
/// AVX-512 F/BW; `i0 < b.len()`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn meta_words(b: &Block, i0: usize) -> [__m256i; 3] {
    assert!(i0 < b.len());
    let bytes = 6 * (b.len() - i0).min(16);
    let mask = |n: usize| if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    // SAFETY: the masked loads read only the `bytes` bytes of tokens i0.. of the
    // metadata (`repr(C)`, 6 bytes each); the index tables hold 32 words each.
    unsafe {
        let p = b.meta.as_ptr().add(i0) as *const i8;
        let lo = _mm512_maskz_loadu_epi8(mask(bytes), p);
        let hi = _mm512_maskz_loadu_epi8(mask(bytes.saturating_sub(64)), p.add(64));
        std::array::from_fn(|f| {
            let idx = _mm512_loadu_si512(META_IDX[f].as_ptr() as *const _);
            _mm512_castsi512_si256(_mm512_permutex2var_epi16(lo, idx, hi))
        })
    }
}

/// What the kernels need to know of a block's groups before taking it.
#[derive(Clone, Copy)]
struct Kind {
    /// Some group is raw (fp16).
    raw: bool,
    /// Some group has outliers.
    outliers: bool,
    /// The width of every group, where they share one (1..=8).
    width: Option<u8>,
}

/// [`Kind`] of `b`, from its metadata words 16 tokens at a time ([`meta_words`]).
///
/// # Safety
/// AVX-512 F/BW/VL.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn kind(b: &Block) -> Kind {
    let Some(first) = b.meta.first().map(|m| m.bits) else {
        return Kind { raw: false, outliers: false, width: None };
    };
    let n = b.len();
    let (mut raw, mut outliers, mut other): (__mmask16, __mmask16, __mmask16) = (0, 0, 0);
    for i0 in (0..n).step_by(16) {
        let k = (n - i0).min(16);
        let keep: __mmask16 = if k == 16 { 0xffff } else { (1u16 << k) - 1 };
        // SAFETY: i0 < n.
        let w = unsafe { meta_words(b, i0) }[2];
        let bits = _mm256_and_si256(w, _mm256_set1_epi16(0xff));
        raw |= _mm256_mask_cmpeq_epi16_mask(keep, bits, _mm256_set1_epi16(RAW as i16));
        outliers |= _mm256_mask_test_epi16_mask(keep, w, _mm256_set1_epi16(0xff00u16 as i16));
        other |= _mm256_mask_cmpneq_epi16_mask(keep, bits, _mm256_set1_epi16(first as i16));
    }
    Kind { raw: raw != 0, outliers: outliers != 0, width: (other == 0 && (1..=8).contains(&first)).then_some(first) }
}

/// Slot of token `i` (< 16) in the input of [`sum16`], so that its sums come out in
/// token order (the reduction tree leaves them transposed 4 by 4).
#[inline(always)]
const fn slot16(i: usize) -> usize {
    4 * (i % 4) + i / 4
}

/// Lane `i` = the sum of the 16 lanes of token `i`'s vector `a[slot16(i)]`: the dense
/// kernels' tree ([`tree16`]) in integer additions (exact in any order).
#[inline]
#[target_feature(enable = "avx512f")]
fn sum16(a: &[__m512i; 16]) -> __m512i {
    let add =
        |x: __m512, y: __m512| _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(x), _mm512_castps_si512(y)));
    _mm512_castps_si512(tree16(|n| _mm512_castsi512_ps(a[n]), add))
}

/// [`scores_block`] in integers, for a block without raw groups: each token's codes are
/// widened to 16 bits (two zeroing `vpermb` per 64) and `vpdpwssd` adds their products
/// with the 16-bit queries ([`query_words`]) into 32-bit sums (at most
/// `256 * 32767 * 255 < 2^31`), exact up to one conversion per token and head, scaled
/// back per head. Half the multiply instructions of the f32 products, and no conversion
/// of codes to floats. Sixteen tokens at a time: their metadata in vectors
/// ([`meta16`]), their sums in one tree ([`sum16`]), the score rows stored 16 lanes at
/// a time; a block at one width unpacks its codes with constants made once. Each token
/// prefetches the line a block ahead (`ahead`, [`next_codes`]): the blocks are separate
/// allocations, and the hardware prefetcher alone left the code loads waiting.
///
/// # Safety
/// As [`scores_block`], and AVX512_VNNI; no group of `b` is raw; `width` as [`kind`]
/// gives it.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,avx2,fma,f16c,bmi2")]
unsafe fn scores_block_int<const NH: usize, const NC: usize>(
    b: &Block,
    ahead: *const u8,
    width: Option<u8>,
    offs: &[f32; 9],
    qw: &[[__m512i; 8]; NH],
    back: &[f32; NH],
    sumq: &[f32; 4],
    (j0, t0, t_total): (usize, usize, usize),
    bases: &mut [f32; BLOCK],
    scores: &mut [f32],
) {
    let (d, n) = (64 * NC, b.len());
    assert!(n <= BLOCK && t0 + n <= t_total && scores.len() >= (j0 + NH) * t_total);
    assert!(width.is_none_or(|w| b.codes.len() >= n * d * w as usize / 8));
    // SAFETY: 64 bytes each.
    let widx: [__m512i; 2] = std::array::from_fn(|h| unsafe { _mm512_loadu_si512(WORD_IDX[h].as_ptr() as *const _) });
    // SAFETY: a block's one width is 1..=8 ([`Kind`]).
    let one = width.map(|w| (unsafe { Unpack::new(w, 64) }, w));
    let offs16 = offsets16(offs);
    let (cp, mut co) = (b.codes.as_ptr(), 0usize);
    let mut sums = [[_mm512_setzero_si512(); 16]; NH];
    for i0 in (0..n).step_by(16) {
        let k = (n - i0).min(16);
        if k < 16 {
            sums = [[_mm512_setzero_si512(); 16]; NH];
        }
        for i in 0..k {
            // A block at one width: the groups' offsets without their metadata.
            let (u, bits) = match one {
                Some((u, bits)) => {
                    co = (i0 + i) * d * bits as usize / 8;
                    (Some(u), bits)
                }
                None => {
                    let bits = b.meta[i0 + i].bits;
                    assert!(bits != RAW);
                    // SAFETY: width 1..=8.
                    ((bits > 0).then(|| unsafe { Unpack::new(bits, 64) }), bits)
                }
            };
            let mut acc = [_mm512_setzero_si512(); NH];
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(co) as *const i8);
            if let Some(u) = u {
                for c in 0..NC {
                    // SAFETY: the group's 8 bits bytes per chunk are inside the codes.
                    let at = co + 8 * c * bits as usize;
                    let w = unsafe { u.load_in(cp.add(at), b.codes.len() - at) };
                    let lo = _mm512_maskz_permutexvar_epi8(WORD_LOW, widx[0], w);
                    let hi = _mm512_maskz_permutexvar_epi8(WORD_LOW, widx[1], w);
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_dpwssd_epi32(*a, lo, qw[j][2 * c]);
                        *a = _mm512_dpwssd_epi32(*a, hi, qw[j][2 * c + 1]);
                    }
                }
            }
            for (s, a) in sums.iter_mut().zip(acc) {
                s[slot16(i)] = a;
            }
            co += d * bits as usize / 8;
        }
        // SAFETY: i0 < n; `bases` holds BLOCK floats; the lanes of `keep` are tokens
        // t0 + i0 .. t0 + i0 + k of each row (asserted).
        unsafe {
            let (step, base) = meta16(b, i0, offs16);
            _mm512_storeu_ps(bases.as_mut_ptr().add(i0), base);
            let keep: __mmask16 = if k == 16 { 0xffff } else { (1u16 << k) - 1 };
            for (j, s) in sums.iter().enumerate() {
                let st = _mm512_mul_ps(step, _mm512_set1_ps(back[j]));
                let r = _mm512_fmadd_ps(st, _mm512_cvtepi32_ps(sum16(s)), _mm512_mul_ps(base, _mm512_set1_ps(sumq[j])));
                _mm512_mask_storeu_ps(scores.as_mut_ptr().add((j0 + j) * t_total + t0 + i0), keep, r);
            }
        }
    }
}

/// Stores a block's scores (`n` tokens from `t0` of the rows of heads `j0..j0 + NH`,
/// `at = (j0, t0, T)`): eight tokens at a time, `s * scale_j * dot + base * sum(q_j)`,
/// the dot products of head `j` and tokens `i..i + 8` given by `dots(j, i)`.
///
/// # Safety
/// AVX2 and FMA; `t0 + n <= T`, `scores.len() >= (j0 + NH) * T`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn store_scores<const NH: usize>(
    n: usize,
    steps: &[f32; BLOCK],
    bases: &[f32; BLOCK],
    sumq: &[f32; 4],
    scale: &[f32; NH],
    (j0, t0, t_total): (usize, usize, usize),
    scores: &mut [f32],
    mut dots: impl FnMut(usize, usize) -> __m256,
) {
    for j in 0..NH {
        let row = &mut scores[(j0 + j) * t_total + t0..(j0 + j) * t_total + t0 + n];
        let (sq, sc) = (_mm256_set1_ps(sumq[j]), _mm256_set1_ps(scale[j]));
        for i in (0..n).step_by(8) {
            let k = (n - i).min(8);
            // SAFETY: `steps` and `bases` hold BLOCK floats, i + 8 <= BLOCK; the features
            // are those of every caller.
            let r = unsafe {
                let st = _mm256_mul_ps(_mm256_loadu_ps(steps.as_ptr().add(i)), sc);
                _mm256_fmadd_ps(st, dots(j, i), _mm256_mul_ps(_mm256_loadu_ps(bases.as_ptr().add(i)), sq))
            };
            let mut lanes = [0f32; 8];
            // SAFETY: 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), r) };
            row[i..i + k].copy_from_slice(&lanes[..k]);
        }
    }
}

/// `out[j * d ..] = sum_t probs[j * T + t] * v_hat_t` for `g` query heads, in tiles of
/// heads whose whole output rows stay in registers; with `vnni`, blocks of groups of one
/// quantized width in 16-bit integer products ([`values_tile_int`]).
///
/// # Safety
/// As [`packed_scores`], and AVX512_VNNI when `vnni`; `out.len() >= g * d`,
/// `probs.len() >= g * T`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma,f16c,bmi2")]
pub(crate) unsafe fn weighted_values(vs: StreamView<'_>, probs: &[f32], g: usize, out: &mut [f32], vnni: bool) {
    let d = vs.d;
    let t_total = vs.len;
    assert!(fits(d) && out.len() >= g * d && probs.len() >= g * t_total);
    let offs = offsets(vs.scheme);
    out[..g * d].fill(0.0);
    let mut cst = vec![0f32; g];
    let mut corr = vec![0f32; g * d];
    let mut bases = [0f32; BLOCK];
    // Heads per tile: their rows (d / 16 vectors each) in at most 24 registers.
    let per = (24 / (d / 16)).max(1);
    let mut t0 = 0usize;
    for (bi, b) in vs.blocks.iter().enumerate() {
        prefetch_block(vs.blocks.get(bi + 1));
        // SAFETY: features enabled; the block's tokens are within `probs`' rows.
        let kind = unsafe { kind(b) };
        // SAFETY: as above; `kind` gives the outliers.
        unsafe {
            block_constants(b, kind.outliers, &offs, d, probs, (g, t_total, t0), &mut bases, &mut cst, &mut corr)
        };
        // Integer products where the CPU has them and the block's groups are quantized
        // at one width (raw, zero-width and mixed-width blocks take the f32 tiles: with
        // mixed widths the weights `p * s` of the wide groups are small against those of
        // the narrow ones, and 16 bits against the largest would not hold them).
        let int = vnni && kind.width.is_some();
        let ahead = next_codes(vs.blocks.get(bi + 1), b);
        let mut j0 = 0;
        while j0 < g {
            let nh = (g - j0).min(per);
            // The tiles by (heads, chunks of 64): up to 6 heads of 64, 3 of 128, 2 of 192,
            // 1 of 256.
            macro_rules! tile {
                ($f:ident) => {
                    match (nh, d / 64) {
                        (1, 1) => $f::<1, 1>(b, ahead, d, probs, t_total, t0, j0, out),
                        (2, 1) => $f::<2, 1>(b, ahead, d, probs, t_total, t0, j0, out),
                        (3, 1) => $f::<3, 1>(b, ahead, d, probs, t_total, t0, j0, out),
                        (4, 1) => $f::<4, 1>(b, ahead, d, probs, t_total, t0, j0, out),
                        (5, 1) => $f::<5, 1>(b, ahead, d, probs, t_total, t0, j0, out),
                        (_, 1) => $f::<6, 1>(b, ahead, d, probs, t_total, t0, j0, out),
                        (1, 2) => $f::<1, 2>(b, ahead, d, probs, t_total, t0, j0, out),
                        (2, 2) => $f::<2, 2>(b, ahead, d, probs, t_total, t0, j0, out),
                        (_, 2) => $f::<3, 2>(b, ahead, d, probs, t_total, t0, j0, out),
                        (1, 3) => $f::<1, 3>(b, ahead, d, probs, t_total, t0, j0, out),
                        (_, 3) => $f::<2, 3>(b, ahead, d, probs, t_total, t0, j0, out),
                        (_, _) => $f::<1, 4>(b, ahead, d, probs, t_total, t0, j0, out),
                    }
                };
            }
            // SAFETY: heads j0 .. j0 + nh <= g; `d == 64 NC`; VNNI detected when `int`.
            unsafe { if int { tile!(values_tile_int) } else { tile!(values_tile) } }
            j0 += nh;
        }
        t0 += b.len();
    }
    add_rows(out, d, g, &cst, &corr);
}

/// The per-group constants of one block whose first token is `t0` (`at = (g, T, t0)`):
/// `cst[j] += sum_i p_j(t0 + i) * base_i` (raw groups: none) as 16-lane dot products of
/// the probability rows with the block's bases ([`meta16`]), and where `outliers`, their
/// `corr[j * d + i] += p * (v - base)`.
///
/// # Safety
/// As [`weighted_values`]; `t0 + b.len() <= T`; `outliers` if any group has outliers.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma,f16c,bmi2")]
unsafe fn block_constants(
    b: &Block,
    outliers: bool,
    offs: &[f32; 9],
    d: usize,
    probs: &[f32],
    (g, t_total, t0): (usize, usize, usize),
    bases: &mut [f32; BLOCK],
    cst: &mut [f32],
    corr: &mut [f32],
) {
    let n = b.len();
    assert!(n <= BLOCK && t0 + n <= t_total && probs.len() >= g * t_total);
    let offs16 = offsets16(offs);
    for i0 in (0..n).step_by(16) {
        // SAFETY: i0 < n; 16 floats at i0 < BLOCK.
        unsafe { _mm512_storeu_ps(bases.as_mut_ptr().add(i0), meta16(b, i0, offs16).1) };
    }
    for (j, c) in cst.iter_mut().enumerate().take(g) {
        let row = probs[j * t_total + t0..].as_ptr();
        let mut acc = _mm512_setzero_ps();
        for i in (0..n).step_by(16) {
            let keep: __mmask16 = if n - i >= 16 { 0xffff } else { (1u16 << (n - i)) - 1 };
            // SAFETY: lanes of `keep` are tokens t0 + i .. t0 + n of row j (asserted);
            // `bases` holds BLOCK floats, i + 16 <= BLOCK.
            acc = unsafe {
                _mm512_fmadd_ps(_mm512_maskz_loadu_ps(keep, row.add(i)), _mm512_loadu_ps(bases.as_ptr().add(i)), acc)
            };
        }
        *c += _mm512_reduce_add_ps(acc);
    }
    if !outliers {
        return;
    }
    let mut oo = 0usize;
    for (i, m) in b.meta.iter().enumerate() {
        let no = m.n_out as usize;
        for (&oi, &ov) in b.out_idx[oo..oo + no].iter().zip(&b.out_val[oo..oo + no]) {
            let delta = h2f_f16c(ov) - bases[i];
            for j in 0..g {
                corr[j * d + oi as usize] += probs[j * t_total + t0 + i] * delta;
            }
        }
        oo += no;
    }
}

/// Value accumulation of `NH` heads (`j0..j0 + NH`, whole rows of `NC` chunks of 64)
/// over one block whose first token is `t0` (raw, zero-width and mixed-width blocks, or
/// any block without VNNI; `_ahead`, [`values_tile_int`]'s prefetch source, is not used).
///
/// # Safety
/// As [`weighted_values`]; `d == 64 NC`; heads `j0 .. j0 + NH` within `g`.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma,f16c,bmi2")]
unsafe fn values_tile<const NH: usize, const NC: usize>(
    b: &Block,
    _ahead: *const u8,
    d: usize,
    probs: &[f32],
    t_total: usize,
    t0: usize,
    j0: usize,
    out: &mut [f32],
) {
    let op = out.as_mut_ptr();
    let mut acc = [[_mm512_setzero_ps(); 16]; NH];
    for (j, row) in acc.iter_mut().enumerate() {
        for (v, a) in row.iter_mut().enumerate().take(4 * NC) {
            // SAFETY: (j0 + j) * d + 16 v + 16 <= g * d by the caller.
            *a = unsafe { _mm512_loadu_ps(op.add((j0 + j) * d + 16 * v)) };
        }
    }
    let widx = widen_idx();
    let (cp, mut co) = (b.codes.as_ptr(), 0usize);
    let pp = probs.as_ptr();
    for (i, m) in b.meta.iter().enumerate() {
        if m.bits == 0 {
            continue;
        }
        let t = t0 + i;
        let sc = if m.bits == RAW { 1.0 } else { h2f_f16c(m.s) };
        let mut w = [_mm512_setzero_ps(); NH];
        for (j, wj) in w.iter_mut().enumerate() {
            // SAFETY: (j0 + j) * t_total + t < probs.len() by the caller.
            *wj = _mm512_set1_ps(unsafe { *pp.add((j0 + j) * t_total + t) } * sc);
        }
        if m.bits == RAW {
            for v in 0..4 * NC {
                // SAFETY: a raw group holds 2 d bytes at `co`.
                let x = unsafe { raw16(cp.add(co + 32 * v)) };
                for j in 0..NH {
                    acc[j][v] = _mm512_fmadd_ps(w[j], x, acc[j][v]);
                }
            }
            co += 2 * d;
        } else {
            let nb = m.bits as usize;
            for c in 0..NC {
                // SAFETY: the group's 8 bits bytes per chunk are inside the codes.
                let wc = unsafe { codes64(cp.add(co + 8 * c * nb), m.bits, 64) };
                for qd in 0..4 {
                    // SAFETY: features enabled.
                    let x = unsafe { widen(wc, &widx, qd) };
                    for j in 0..NH {
                        acc[j][4 * c + qd] = _mm512_fmadd_ps(w[j], x, acc[j][4 * c + qd]);
                    }
                }
            }
            co += d * nb / 8;
        }
    }
    for (j, row) in acc.iter().enumerate() {
        for (v, a) in row.iter().enumerate().take(4 * NC) {
            // SAFETY: as for the loads above.
            unsafe { _mm512_storeu_ps(op.add((j0 + j) * d + 16 * v), *a) };
        }
    }
}

/// Per 16 channels `c`, the `vpermt2b` indices that put code `16 c + k` of token `a`
/// (the first table) in word 0 of dword `k` and that of token `b` (the second, index
/// `64 +`) in word 1; the high bytes of both words are zeroed by [`WORD_LOW`].
static PAIR_IDX: [[u8; 64]; 4] = {
    let mut t = [[0u8; 64]; 4];
    let mut c = 0;
    while c < 4 {
        let mut k = 0;
        while k < 16 {
            t[c][4 * k] = (16 * c + k) as u8;
            t[c][4 * k + 2] = (64 + 16 * c + k) as u8;
            k += 1;
        }
        c += 1;
    }
    t
};

/// Byte 0 of every word.
const WORD_LOW: u64 = 0x5555_5555_5555_5555;

/// [`values_tile`] in integers, for a block whose groups are quantized at one width
/// (1..=8): per head, the weights `p * s` of the block's tokens are rounded to 16 bits
/// against their largest (`w_i = round(32767 p_i s_i / max)`, an error of at most
/// `max / 65534` per token), two tokens' codes are interleaved as 16-bit pairs per
/// channel (`vpermt2b`), and `vpdpwssd` adds both tokens' `w * c` to 32-bit sums (at most
/// 64 * 32767 * 255 < 2^31), which are scaled back (`max / 32767`) into the f32 rows at
/// the end of the block. Twice the products per instruction of the f32 tiles, and no
/// conversion of codes to floats.
/// Each pair of tokens prefetches the line a block ahead (`ahead`, as in
/// [`scores_block_int`]).
///
/// # Safety
/// As [`values_tile`], and AVX512_VNNI; `b`'s groups share one width (1..=8, [`kind`]).
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,avx2,fma,f16c,bmi2")]
unsafe fn values_tile_int<const NH: usize, const NC: usize>(
    b: &Block,
    ahead: *const u8,
    d: usize,
    probs: &[f32],
    t_total: usize,
    t0: usize,
    j0: usize,
    out: &mut [f32],
) {
    let n = b.len();
    let gb = d * b.meta[0].bits as usize / 8;
    assert!(n <= BLOCK && t0 + n <= t_total && (1..=8).contains(&b.meta[0].bits) && b.codes.len() >= n * gb);
    debug_assert!(b.meta.iter().all(|m| m.bits == b.meta[0].bits));
    // The block's steps, then per head its 16-bit weights (an even count, the pad 0)
    // and the scale back.
    let mut steps = [0f32; BLOCK];
    for i0 in (0..n).step_by(16) {
        // SAFETY: i0 < n; 16 floats at i0 < BLOCK.
        unsafe { _mm512_storeu_ps(steps.as_mut_ptr().add(i0), meta16(b, i0, _mm512_setzero_ps()).0) };
    }
    let mut w16 = [[0i16; BLOCK]; NH];
    let mut back = [0f32; NH];
    for j in 0..NH {
        let row = probs[(j0 + j) * t_total + t0..].as_ptr();
        let mut wf = [_mm512_setzero_ps(); BLOCK / 16];
        let mut mx = _mm512_setzero_ps();
        for (c, w) in wf.iter_mut().enumerate() {
            let i = 16 * c;
            if i >= n {
                break;
            }
            let keep: __mmask16 = if n - i >= 16 { 0xffff } else { (1u16 << (n - i)) - 1 };
            // SAFETY: the lanes of `keep` are tokens t0 + i .. t0 + n of the row.
            *w = unsafe {
                _mm512_mul_ps(_mm512_maskz_loadu_ps(keep, row.add(i)), _mm512_loadu_ps(steps.as_ptr().add(i)))
            };
            mx = _mm512_max_ps(mx, *w);
        }
        let mx = _mm512_reduce_max_ps(mx);
        if mx <= 0.0 {
            continue;
        }
        back[j] = mx / 32767.0;
        let to = _mm512_set1_ps(32767.0 / mx);
        for (c, w) in wf.iter().enumerate().take(n.div_ceil(16)) {
            let r = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_min_ps(
                _mm512_mul_ps(*w, to),
                _mm512_set1_ps(32767.0),
            )));
            // SAFETY: 16 words at 16 c < BLOCK.
            unsafe { _mm256_storeu_si256(w16[j].as_mut_ptr().add(16 * c) as *mut __m256i, r) };
        }
        w16[j][n..].fill(0);
    }
    let mut acc = [[_mm512_setzero_si512(); 16]; NH];
    let pidx: [__m512i; 4] =
        // SAFETY: 64 bytes each.
        std::array::from_fn(|c| unsafe { _mm512_loadu_si512(PAIR_IDX[c].as_ptr() as *const _) });
    let (cp, len) = (b.codes.as_ptr(), b.codes.len());
    let bits = b.meta[0].bits;
    // SAFETY: width 1..=8 (asserted).
    let u = unsafe { Unpack::new(bits, 64) };
    let mut i = 0usize;
    while i < n {
        let co = i * gb;
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(co) as *const i8);
        for c in 0..NC {
            // SAFETY: each group's 8 bits bytes per chunk are inside the codes; the
            // second token of an odd block's last pair is the first again (weight 0).
            let (ca, cb) = unsafe {
                let at = co + 8 * c * bits as usize;
                let ca = u.load_in(cp.add(at), len - at);
                let cb = if i + 1 < n { u.load_in(cp.add(at + gb), len - at - gb) } else { ca };
                (ca, cb)
            };
            for k in 0..4 {
                let x = _mm512_maskz_permutex2var_epi8(WORD_LOW, ca, pidx[k], cb);
                for j in 0..NH {
                    // SAFETY: i + 1 < BLOCK: the pair (w_i, w_i+1) as one dword.
                    let wp = _mm512_set1_epi32(unsafe { (w16[j].as_ptr().add(i) as *const i32).read_unaligned() });
                    acc[j][4 * c + k] = _mm512_dpwssd_epi32(acc[j][4 * c + k], x, wp);
                }
            }
        }
        i += 2;
    }
    let op = out.as_mut_ptr();
    for j in 0..NH {
        let bk = _mm512_set1_ps(back[j]);
        for v in 0..4 * NC {
            // SAFETY: (j0 + j) * d + 16 v + 16 <= g * d by the caller.
            unsafe {
                let o = op.add((j0 + j) * d + 16 * v);
                _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[j][v]), bk, _mm512_loadu_ps(o)));
            }
        }
    }
}

#[cfg(test)]
#[path = "attention512_tests.rs"]
mod tests;
