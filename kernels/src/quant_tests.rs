//! Unit tests of `quant` (kept beside it, in their own file for size).
use super::*;
use crate::error::KernelError;
use proptest::prelude::*;

fn roundtrip(x: &[f32], bits: u8, spec: &QuantSpec) -> (GroupMeta, Vec<f32>, Vec<u8>) {
    let (mut c, mut oi, mut ov) = (Vec::new(), Vec::new(), Vec::new());
    let meta = encode_group(x, bits, spec, &mut c, &mut oi, &mut ov).unwrap();
    assert_eq!(c.len(), meta.code_bytes(x.len()));
    assert_eq!(oi.len(), meta.n_out as usize);
    let mut out = vec![0f32; x.len()];
    decode_group(&meta, spec.scheme, &c, &oi, &ov, &mut out);
    (meta, out, oi)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn midpoint_bound_every_width(
        raw in proptest::collection::vec(-100f32..100f32, 64),
        bits in 0u8..=8,
        alpha in prop_oneof![Just(0.0f64), Just(0.01), Just(0.05)],
    ) {
        let x: Vec<f32> = raw.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        let spec = QuantSpec { scheme: Scheme::Midpoint, outliers: Outliers { alpha, mode: OutlierMode::Total } };
        let (meta, out, oi) = roundtrip(&x, bits, &spec);
        let (lo, hi) = spec.outliers.counts(64);
        prop_assert_eq!(oi.len(), lo + hi);
        let s = meta.s.to_f32();
        for i in 0..64 {
            if oi.contains(&(i as u8)) {
                prop_assert_eq!(out[i], x[i]);
            } else {
                prop_assert!((x[i] - out[i]).abs() <= s / 2.0 * (1.0 + 1e-5) + 1e-6,
                    "i {} x {} xh {} s {} bits {}", i, x[i], out[i], s, bits);
            }
        }
    }

    #[test]
    fn shift_down_matches_bound(raw in proptest::collection::vec(-10f32..10f32, 32), from in 1u8..=8, to in 0u8..=8) {
        prop_assume!(to <= from);
        let x: Vec<f32> = raw.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        let spec = QuantSpec::default();
        let (mut c, mut oi, mut ov) = (Vec::new(), Vec::new(), Vec::new());
        let meta = encode_group(&x, from, &spec, &mut c, &mut oi, &mut ov).unwrap();
        c.extend_from_slice(&[0; 8]);
        let mut c2 = Vec::new();
        let m2 = shift_down(&meta, 32, &c, to, &mut c2).unwrap();
        prop_assert_eq!(c2.len(), code_bytes(to, 32));
        let mut out = vec![0f32; 32];
        decode_group(&m2, Scheme::Midpoint, &c2, &oi, &ov, &mut out);
        let s = m2.s.to_f32();
        for i in 0..32 {
            if !oi.contains(&(i as u8)) {
                prop_assert!((x[i] - out[i]).abs() <= s / 2.0 * (1.0 + 1e-5) + 1e-6);
            }
        }
    }
}

#[test]
fn outlier_count_vectors() {
    // qaq-algorithm.md §11: (k_lo, k_hi rank) -> outliers 2, 42, 1312.
    for (n, total) in [(128usize, 2usize), (4096, 42), (131072, 1312)] {
        let (lo, hi) = Outliers::PAPER.counts(n);
        assert_eq!(lo + hi, total, "n {n}");
        assert_eq!(lo, hi);
    }
    let per_side = Outliers { alpha: 0.01, mode: OutlierMode::PerSide };
    assert_eq!(per_side.counts(4096), (41, 41));
    assert_eq!(Outliers::NONE.counts(64), (0, 0));
}

#[test]
fn constant_group_is_exact_at_all_widths() {
    let x = vec![0.099975586f32; 64]; // f16-representable
    for bits in 0..=8 {
        let (meta, out, _) = roundtrip(&x, bits, &QuantSpec::default());
        assert_eq!(meta.s.to_f32(), 0.0);
        assert!(out.iter().all(|&v| v == x[0]), "bits {bits}: {:?}", &out[..4]);
    }
}

#[test]
fn zero_bits_is_midpoint_with_exact_outliers() {
    let mut x: Vec<f32> = (0..64).map(|i| i as f32 / 8.0).collect();
    x[5] = 100.0;
    let (meta, out, oi) = roundtrip(&x, 0, &QuantSpec::default());
    assert_eq!(meta.code_bytes(64), 0);
    assert_eq!(oi, vec![0, 5]);
    assert_eq!(out[5], 100.0);
    assert_eq!(out[0], 0.0);
    // inliers 1/8 ..= 63/8: midpoint 4.0
    assert!((out[1] - 4.0).abs() < 1e-2, "{}", out[1]);
}

#[test]
fn mean_centred_matches_reference_rules() {
    // inliers 0,1,2,3 (+ outliers excluded with alpha 0): mean 1.5, r 3, n=2: s=0.75
    let x = [0.0f32, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0];
    let spec = QuantSpec { scheme: Scheme::MeanCentred, outliers: Outliers::NONE };
    let (meta, out, _) = roundtrip(&x, 2, &spec);
    assert_eq!(meta.m.to_f32(), 1.5);
    assert_eq!(meta.s.to_f32(), 0.75);
    // q = round((x-1.5)/0.75) clamped to [-2, 1]: -2,-1(−0.67),1(0.67),1(clip 2)
    assert_eq!(&out[..4], &[0.0, 0.75, 2.25, 2.25]);
    let (_, out0, _) = roundtrip(&x, 0, &spec);
    assert!(out0.iter().all(|&v| v == 0.0), "constant mean - r/2 = 0");
}

#[test]
fn bad_inputs_are_errors() {
    let spec = QuantSpec::default();
    let (mut c, mut oi, mut ov) = (Vec::new(), Vec::new(), Vec::new());
    let mut x = vec![1.0f32; 16];
    x[3] = f32::NAN;
    assert!(matches!(encode_group(&x, 4, &spec, &mut c, &mut oi, &mut ov), Err(KernelError::NonFinite { .. })));
    x[3] = f32::INFINITY;
    assert!(encode_group(&x, 4, &spec, &mut c, &mut oi, &mut ov).is_err());
    x[3] = 1e6;
    assert!(encode_group(&x, 4, &spec, &mut c, &mut oi, &mut ov).is_err());
    assert!(encode_group(&[1.0; 12], 4, &spec, &mut c, &mut oi, &mut ov).is_err());
    assert!(encode_group(&[1.0; 16], 9, &spec, &mut c, &mut oi, &mut ov).is_err());
    assert!(c.is_empty() && oi.is_empty());
}
