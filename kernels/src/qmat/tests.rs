//! Tests of the quantized matmul's API at the level this process runs (run the suite
//! also with `QAQ_KERNELS_SCALAR=1`, `QAQ_KERNELS_NO_AVX512=1` and
//! `QAQ_KERNELS_NO_VNNI=1`): round trips, products against an f64 reference, batch
//! independence bit for bit, thread-count independence, error paths.

use super::*;
use crate::testutil::{Rng, activations, random_blocks};

/// Smooth-ish weights with a few outliers.
fn weights(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|i| if i % 97 == 13 { rng.f() * 4.0 } else { rng.f() * 0.5 }).collect()
}

/// The largest error allowed for each value of `format` after a round trip, for a
/// block of values `x` (its block or super-block): half a step of the format, plus the
/// scale-quantization effects of the k-quants (their 4/6/8-bit sub-block scales).
fn round_trip_bound(f: QFormat, x: &[f32]) -> f32 {
    let (lo, hi) = x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let amax = lo.abs().max(hi.abs());
    let range = hi - lo.min(0.0);
    let rel16 = 1.0 / 1024.0;
    match f {
        QFormat::F32 => 0.0,
        QFormat::F16 => amax * rel16 / 2.0,
        QFormat::BF16 => amax / 256.0,
        QFormat::Q8_0 => amax / 127.0 * (0.5 + 127.0 * rel16),
        // Signed: the largest magnitude maps to the end with one fewer positive code,
        // so its negation is a whole step away.
        QFormat::Q4_0 => amax / 8.0 * (1.0 + 8.0 * rel16),
        QFormat::Q5_0 => amax / 16.0 * (1.0 + 16.0 * rel16),
        QFormat::Q4_1 => (hi - lo) / 15.0 * (0.5 + 16.0 * rel16) + amax * rel16,
        QFormat::Q5_1 => (hi - lo) / 31.0 * (0.5 + 32.0 * rel16) + amax * rel16,
        // Half a step of the largest sub-block plus what clamping to the quantized
        // sub-block scales and mins can add (a step of the 6- or 4-bit scale codes
        // times the top code, half a step of the min codes).
        QFormat::Q4_K => range / 15.0 * 0.5 + range / 63.0 * 0.5 * 1.05 + range / 63.0,
        QFormat::Q5_K => range / 31.0 * 0.5 + range / 63.0 * 0.5 * 1.05 + range / 63.0,
        QFormat::Q2_K => range / 3.0 * 0.5 + range / 15.0 * 0.5 * 1.05 + range / 15.0,
        // Signed: one step of the largest sub-block (the largest magnitude maps to the
        // end of the code range with one fewer positive code), plus scale rounding.
        QFormat::Q6_K => amax / 32.0 * 1.05 + amax / 127.0 * 0.6,
        QFormat::Q3_K => amax / 4.0 * 1.05 + amax / 32.0 * 2.5,
    }
}

#[test]
fn round_trips_stay_within_each_formats_error() {
    let mut rng = Rng(1);
    let (rows, cols) = (4, 512);
    for f in QFormat::ALL {
        let x = weights(rows * cols, &mut rng);
        let q = QMatrix::from_f32(f, rows, cols, &x).unwrap();
        assert_eq!(q.bytes(), rows * f.row_bytes(cols).unwrap());
        let all = q.dequantize();
        let mut row = vec![0f32; cols];
        let bv = f.block_values();
        let (mut sq_err, mut sq) = (0f64, 0f64);
        for r in 0..rows {
            q.dequantize_row(r, &mut row).unwrap();
            assert_eq!(row, all[r * cols..][..cols], "{f} row {r}");
            for b in 0..cols / bv {
                let (xs, ys) = (&x[r * cols + b * bv..][..bv], &row[b * bv..][..bv]);
                let bound = round_trip_bound(f, xs);
                for (a, y) in xs.iter().zip(ys) {
                    assert!((a - y).abs() <= bound * 1.0001 + 1e-12, "{f}: {a} -> {y}, bound {bound}");
                    sq_err += ((a - y) as f64).powi(2);
                    sq += (*a as f64).powi(2);
                }
            }
        }
        let rel = (sq_err / sq).sqrt();
        let expected = match f {
            QFormat::F32 => 0.0,
            QFormat::F16 | QFormat::BF16 => 0.005,
            QFormat::Q8_0 => 0.02,
            QFormat::Q6_K => 0.06,
            QFormat::Q5_0 | QFormat::Q5_1 | QFormat::Q5_K => 0.1,
            QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q4_K => 0.2,
            QFormat::Q3_K => 0.4,
            QFormat::Q2_K => 0.6,
        };
        assert!(rel <= expected, "{f}: relative RMS error {rel} > {expected}");
    }
}

/// `out[i][j]` against the dot product in f64 of the dequantized weights with the exact
/// activations; the bound is what the activation quantization can move it (half a
/// step of each activation block times the weights' magnitudes) plus float rounding.
pub(super) fn check_against_f64(w: &QMatrix, x: &[f32], m: usize, out: &[f32]) {
    let (n, k) = (w.rows(), w.cols());
    let wf = w.dequantize();
    let ab = match w.format().input_kind() {
        InputKind::Float => 0,
        InputKind::Q8x32 => 32,
        InputKind::Q8x256 => 256,
    };
    for i in 0..m {
        let xr = &x[i * k..][..k];
        for j in 0..n {
            let wr = &wf[j * k..][..k];
            let exact: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
            let magnitude: f64 = xr.iter().zip(wr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            let mut bound = magnitude * 1e-5 + 1e-9;
            if ab > 0 {
                for (xb, wb) in xr.chunks_exact(ab).zip(wr.chunks_exact(ab)) {
                    let half_step = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0 / 2.0;
                    bound += 1.0001 * half_step * wb.iter().map(|v| v.abs() as f64).sum::<f64>();
                }
            }
            let got = out[i * n + j] as f64;
            assert!((got - exact).abs() <= bound, "{} ({i}, {j}): {got} vs {exact} (bound {bound})", w.format());
        }
    }
}

#[test]
fn linear_matches_an_f64_reference_within_the_activation_quantization() {
    let mut rng = Rng(2);
    for f in QFormat::ALL {
        for (n, k, m) in [(37, 256, 1), (64, 512, 5), (19, 1536, 3), (21, 576, 6)] {
            if f.row_bytes(k).is_err() {
                continue;
            }
            let w = QMatrix::from_f32(f, n, k, &weights(n * k, &mut rng)).unwrap();
            let x = activations(m * k, &mut rng);
            let mut out = vec![f32::NAN; m * n];
            linear(&w, &x, m, &mut out).unwrap();
            check_against_f64(&w, &x, m, &out);
        }
    }
}

#[test]
fn every_row_is_bit_identical_alone_or_batched() {
    let mut rng = Rng(4);
    for f in QFormat::ALL {
        let (n, k) = (70, if f.block_values() == 256 { 512 } else { 576 });
        let w = QMatrix::new(f, n, k, random_blocks(f, n, k, &mut rng)).unwrap();
        let x = activations(9 * k, &mut rng);
        let alone: Vec<Vec<f32>> = (0..9)
            .map(|i| {
                let mut o = vec![0f32; n];
                linear(&w, &x[i * k..][..k], 1, &mut o).unwrap();
                o
            })
            .collect();
        for m in 1..=9 {
            // Rows 9 - m .. 9 in one call.
            let first = 9 - m;
            let mut out = vec![f32::NAN; m * n];
            linear(&w, &x[first * k..], m, &mut out).unwrap();
            for i in 0..m {
                let a: Vec<u32> = alone[first + i].iter().map(|v| v.to_bits()).collect();
                let b: Vec<u32> = out[i * n..][..n].iter().map(|v| v.to_bits()).collect();
                assert_eq!(a, b, "{f}: row {} of a batch of {m}", first + i);
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let mut rng = Rng(6);
    let (n, k, m) = (201, 768, 13);
    let pools: Vec<crate::pool::Pool> = [1, 2, 3].into_iter().map(crate::pool::Pool::new).collect();
    for f in [QFormat::Q4_1, QFormat::Q8_0, QFormat::Q6_K, QFormat::F16] {
        let w = QMatrix::new(f, n, k, random_blocks(f, n, k, &mut rng)).unwrap();
        let x = activations(m * k, &mut rng);
        let input = QInput::new(f, &x, m, k).unwrap();
        let outs: Vec<Vec<u32>> = pools
            .iter()
            .map(|p| {
                let mut o = vec![0f32; m * n];
                linear_in(p, &w, &input, &mut o).unwrap();
                o.iter().map(|v| v.to_bits()).collect()
            })
            .collect();
        assert_eq!(outs[0], outs[1], "{f}");
        assert_eq!(outs[0], outs[2], "{f}");
    }
}

#[test]
fn f32_weights_equal_linear_rows() {
    let mut rng = Rng(8);
    let (n, k, m) = (130, 100, 5);
    let wv = weights(n * k, &mut rng);
    let x = activations(m * k, &mut rng);
    let w = QMatrix::from_f32(QFormat::F32, n, k, &wv).unwrap();
    let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
    linear(&w, &x, m, &mut a).unwrap();
    crate::simd::linear_rows(&x, m, &wv, n, k, &mut b);
    assert_eq!(a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
}

#[test]
fn one_input_serves_several_matrices() {
    let mut rng = Rng(9);
    let k = 512;
    let x = activations(2 * k, &mut rng);
    let input = QInput::new(QFormat::Q4_0, &x, 2, k).unwrap();
    for f in [QFormat::Q4_0, QFormat::Q5_1, QFormat::Q8_0] {
        let w = QMatrix::new(f, 48, k, random_blocks(f, 48, k, &mut rng)).unwrap();
        let (mut a, mut b) = (vec![0f32; 96], vec![0f32; 96]);
        linear_input(&w, &input, &mut a).unwrap();
        linear(&w, &x, 2, &mut b).unwrap();
        assert_eq!(a, b);
    }
    let k4 = QMatrix::new(QFormat::Q4_K, 8, k, random_blocks(QFormat::Q4_K, 8, k, &mut rng)).unwrap();
    let err = linear_input(&k4, &input, &mut [0f32; 16]).unwrap_err();
    assert!(err.to_string().contains("do not suit Q4_K"), "{err}");
}

#[test]
fn bad_shapes_and_types_are_clear_errors() {
    let e = QMatrix::new(QFormat::Q4_K, 2, 576, vec![0; 2 * 144 * 2]).unwrap_err();
    assert!(e.to_string().contains("not a positive multiple of 256"), "{e}");
    let e = QMatrix::new(QFormat::Q4_0, 2, 40, vec![]).unwrap_err();
    assert!(e.to_string().contains("multiple of 32"), "{e}");
    let e = QMatrix::new(QFormat::Q4_0, 2, 64, vec![0; 71]).unwrap_err();
    assert_eq!(e, KernelError::Shape { what: "QMatrix data (bytes)", expected: 72, got: 71 });
    let e = QMatrix::from_f32(QFormat::Q8_0, 2, 64, &[0.0; 100]).unwrap_err();
    assert!(matches!(e, KernelError::Shape { expected: 128, got: 100, .. }), "{e}");
    let e = QFormat::from_ggml_type(16).unwrap_err();
    assert!(e.to_string().contains("unsupported GGUF tensor type 16 (IQ2_XXS)"), "{e}");
    assert!(e.to_string().contains("Q6_K"), "{e}");
    for f in QFormat::ALL {
        assert_eq!(QFormat::from_ggml_type(f.ggml_type()).unwrap(), f);
    }
    let w = QMatrix::from_f32(QFormat::Q4_1, 3, 64, &[0.5; 192]).unwrap();
    let mut out = vec![0f32; 6];
    assert!(matches!(linear(&w, &[0.0; 100], 2, &mut out), Err(KernelError::Shape { .. })));
    assert!(matches!(linear(&w, &[0.0; 128], 2, &mut out[..5]), Err(KernelError::Shape { .. })));
    assert!(w.dequantize_row(3, &mut [0.0; 64]).is_err());
    assert!(w.dequantize_row(0, &mut [0.0; 63]).is_err());
    linear(&w, &[], 0, &mut []).unwrap();
}

#[test]
fn block_sizes_are_ggmls() {
    let sizes: Vec<(QFormat, u32, usize, usize)> =
        QFormat::ALL.iter().map(|&f| (f, f.ggml_type(), f.block_values(), f.block_bytes())).collect();
    assert_eq!(
        sizes,
        vec![
            (QFormat::F32, 0, 1, 4),
            (QFormat::F16, 1, 1, 2),
            (QFormat::BF16, 30, 1, 2),
            (QFormat::Q4_0, 2, 32, 18),
            (QFormat::Q4_1, 3, 32, 20),
            (QFormat::Q5_0, 6, 32, 22),
            (QFormat::Q5_1, 7, 32, 24),
            (QFormat::Q8_0, 8, 32, 34),
            (QFormat::Q2_K, 10, 256, 84),
            (QFormat::Q3_K, 11, 256, 110),
            (QFormat::Q4_K, 12, 256, 144),
            (QFormat::Q5_K, 13, 256, 176),
            (QFormat::Q6_K, 14, 256, 210),
        ]
    );
}

#[test]
fn permute_rows_moves_whole_rows() {
    let mut rng = Rng(10);
    let (n, k) = (6, 256);
    let x = weights(n * k, &mut rng);
    let mut w = QMatrix::from_f32(QFormat::Q6_K, n, k, &x).unwrap();
    let before = w.dequantize();
    let perm = [3, 0, 5, 1, 2, 4];
    w.permute_rows(&perm).unwrap();
    let after = w.dequantize();
    for (i, &p) in perm.iter().enumerate() {
        assert_eq!(after[i * k..][..k], before[p * k..][..k]);
    }
    assert!(w.permute_rows(&[0, 0, 1, 2, 3, 4]).is_err());
    assert!(w.permute_rows(&[0, 1]).is_err());
    assert!(w.permute_rows(&[0, 1, 2, 3, 4, 6]).is_err());
}

#[test]
fn the_reference_quantizers_write_ggml_bytes_for_known_values() {
    // Q8_0: scale amax / 127 as f16, then the codes.
    let x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
    let q = QMatrix::from_f32(QFormat::Q8_0, 1, 32, &x).unwrap();
    let d = half::f16::from_f32(16.0 / 127.0);
    assert_eq!(q.data()[..2], d.to_le_bytes());
    assert_eq!(q.data()[2] as i8, -127);
    // Q4_0: value i at the low nibble of byte i, value i + 16 at its high nibble.
    let x: Vec<f32> = (0..32).map(|i| (i % 16) as f32 - 8.0).collect();
    let q = QMatrix::from_f32(QFormat::Q4_0, 1, 32, &x).unwrap();
    assert_eq!(half::f16::from_le_bytes([q.data()[0], q.data()[1]]).to_f32(), 1.0);
    assert!(q.data()[2..].iter().enumerate().all(|(i, &b)| b == (i as u8) | ((i as u8) << 4)));
    let mut back = vec![0f32; 32];
    q.dequantize_row(0, &mut back).unwrap();
    assert_eq!(back, x);
}

#[test]
fn a_refilled_input_equals_a_fresh_one() {
    let mut rng = Rng(14);
    let mut reused = QInput::default();
    for (f, k, m) in
        [(QFormat::Q4_1, 800, 12), (QFormat::Q4_1, 576, 9), (QFormat::Q6_K, 512, 3), (QFormat::Q8_0, 96, 40)]
    {
        let x = activations(m * k, &mut rng);
        reused.refill(f, &x, m, k).unwrap();
        let fresh = QInput::new(f, &x, m, k).unwrap();
        let w = QMatrix::new(f, 33, k, random_blocks(f, 33, k, &mut rng)).unwrap();
        let (mut a, mut b) = (vec![0f32; m * 33], vec![0f32; m * 33]);
        linear_input(&w, &reused, &mut a).unwrap();
        linear_input(&w, &fresh, &mut b).unwrap();
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}
