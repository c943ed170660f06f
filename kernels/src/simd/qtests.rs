//! Tests of the quantized matmul's kernels against their portable references, bit for
//! bit: the activation quantizer, and every x86 kernel at every instruction set this CPU
//! has (AVX2 and, when present, VNNI), whatever the process level, for 1 and 4 rows at
//! once, and the VNNI GEMMs; plus the level's dispatch (`qdot::matmul_task`). Weights are
//! random bytes with finite random scales (every code pattern, `Q8_0`'s -128 included)
//! and the reference quantizers' output.

use super::ggml::{InputKind, QFormat, QInput, QK};
use super::qdot::{self, OutTile};
use super::qref::{self, InRow};
use crate::qmat::QMatrix;
use crate::testutil::{Rng, activations, random_blocks};

/// The reference quantization of `x`.
fn reference_input(f: QFormat, x: &[f32], m: usize, cols: usize) -> QInput {
    let mut q = QInput::new(f, x, m, cols).unwrap();
    let kind = f.input_kind();
    let (n, n16) = (q.nbp, cols / 16);
    for i in 0..m {
        let xr = &x[i * cols..][..cols];
        let qs = &mut q.qs[i * cols..][..cols];
        let r = match kind {
            InputKind::Q8x32 => qref::RowMut {
                qs,
                d: &mut q.d[i * n..][..n],
                sums: &mut q.sums[i * n..][..n],
                s: &mut q.s[i * n..][..n],
                qsi: &mut [],
            },
            _ => qref::RowMut {
                qs,
                d: &mut q.d[i * n..][..n],
                sums: &mut q.sums[i * n16..][..n16],
                s: &mut [],
                qsi: &mut [],
            },
        };
        qref::quantize_row(kind, xr, r);
    }
    q
}

const QUANTIZED: [QFormat; 10] = [
    QFormat::Q4_0,
    QFormat::Q4_1,
    QFormat::Q5_0,
    QFormat::Q5_1,
    QFormat::Q8_0,
    QFormat::Q2_K,
    QFormat::Q3_K,
    QFormat::Q4_K,
    QFormat::Q5_K,
    QFormat::Q6_K,
];

#[test]
fn activation_quantizer_matches_reference_bit_for_bit() {
    let mut rng = Rng(7);
    for kind_f in [QFormat::Q8_0, QFormat::Q4_K] {
        for (cols, m) in [(256, 3), (512, 40), (1536, 2)] {
            let mut x = activations(m * cols, &mut rng);
            x[5] = -0.0;
            let fast = QInput::new(kind_f, &x, m, cols).unwrap();
            let slow = reference_input(kind_f, &x, m, cols);
            assert_eq!(fast.qs, slow.qs);
            assert_eq!(fast.sums, slow.sums);
            assert_eq!(
                fast.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                slow.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(
                fast.s.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                slow.s.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}

#[test]
fn quantized_codes_and_sums_are_consistent() {
    let mut rng = Rng(3);
    let x = activations(2 * 512, &mut rng);
    let q = QInput::new(QFormat::Q4_1, &x, 2, 512).unwrap();
    assert_eq!(q.kind(), Some(InputKind::Q8x32));
    for i in 0..2 {
        let r = q.row(i);
        for b in 0..512 / QK {
            let codes = &r.qs[b * QK..][..QK];
            assert_eq!(r.sums[b], codes.iter().map(|&c| c as i32).sum::<i32>());
            let amax = x[i * 512 + b * QK..][..QK].iter().fold(0f32, |a, v| a.max(v.abs()));
            // ggml's q8_0 / q8_1: the scale stored in f16, the codes from the f32 scale.
            let d = amax / 127.0;
            assert_eq!(r.d[b], half::f16::from_f32(d).to_f32());
            let s = half::f16::from_f32(half::f16::from_f32(r.sums[b] as f32).to_f32() * r.d[b]).to_f32();
            assert_eq!(r.s[b], s);
            for (e, &c) in codes.iter().enumerate() {
                let v = x[i * 512 + b * QK + e];
                assert!((v - c as f32 * d).abs() <= d * 0.5001, "{v} vs {c}");
            }
        }
        assert!(r.d[512 / QK..].iter().all(|&d| d == 0.0), "padding");
    }
}

/// Halves round away from zero (ggml's `roundf`), at every level; k-quant activations take
/// the sign of the value of largest magnitude (ggml's `q8_K`: `iscale = -127 / max`).
#[test]
fn activation_codes_round_halves_away_from_zero_as_ggml_does() {
    // One block whose scale is exactly 1: 127 is the largest magnitude.
    let mut x = vec![0f32; 256];
    x[..8].copy_from_slice(&[127.0, 2.5, -2.5, 1.5, -0.5, 0.5, 3.49, -3.51]);
    let q = QInput::new(QFormat::Q8_0, &x, 1, 256).unwrap();
    let r = q.row(0);
    assert_eq!(r.d[0], 1.0);
    assert_eq!(r.qs[..8], [127, 3, -3, 2, -1, 1, 3, -4]);
    let q = QInput::new(QFormat::Q4_K, &x, 1, 256).unwrap();
    let r = q.row(0);
    assert_eq!(r.d[0], -1.0, "iscale = -127 / 127");
    assert_eq!(r.qs[..8], [-127, -3, 3, -2, 1, -1, -3, 4]);
    assert_eq!(r.sums[0], r.qs[..16].iter().map(|&c| c as i32).sum::<i32>());
}

/// The x86 kernels at each instruction set of this CPU, against `qref::dot_row`.
#[cfg(target_arch = "x86_64")]
#[test]
fn x86_kernels_match_reference_bit_for_bit_at_every_isa() {
    use super::x86::{qdot as k32, qdot_k as kk};
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")) {
        return;
    }
    let has_vnni = is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl");
    let mut rng = Rng(11);
    for f in QUANTIZED {
        let widths: &[usize] = if f.block_values() == QK { &[32, 96, 256, 576, 800, 1536] } else { &[256, 768, 1536] };
        for &cols in widths {
            let rows = 3;
            for from_floats in [false, true] {
                let data = if from_floats {
                    let v: Vec<f32> = (0..rows * cols).map(|_| rng.f()).collect();
                    QMatrix::from_f32(f, rows, cols, &v).unwrap().into_data()
                } else {
                    random_blocks(f, rows, cols, &mut rng)
                };
                let x = activations(4 * cols, &mut rng);
                let input = QInput::new(f, &x, 4, cols).unwrap();
                let rows4: [InRow<'_>; 4] = std::array::from_fn(|i| input.row(i));
                let rb = f.row_bytes(cols).unwrap();
                for j in 0..rows {
                    let wr = &data[j * rb..][..rb];
                    let want: Vec<u32> = (0..4).map(|i| qref::dot_row(f, wr, input.row(i)).to_bits()).collect();
                    let mut got: Vec<(&str, [f32; 4])> = Vec::new();
                    let mut res = [0f32; 4];
                    if f.block_values() == QK {
                        let nb = cols / QK;
                        macro_rules! run {
                            ($c:ident) => {{
                                // SAFETY: features detected (bounds checked by the kernels).
                                unsafe { k32::task_avx2::<{ k32::$c }, 4>(wr, 1, nb, &rows4, &mut res) };
                                got.push(("avx2 x4", res));
                                for i in 0..4 {
                                    // SAFETY: as above.
                                    unsafe { k32::task_avx2::<{ k32::$c }, 1>(wr, 1, nb, &[rows4[i]], &mut res) };
                                    assert_eq!(res[0].to_bits(), want[i], "{f} avx2 x1 cols {cols}");
                                }
                                if has_vnni {
                                    // SAFETY: VNNI, BW, VL detected.
                                    unsafe { k32::task_vnni::<{ k32::$c }, 4>(wr, 1, nb, &rows4, &mut res) };
                                    got.push(("vnni x4", res));
                                    for i in 0..4 {
                                        // SAFETY: as above.
                                        unsafe { k32::task_vnni::<{ k32::$c }, 1>(wr, 1, nb, &[rows4[i]], &mut res) };
                                        assert_eq!(res[0].to_bits(), want[i], "{f} vnni x1 cols {cols}");
                                    }
                                }
                            }};
                        }
                        match k32::code(f) {
                            k32::Q4_0 => run!(Q4_0),
                            k32::Q4_1 => run!(Q4_1),
                            k32::Q5_0 => run!(Q5_0),
                            k32::Q5_1 => run!(Q5_1),
                            _ => run!(Q8_0),
                        }
                    } else {
                        macro_rules! run {
                            ($c:ident) => {{
                                // SAFETY: AVX2 detected (bounds checked by the kernel).
                                unsafe { kk::task_k::<{ kk::$c }, 4>(wr, 1, &rows4, &mut res) };
                                got.push(("k x4", res));
                                for i in 0..4 {
                                    // SAFETY: as above.
                                    unsafe { kk::task_k::<{ kk::$c }, 1>(wr, 1, &[rows4[i]], &mut res) };
                                    assert_eq!(res[0].to_bits(), want[i], "{f} k x1 cols {cols}");
                                }
                            }};
                        }
                        match kk::code(f) {
                            kk::Q2_K => run!(Q2_K),
                            kk::Q3_K => run!(Q3_K),
                            kk::Q4_K => run!(Q4_K),
                            kk::Q5_K => run!(Q5_K),
                            _ => run!(Q6_K),
                        }
                    }
                    for (what, g) in got {
                        let g: Vec<u32> = g.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(g, want, "{f} {what} cols {cols} random {}", !from_floats);
                    }
                }
            }
        }
    }
}

/// The level's task (whatever it dispatches to) against the reference, every format.
#[test]
fn matmul_task_matches_reference_at_this_level() {
    let mut rng = Rng(5);
    for f in QFormat::ALL {
        let cols = if f.block_values() == 256 { 512 } else { 576 };
        let (n, m) = (5, 11);
        let data = random_blocks(f, n, cols, &mut rng);
        let x = activations(m * cols, &mut rng);
        let input = QInput::new(f, &x, m, cols).unwrap();
        let rb = f.row_bytes(cols).unwrap();
        let mut inter = data.clone();
        let layouts = if qdot::interleaves(f) {
            qdot::interleave_rows(f, &mut inter, cols / f.block_values(), false);
            &[false, true][..]
        } else {
            &[false][..]
        };
        for &interleaved in layouts {
            let mut out = vec![f32::NAN; m * n];
            let w = if interleaved { &inter } else { &data };
            // SAFETY: `out` holds m * n floats, this thread alone writes them.
            unsafe {
                qdot::matmul_task(f, interleaved, w, n, cols, &input, OutTile { ptr: out.as_mut_ptr(), stride: n })
            };
            for i in 0..m {
                for j in 0..n {
                    let wr = &data[j * rb..][..rb];
                    let want = if f.input_kind() == InputKind::Float {
                        let mut w = vec![0f32; cols];
                        qref::dequantize_row(f, wr, &mut w);
                        super::scalar::row_dot(&x[i * cols..][..cols], &w)
                    } else {
                        qref::dot_row(f, wr, input.row(i))
                    };
                    assert_eq!(out[i * n + j].to_bits(), want.to_bits(), "{f} interleaved {interleaved} ({i}, {j})");
                }
            }
        }
    }
}

/// Whether this CPU has the AVX2 level's features, and VNNI's.
#[cfg(target_arch = "x86_64")]
fn isas() -> (bool, bool) {
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
    let vnni = avx2
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl");
    (avx2, vnni)
}

/// The GEMMs of the 32-value formats (packed weights, interleaved activations, register
/// tiles and their edges) against the reference, at each ISA this CPU has, whatever the
/// process level.
#[cfg(target_arch = "x86_64")]
#[test]
fn gemm_matches_reference_bit_for_bit_at_every_isa() {
    use super::x86::{qdot as k32, qgemm};
    let (avx2, has_vnni) = isas();
    if !avx2 {
        return;
    }
    let mut rng = Rng(17);
    for f in [QFormat::Q4_0, QFormat::Q4_1, QFormat::Q5_0, QFormat::Q5_1, QFormat::Q8_0] {
        for cols in [32, 96, 576, 800] {
            let (n, m) = (7, 11);
            let data = random_blocks(f, n, cols, &mut rng);
            let x = activations(m * cols, &mut rng);
            let input = QInput::new(f, &x, m, cols).unwrap();
            let rows: Vec<InRow<'_>> = (0..m).map(|i| input.row(i)).collect();
            let stride = 32 * input.nbp;
            let mut xi = vec![0i8; m * stride];
            for i in 0..m {
                // SAFETY: AVX2 detected.
                unsafe { qgemm::interleave(&input.qs[i * cols..][..cols], &mut xi[i * stride..][..stride]) };
            }
            let rb = f.row_bytes(cols).unwrap();
            for vn in [false, true] {
                if (vn && !has_vnni) || (!vn && f == QFormat::Q8_0) {
                    continue;
                }
                let mut packed = qgemm::Packed::default();
                let mut res = vec![f32::NAN; n * m];
                let out = OutTile { ptr: res.as_mut_ptr(), stride: n };
                macro_rules! run {
                    ($c:ident) => {{
                        // SAFETY: the ISA's features were detected (bounds checked); `out`
                        // holds m x n outputs.
                        unsafe {
                            if vn {
                                qgemm::pack_vnni::<{ k32::$c }>(&data, n, cols / QK, &mut packed);
                                qgemm::gemm_vnni::<{ k32::$c }>(&packed, n, &rows, &xi, out);
                            } else {
                                qgemm::pack_avx2::<{ k32::$c }>(&data, n, cols / QK, &mut packed);
                                qgemm::gemm_avx2::<{ k32::$c }>(&packed, n, &rows, &xi, out);
                            }
                        }
                    }};
                }
                match k32::code(f) {
                    k32::Q4_0 => run!(Q4_0),
                    k32::Q4_1 => run!(Q4_1),
                    k32::Q5_0 => run!(Q5_0),
                    k32::Q5_1 => run!(Q5_1),
                    _ => run!(Q8_0),
                }
                for j in 0..n {
                    for i in 0..m {
                        let want = qref::dot_row(f, &data[j * rb..][..rb], input.row(i));
                        assert_eq!(res[i * n + j].to_bits(), want.to_bits(), "{f} vnni {vn} cols {cols} ({i}, {j})");
                    }
                }
            }
            // The same rows stored interleaved, read in place, with 1 to `m` rows.
            if !has_vnni || !matches!(f, QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q8_0) {
                continue;
            }
            let mut inter = data.clone();
            qdot::interleave_rows(f, &mut inter, cols / QK, false);
            for mm in [1, 2, 3, 5, m] {
                let mut res = vec![f32::NAN; n * mm];
                let out = OutTile { ptr: res.as_mut_ptr(), stride: n };
                macro_rules! run {
                    ($c:ident) => {
                        // SAFETY: VNNI detected (bounds checked); `out` holds mm x n
                        // outputs.
                        unsafe {
                            qgemm::gemm_interleaved_vnni::<{ k32::$c }>(&inter, n, cols / QK, &rows[..mm], &xi, out)
                        }
                    };
                }
                match f {
                    QFormat::Q4_0 => run!(Q4_0),
                    QFormat::Q4_1 => run!(Q4_1),
                    _ => run!(Q8_0),
                }
                for j in 0..n {
                    for i in 0..mm {
                        let want = qref::dot_row(f, &data[j * rb..][..rb], input.row(i));
                        assert_eq!(
                            res[i * n + j].to_bits(),
                            want.to_bits(),
                            "{f} interleaved cols {cols} m {mm} ({i}, {j})"
                        );
                    }
                }
            }
        }
    }
}

/// The interleaved layout is a reordering of the GGUF bytes: back and forth is the
/// identity, every byte moves, and a group's first code bytes are its blocks' first.
#[test]
fn the_interleaved_layout_round_trips() {
    let mut rng = Rng(23);
    for f in [QFormat::Q4_0, QFormat::Q4_1, QFormat::Q8_0] {
        for cols in [32, 96, 256, 576, 800] {
            let nb = cols / QK;
            let data = random_blocks(f, 3, cols, &mut rng);
            let mut inter = data.clone();
            qdot::interleave_rows(f, &mut inter, nb, false);
            assert_eq!(inter.len(), data.len());
            let mut sorted = (data.clone(), inter.clone());
            sorted.0.sort_unstable();
            sorted.1.sort_unstable();
            assert_eq!(sorted.0, sorted.1, "{f} {cols}: a permutation of the bytes");
            if nb > 1 {
                assert_ne!(inter, data, "{f} {cols}");
            }
            // Block 1's first 4 code bytes follow block 0's.
            let (bb, head) = (f.block_bytes(), if f == QFormat::Q4_1 { 4 } else { 2 });
            if nb > 1 {
                assert_eq!(inter[4..8], data[bb + head..bb + head + 4], "{f} {cols}");
            }
            qdot::interleave_rows(f, &mut inter, nb, true);
            assert_eq!(inter, data, "{f} {cols}");
        }
    }
}

/// The k-quants' GEMMs against the reference, at each ISA this CPU has.
#[cfg(target_arch = "x86_64")]
#[test]
fn k_gemm_matches_reference_bit_for_bit_at_every_isa() {
    use super::x86::{qdot_k as kk, qgemm, qgemm_k};
    let (avx2, has_vnni) = isas();
    if !avx2 {
        return;
    }
    let mut rng = Rng(19);
    for f in [QFormat::Q2_K, QFormat::Q3_K, QFormat::Q4_K, QFormat::Q5_K, QFormat::Q6_K] {
        for (cols, from_floats) in [(256, false), (768, true), (1536, false)] {
            let (n, m) = (5, 11);
            let data = if from_floats {
                let v: Vec<f32> = (0..n * cols).map(|_| rng.f()).collect();
                QMatrix::from_f32(f, n, cols, &v).unwrap().into_data()
            } else {
                random_blocks(f, n, cols, &mut rng)
            };
            let x = activations(m * cols, &mut rng);
            let input = QInput::new(f, &x, m, cols).unwrap();
            let rows: Vec<InRow<'_>> = (0..m).map(|i| input.row(i)).collect();
            let mut xi = vec![0i8; m * cols];
            for i in 0..m {
                // SAFETY: AVX2 detected.
                unsafe { qgemm::interleave(&input.qs[i * cols..][..cols], &mut xi[i * cols..][..cols]) };
            }
            let rb = f.row_bytes(cols).unwrap();
            for vn in [false, true] {
                if vn && !has_vnni {
                    continue;
                }
                let mut packed = qgemm_k::PackedK::default();
                let mut res = vec![f32::NAN; n * m];
                macro_rules! run {
                    ($c:ident) => {{
                        // SAFETY: the ISA's features were detected (bounds checked).
                        unsafe {
                            qgemm_k::pack_k::<{ kk::$c }>(&data, n, &mut packed);
                            if vn {
                                qgemm_k::gemm_k_vnni::<{ kk::$c }>(&packed, n, &rows, &xi, &mut res);
                            } else {
                                qgemm_k::gemm_k_avx2::<{ kk::$c }>(&packed, n, &rows, &xi, &mut res);
                            }
                        }
                    }};
                }
                match kk::code(f) {
                    kk::Q2_K => run!(Q2_K),
                    kk::Q3_K => run!(Q3_K),
                    kk::Q4_K => run!(Q4_K),
                    kk::Q5_K => run!(Q5_K),
                    _ => run!(Q6_K),
                }
                for j in 0..n {
                    for i in 0..m {
                        let want = qref::dot_row(f, &data[j * rb..][..rb], input.row(i));
                        assert_eq!(res[j * m + i].to_bits(), want.to_bits(), "{f} vnni {vn} cols {cols} ({i}, {j})");
                    }
                }
            }
        }
    }
}
