//! The quantized matmul's dispatching kernels: activation quantization
//! ([`quantize_input`]) and one task of the matmul ([`matmul_task`]: a range of weight
//! rows against every activation row), each choosing between the portable references
//! (`simd::qref`) and the x86 kernels (`simd::x86::qdot` for the 32-value formats at the
//! AVX2 or VNNI level, `simd::x86::qdot_k` for the k-quants, and from 8 activation rows
//! their GEMMs `simd::x86::qgemm` and `simd::x86::qgemm_k`, VNNI or AVX2) by the level.
//!
//! Every output is computed the same way whatever the number of activation rows and
//! whichever rows share the call: the kernels compute 1 to 4 activation rows (times 1
//! or 2 weight rows) at once, and each output equals the single-row one (and the
//! reference) bit for bit, whichever kernel ran it. Float weights take the f32 kernels
//! of [`super::linear_rows`] (bit-exact).
//!
//! At the VNNI level, `Q4_0`, `Q4_1` and `Q8_0` weights are stored *interleaved*
//! ([`interleaves`], [`interleave_rows`]): the same bytes as the GGUF rows, reordered
//! once at load so that the VNNI GEMM reads them in place at every number of rows,
//! instead of unpacking and transposing a task's weights on every call.

use super::ggml::{InputKind, QFormat, QInput, QK, QK_K};
#[cfg(target_arch = "x86_64")]
use super::level::{avx2, vnni};
pub(crate) use super::qref::OutTile;
use super::qref::{self, InRow, RowMut};
use super::scalar;
#[cfg(target_arch = "x86_64")]
use super::x86::{matmul, qdot, qdot_k, qgemm, qgemm_k};
use crate::pool::ParallelFor;

/// Activation rows per step of the multi-row kernels.
const ROWS: usize = 4;
/// Activation rows from which the quantized formats take the GEMMs (AVX2 level; `Q8_0`
/// at the VNNI level only).
const GEMM_ROWS: usize = 8;
/// Activation rows from which interleaved weights are still unpacked per call (their
/// 4-bit codes split once, not once per register tile).
const REPACK_ROWS: usize = 32;
/// Activation rows per GEMM call (the rows one packed weight row meets before the next).
const GEMM_TILE: usize = 64;
/// Weight rows of a float format converted to f32 at a time.
const FLOAT_ROWS: usize = 16;

/// Activation rows from which the quantization runs on the pool.
const PARALLEL_ROWS: usize = 32;
/// Activation rows per task of a parallel quantization.
const ROWS_PER_TASK: usize = 8;

/// Resizes `input` for `m` rows of `cols` values of `kind` and quantizes `x` into it
/// (`x` holds at least `m * cols` values; `cols` a multiple of the kind's block), each
/// row alone (on `pool` from [`PARALLEL_ROWS`] rows).
pub(crate) fn quantize_input(
    pool: &dyn ParallelFor,
    input: &mut QInput,
    kind: InputKind,
    x: &[f32],
    m: usize,
    cols: usize,
) {
    input.kind = Some(kind);
    input.m = m;
    input.cols = cols;
    let st = match kind {
        InputKind::Float => {
            input.f.clear();
            input.f.extend_from_slice(&x[..m * cols]);
            return;
        }
        InputKind::Q8x32 => {
            let nbp = (cols / QK).div_ceil(8) * 8;
            // (At the VNNI level the interleaved weights take the GEMM at every `m`.)
            let gemm = (m >= GEMM_ROWS || vnni_level()) && avx2_level();
            [cols, nbp, nbp, nbp, if gemm { 32 * nbp } else { 0 }]
        }
        InputKind::Q8x256 => {
            let gemm = m >= GEMM_ROWS && avx2_level();
            [cols, cols / QK_K, cols / 16, 0, if gemm { cols } else { 0 }]
        }
    };
    input.nbp = st[1];
    input.qs.resize(m * st[0], 0);
    input.d.resize(m * st[1], 0.0);
    input.sums.resize(m * st[2], 0);
    input.s.resize(m * st[3], 0.0);
    input.qsi.resize(m * st[4], 0);
    // The padding of the per-block rows must be 0 (the kernels read whole groups).
    if kind == InputKind::Q8x32 && st[1] * QK > cols {
        for i in 0..m {
            let pad = i * st[1] + cols / QK..(i + 1) * st[1];
            input.d[pad.clone()].fill(0.0);
            input.sums[pad.clone()].fill(0);
            input.s[pad].fill(0.0);
        }
    }
    let raw = RawRows {
        qs: input.qs.as_mut_ptr(),
        d: input.d.as_mut_ptr(),
        sums: input.sums.as_mut_ptr(),
        s: input.s.as_mut_ptr(),
        qsi: input.qsi.as_mut_ptr(),
        st,
    };
    let row = |i: usize| {
        // SAFETY: every buffer holds `m` rows of its stride (resized above), and each
        // row is written by one call only.
        let r = unsafe { raw.row(i) };
        quantize_row(kind, &x[i * cols..][..cols], r);
    };
    if m >= PARALLEL_ROWS && pool.threads() > 1 {
        pool.parallel_for(m.div_ceil(ROWS_PER_TASK), &|t| {
            (t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(m)).for_each(row);
        });
    } else {
        (0..m).for_each(row);
    }
}

/// Whether a weight matrix of format `f` is stored in the interleaved layout at this
/// process's level (see [`interleave_rows`]): at the VNNI level, `Q4_0`, `Q4_1` and
/// `Q8_0`, whose products then all run on `qgemm::gemm_interleaved_vnni`.
/// `QAQ_KERNELS_NO_INTERLEAVE` keeps the GGUF order (the results are the same; for
/// comparing speeds).
pub(crate) fn interleaves(f: QFormat) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var_os("QAQ_KERNELS_NO_INTERLEAVE").is_some());
    #[cfg(target_arch = "x86_64")]
    return !off && vnni() && matches!(f, QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q8_0);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (f, off);
        false
    }
}

/// Reorders the rows in `data` (whole rows of `nb` blocks of `f`: `Q4_0`, `Q4_1` or
/// `Q8_0`) from GGUF order into the interleaved layout, or back when `back`. The
/// interleaved layout keeps each row's bytes in place as a whole and each group of 8
/// consecutive blocks (the last group may hold fewer, `c`) in its own bytes, but within a
/// group stores first the code bytes, 4 at a time: code bytes `4k..4k + 4` of block `t`
/// at `4 * (c * k + t)` (so that one 32-byte load gives the 8 blocks' bytes `4k..4k + 4`,
/// block `t` in 32-bit lane `t`), then the `c` f16 scales, then (`Q4_1`) the `c` f16
/// minimums. The size is unchanged; nothing is added.
pub(crate) fn interleave_rows(f: QFormat, data: &mut [u8], nb: usize, back: bool) {
    assert!(matches!(f, QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q8_0), "no interleaved layout for {f}");
    let bb = f.block_bytes();
    let head = if f == QFormat::Q4_1 { 4 } else { 2 };
    let cb = bb - head;
    assert!(nb > 0 && data.len().is_multiple_of(nb * bb), "whole rows of {nb} blocks");
    let mut tmp = vec![0u8; 8 * bb];
    for row in data.chunks_exact_mut(nb * bb) {
        for group in row.chunks_mut(8 * bb) {
            let c = group.len() / bb;
            let tmp = &mut tmp[..group.len()];
            // Moves `len` bytes between GGUF position `g` and interleaved position `i`.
            let mut mv = |g: usize, i: usize, len: usize| {
                let (from, to) = if back { (i, g) } else { (g, i) };
                tmp[to..to + len].copy_from_slice(&group[from..from + len]);
            };
            for t in 0..c {
                mv(t * bb, c * cb + 2 * t, 2);
                if head == 4 {
                    mv(t * bb + 2, c * cb + 2 * c + 2 * t, 2);
                }
                for k in 0..cb / 4 {
                    mv(t * bb + head + 4 * k, 4 * (c * k + t), 4);
                }
            }
            group.copy_from_slice(tmp);
        }
    }
}

/// Whether the AVX2 kernels (and so the GEMMs) run (false off x86-64).
fn avx2_level() -> bool {
    #[cfg(target_arch = "x86_64")]
    return avx2();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the VNNI kernels run (false off x86-64).
fn vnni_level() -> bool {
    #[cfg(target_arch = "x86_64")]
    return vnni();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The buffers of a [`QInput`] being filled, with their row strides (`qs`, `d`, `sums`,
/// `s`, `qsi`).
struct RawRows {
    qs: *mut i8,
    d: *mut f32,
    sums: *mut i32,
    s: *mut f32,
    qsi: *mut i8,
    st: [usize; 5],
}

// SAFETY: plain addresses; the threads that share a `RawRows` write disjoint rows.
unsafe impl Sync for RawRows {}

impl RawRows {
    /// Row `i`'s buffers.
    ///
    /// # Safety
    /// Every buffer holds row `i` whole, and nothing else accesses it meanwhile.
    unsafe fn row<'a>(&self, i: usize) -> RowMut<'a> {
        let st = self.st;
        // SAFETY: the caller's contract.
        unsafe {
            RowMut {
                qs: std::slice::from_raw_parts_mut(self.qs.add(i * st[0]), st[0]),
                d: std::slice::from_raw_parts_mut(self.d.add(i * st[1]), st[1]),
                sums: std::slice::from_raw_parts_mut(self.sums.add(i * st[2]), st[2]),
                s: std::slice::from_raw_parts_mut(self.s.add(i * st[3]), st[3]),
                qsi: std::slice::from_raw_parts_mut(self.qsi.add(i * st[4]), st[4]),
            }
        }
    }
}

/// One row: the AVX2 quantizer (bit-exact with `qref::quantize_row`) or the reference,
/// then the GEMM's interleaved codes when wanted.
fn quantize_row(kind: InputKind, x: &[f32], r: RowMut<'_>) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        if kind == InputKind::Q8x32 {
            for (b, (xb, qb)) in x.chunks_exact(QK).zip(r.qs.chunks_exact_mut(QK)).enumerate() {
                // SAFETY: AVX2 and FMA detected; 32 values, 32 codes.
                (r.d[b], r.sums[b], r.s[b]) = unsafe { qdot::quantize32(xb, qb) };
            }
            if !r.qsi.is_empty() {
                // SAFETY: AVX2 detected; bounds are checked by the callee.
                unsafe { qgemm::interleave(r.qs, r.qsi) };
            }
        } else {
            for (b, (xb, qb)) in x.chunks_exact(QK_K).zip(r.qs.chunks_exact_mut(QK_K)).enumerate() {
                // SAFETY: AVX2 and FMA detected; 256 values, 256 codes, 16 sums.
                r.d[b] = unsafe { qdot::quantize256(xb, qb, &mut r.sums[b * 16..][..16]) };
            }
            if !r.qsi.is_empty() {
                // SAFETY: AVX2 detected; bounds are checked by the callee.
                unsafe { qgemm::interleave(r.qs, r.qsi) };
            }
        }
        return;
    }
    qref::quantize_row(kind, x, r);
}

/// One task of the matmul: the `n` weight rows `w` (whole rows of format `f`, `cols`
/// values each) against every row of `input` (`cols` values per row, quantized for
/// `f`); writes output `(i, j)` for `i < input.rows()`, `j < n` into `out`. Activation
/// rows go by 4 (then one by one), each step over all `n` weight rows (which stay in
/// cache across the steps).
///
/// # Safety
/// Every element `(i, j)` of `out` in that range is valid for writes, and no one else
/// accesses them during the call.
pub(crate) unsafe fn matmul_task(
    f: QFormat,
    interleaved: bool,
    w: &[u8],
    n: usize,
    cols: usize,
    input: &QInput,
    out: OutTile,
) {
    let m = input.m;
    if f.input_kind() == InputKind::Float {
        // SAFETY: forwarded contract.
        unsafe { float_task(f, w, n, cols, &input.f, m, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if interleaved {
        assert!(interleaves(f) && !input.qsi.is_empty(), "interleaved {f} weights at this level");
        let rows: Vec<InRow<'_>> = (0..m).map(|i| input.row(i)).collect();
        // SAFETY: forwarded contract; VNNI (`interleaves`), interleaved codes (checked).
        unsafe { gemm_task(f, true, w, n, cols, input, &rows, out) };
        return;
    }
    assert!(!interleaved, "interleaved weights off x86-64");
    #[cfg(target_arch = "x86_64")]
    if m >= GEMM_ROWS && !input.qsi.is_empty() && (vnni() || f != QFormat::Q8_0) {
        let rows: Vec<InRow<'_>> = (0..m).map(|i| input.row(i)).collect();
        // SAFETY: forwarded contract; `qsi` is only filled at the AVX2 level; the
        // condition above.
        unsafe { gemm_task(f, false, w, n, cols, input, &rows, out) };
        return;
    }
    if m == 1 {
        // SAFETY: row 0's columns 0..n of the tile are contiguous, valid and this
        // task's alone (the contract).
        let dst = unsafe { std::slice::from_raw_parts_mut(out.ptr, n) };
        rows_task(f, w, n, cols, &[input.row(0)], dst);
        return;
    }
    thread_local! {
        static RES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    RES.with_borrow_mut(|res| {
        res.resize(n * ROWS, 0.0);
        let mut i = 0;
        while i < m {
            let r = if m - i >= ROWS { ROWS } else { 1 };
            if r == ROWS {
                rows_task(f, w, n, cols, &std::array::from_fn::<_, ROWS, _>(|k| input.row(i + k)), res);
            } else {
                rows_task(f, w, n, cols, &[input.row(i)], res);
            }
            for j in 0..n {
                for k in 0..r {
                    // SAFETY: (i + k, j) is in this task's range (the contract).
                    unsafe { out.put(i + k, j, res[j * r + k]) };
                }
            }
            i += r;
        }
    });
}

/// [`matmul_task`] with the GEMMs (VNNI, else AVX2): the weight rows packed once (unless
/// `interleaved`: then read in place), then every tile of [`GEMM_TILE`] activation rows
/// against them.
///
/// # Safety
/// As [`matmul_task`]; the CPU supports the AVX2 level (and VNNI when [`vnni()`] or
/// `interleaved`); `input.qsi` holds the interleaved codes; `f` is not `Q8_0` without
/// VNNI.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_task(
    f: QFormat,
    interleaved: bool,
    w: &[u8],
    n: usize,
    cols: usize,
    input: &QInput,
    rows: &[InRow<'_>],
    out: OutTile,
) {
    type Scratch = (qgemm::Packed, qgemm_k::PackedK, Vec<f32>);
    /// One GEMM call: activation rows, their interleaved codes, the results.
    type Gemm<'a> = &'a dyn Fn(&[InRow<'_>], &[i8], &mut [f32]);
    /// One GEMM call that writes its outputs itself.
    type GemmOut<'a> = &'a dyn Fn(&[InRow<'_>], &[i8], OutTile);
    thread_local! {
        /// Each thread's packed weights and results, kept between calls (no allocation
        /// or page faults in the steady state).
        static SCRATCH: std::cell::RefCell<Scratch> = Default::default();
    }
    let (m, vn) = (input.m, vnni());
    let stride = input.qsi.len() / m;
    SCRATCH.with_borrow_mut(|(packed, packed_k, res)| {
        // Runs `gemm` on every tile of activation rows, into `out`.
        let direct = |gemm: GemmOut<'_>| {
            for i0 in (0..m).step_by(GEMM_TILE) {
                let mt = (m - i0).min(GEMM_TILE);
                gemm(&rows[i0..i0 + mt], &input.qsi[i0 * stride..], out.rows_from(i0));
            }
        };
        // Runs `gemm` on every tile of activation rows and writes its results out.
        let mut tiles = |gemm: Gemm<'_>| {
            res.resize(n * GEMM_TILE.min(m), 0.0);
            for i0 in (0..m).step_by(GEMM_TILE) {
                let mt = (m - i0).min(GEMM_TILE);
                gemm(&rows[i0..i0 + mt], &input.qsi[i0 * stride..], &mut res[..n * mt]);
                for j in 0..n {
                    for i in 0..mt {
                        // SAFETY: (i0 + i, j) is in this task's range (the contract).
                        unsafe { out.put(i0 + i, j, res[j * mt + i]) };
                    }
                }
            }
        };
        macro_rules! go {
            ($($i:ident),*; $($c:ident),*; $($k:ident),*) => {
                match f.block_values() {
                    QK => match qdot::code(f) {
                        $(qdot::$i if interleaved && m >= REPACK_ROWS => {
                            // SAFETY: VNNI (the contract); bounds are checked by the
                            // callees.
                            unsafe { qgemm::pack_interleaved_vnni::<{ qdot::$i }>(w, n, cols / QK, packed) };
                            // SAFETY: as above; `packed` holds the `n` rows; the tile's
                            // outputs are this task's (the contract).
                            direct(&|x, xi, o| unsafe { qgemm::gemm_vnni::<{ qdot::$i }>(packed, n, x, xi, o) });
                        },)*
                        $(qdot::$i if interleaved => {
                            // SAFETY: VNNI (the contract); bounds are checked by the
                            // callee; the tile's outputs are this task's.
                            direct(&|x, xi, o| unsafe {
                                qgemm::gemm_interleaved_vnni::<{ qdot::$i }>(w, n, cols / QK, x, xi, o)
                            });
                        },)*
                        $(qdot::$c => {
                            // SAFETY: VNNI detected (bounds are checked by the callees).
                            unsafe {
                                if vn {
                                    qgemm::pack_vnni::<{ qdot::$c }>(w, n, cols / QK, packed)
                                } else {
                                    qgemm::pack_avx2::<{ qdot::$c }>(w, n, cols / QK, packed)
                                }
                            };
                            // SAFETY: as above; `packed` holds the `n` rows of format `f`
                            // for this ISA; the tile's outputs are this task's.
                            direct(&|x, xi, o| unsafe {
                                if vn {
                                    qgemm::gemm_vnni::<{ qdot::$c }>(packed, n, x, xi, o)
                                } else {
                                    qgemm::gemm_avx2::<{ qdot::$c }>(packed, n, x, xi, o)
                                }
                            });
                        },)*
                        _ => unreachable!(),
                    },
                    _ => match qdot_k::code(f) {
                        $(qdot_k::$k => {
                            // SAFETY: VNNI detected (bounds are checked by the callees).
                            unsafe { qgemm_k::pack_k::<{ qdot_k::$k }>(w, n, packed_k) };
                            // SAFETY: as above; `packed_k` holds the `n` rows of format `f`.
                            tiles(&|x, xi, r| unsafe {
                                if vn {
                                    qgemm_k::gemm_k_vnni::<{ qdot_k::$k }>(packed_k, n, x, xi, r)
                                } else {
                                    qgemm_k::gemm_k_avx2::<{ qdot_k::$k }>(packed_k, n, x, xi, r)
                                }
                            });
                        },)*
                        _ => unreachable!(),
                    },
                }
            };
        }
        go!(Q4_0, Q4_1, Q8_0; Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; Q2_K, Q3_K, Q4_K, Q5_K, Q6_K);
    });
}

/// `res[j * R + r]` = weight row `j` of `w` times activation row `xs[r]`, at the level's
/// kernels (each output bit-identical to `qref::dot_row`).
fn rows_task<const R: usize>(f: QFormat, w: &[u8], n: usize, cols: usize, xs: &[InRow<'_>; R], res: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        if f.block_values() == QK {
            let (nb, vn) = (cols / QK, vnni());
            macro_rules! go {
                ($($c:ident),*) => {
                    match qdot::code(f) {
                        // SAFETY: the level's features were detected (bounds are
                        // checked by the kernels).
                        $(qdot::$c => unsafe {
                            if vn {
                                qdot::task_vnni::<{ qdot::$c }, R>(w, n, nb, xs, res)
                            } else {
                                qdot::task_avx2::<{ qdot::$c }, R>(w, n, nb, xs, res)
                            }
                        },)*
                        _ => unreachable!(),
                    }
                };
            }
            go!(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0);
        } else {
            macro_rules! go {
                ($($c:ident),*) => {
                    match qdot_k::code(f) {
                        // SAFETY: AVX2 detected (bounds are checked by the kernel).
                        $(qdot_k::$c => unsafe { qdot_k::task_k::<{ qdot_k::$c }, R>(w, n, xs, res) },)*
                        _ => unreachable!(),
                    }
                };
            }
            go!(Q2_K, Q3_K, Q4_K, Q5_K, Q6_K);
        }
        return;
    }
    let rb = w.len() / n.max(1);
    let _ = cols;
    for j in 0..n {
        for (r, x) in xs.iter().enumerate() {
            res[j * R + r] = qref::dot_row(f, &w[j * rb..][..rb], *x);
        }
    }
}

/// A task of a float format: weight rows converted to f32 `FLOAT_ROWS` at a time, then
/// the register blocks of [`super::linear_rows`] (each output bit-identical to
/// `scalar::row_dot`).
///
/// # Safety
/// As [`matmul_task`].
unsafe fn float_task(f: QFormat, w: &[u8], n: usize, k: usize, x: &[f32], m: usize, out: OutTile) {
    let rb = k * f.block_bytes();
    let mut wf = vec![0f32; FLOAT_ROWS * k];
    let mut t = vec![0f32; FLOAT_ROWS * m];
    for j0 in (0..n).step_by(FLOAT_ROWS) {
        let cols = (n - j0).min(FLOAT_ROWS);
        for jj in 0..cols {
            qref::dequantize_row(f, &w[(j0 + jj) * rb..][..rb], &mut wf[jj * k..][..k]);
        }
        let (wt, tt) = (&wf[..cols * k], &mut t[..cols * m]);
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: AVX2 and FMA detected; `x` holds `m * k`, `wt` `cols * k`, `tt`
            // `cols * m` floats.
            unsafe { matmul::linear_block(x, m, wt, cols, k, tt) };
        } else {
            scalar::linear_block(x, m, wt, k, tt);
        }
        #[cfg(not(target_arch = "x86_64"))]
        scalar::linear_block(x, m, wt, k, tt);
        for jj in 0..cols {
            for i in 0..m {
                // SAFETY: (i, j0 + jj) is in this task's range (the contract).
                unsafe { out.put(i, j0 + jj, tt[jj * m + i]) };
            }
        }
    }
}
