//! Tests of the SIMD layer: every x86 kernel against its portable reference, bit for
//! bit where the kernel promises it (all but the fused attention, whose comparison is in
//! [`crate::attention`]), at the level this process detected; run the suite also with
//! `QAQ_KERNELS_NO_AVX512=1` and `QAQ_KERNELS_SCALAR=1` to cover every level.

use super::*;
use crate::base::{OutlierMode, Outliers};
use crate::testutil::{Rng, groups};
use half::f16;

/// A stored group.
fn group<'a>(meta: &GroupMeta, codes: &'a [u8], out_idx: &'a [u8], out_val: &'a [f16]) -> GroupRef<'a> {
    GroupRef { meta: *meta, codes, out_idx, out_val }
}

/// The sink of an encode into these buffers.
fn sink<'a>(codes: &'a mut Vec<u8>, out_idx: &'a mut Vec<u8>, out_val: &'a mut Vec<f16>) -> Sink<'a> {
    Sink { codes, out_idx, out_val }
}

#[test]
fn fast_and_scalar_agree() {
    let a: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    let b: Vec<f32> = (0..64).map(|i| (i as f32 * 0.11).cos()).collect();
    assert!((dot(&a, &b) - scalar::dot(&a, &b)).abs() < 1e-4);
    let mut x1 = a.clone();
    let mut x2 = a.clone();
    axpy(&mut x1, 0.5, &b);
    scalar::axpy(&mut x2, 0.5, &b);
    assert_eq!(x1, x2);
    for bits in 1..=8u8 {
        let codes: Vec<u8> = (0..64u32).map(|i| ((i * 7 + 3) % (1 << bits)) as u8).collect();
        let mut p1 = Vec::new();
        let mut p2 = Vec::new();
        pack_append(&codes, bits, &mut p1);
        scalar::pack_append(&codes, bits, &mut p2);
        assert_eq!(p1, p2, "bits {bits}");
        assert_eq!(p1.len(), 8 * bits as usize);
        p1.extend_from_slice(&[0; 8]);
        let mut u1 = vec![0f32; 64];
        let mut u2 = vec![0f32; 64];
        unpack_f32(&p1, bits, &mut u1);
        scalar::unpack_f32(&p1, bits, &mut u2);
        assert_eq!(u1, u2);
        let back: Vec<u8> = u1.iter().map(|&v| v as u8).collect();
        assert_eq!(back, codes);
    }
    let h: Vec<u8> = (0..16).flat_map(|i| half::f16::from_f32(i as f32 - 3.5).to_le_bytes()).collect();
    let mut f1 = vec![0f32; 16];
    let mut f2 = vec![0f32; 16];
    f16_bytes_to_f32(&h, &mut f1);
    scalar::f16_bytes_to_f32(&h, &mut f2);
    assert_eq!(f1, f2);
    assert_eq!(f1[0], -3.5);
}

fn run(x: &[f32], bits: u8, spec: &QuantSpec, fast: bool) -> (Result<GroupMeta>, Vec<u8>, Vec<u8>, Vec<f16>) {
    let (mut c, mut oi, mut ov) = (vec![7u8], Vec::new(), Vec::new());
    let r = if fast {
        encode_group(x, bits, spec, &mut sink(&mut c, &mut oi, &mut ov))
    } else {
        portable::encode_group(x, bits, spec, &mut sink(&mut c, &mut oi, &mut ov))
    };
    (r, c, oi, ov)
}

#[test]
fn encode_matches_scalar_reference_bit_for_bit() {
    if !avx2() {
        return;
    }
    let mut rng = Rng(99);
    let specs = [
        Outliers::NONE,
        Outliers::PAPER,
        Outliers { alpha: 0.01, mode: OutlierMode::PerSide },
        Outliers { alpha: 0.05, mode: OutlierMode::Total },
    ];
    for d in [8usize, 16, 24, 64, 72, 128, 200, 256] {
        for x in groups(d, &mut rng) {
            for o in specs {
                for scheme in [Scheme::Midpoint, Scheme::MeanCentred] {
                    let spec = QuantSpec { scheme, outliers: o };
                    for bits in 0..=8u8 {
                        let (r1, c1, i1, v1) = run(&x, bits, &spec, true);
                        let (r2, c2, i2, v2) = run(&x, bits, &spec, false);
                        let (m1, m2) = match (r1, r2) {
                            (Ok(a), Ok(b)) => (a, b),
                            (Err(a), Err(b)) => {
                                assert_eq!(format!("{a:?}"), format!("{b:?}"));
                                assert_eq!((c1, i1, v1), (c2, i2, v2));
                                continue;
                            }
                            (a, b) => panic!("d {d} bits {bits} {spec:?}: {a:?} vs {b:?}"),
                        };
                        assert_eq!(
                            (m1.m.to_bits(), m1.s.to_bits(), m1.bits, m1.n_out),
                            (m2.m.to_bits(), m2.s.to_bits(), m2.bits, m2.n_out),
                            "d {d} bits {bits} {spec:?} x {:?}",
                            &x[..8]
                        );
                        assert_eq!((c1, i1), (c2, i2), "d {d} bits {bits} {spec:?}");
                        assert_eq!(
                            v1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            v2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn batch_encode_matches_one_call_per_group() {
    let mut rng = Rng(17);
    for d in [8usize, 24, 64, 128, 256] {
        let mut gs = groups(d, &mut rng);
        gs.push(gs[0].clone());
        for o in [Outliers::NONE, Outliers::PAPER, Outliers { alpha: 0.05, mode: OutlierMode::Total }] {
            let spec = QuantSpec { scheme: Scheme::Midpoint, outliers: o };
            for bits in 0..=8u8 {
                // Odd and even counts, and a bad group at every position of a short run.
                let mut runs: Vec<Vec<f32>> = vec![gs.concat(), gs[..3].concat()];
                for bad in 0..4 {
                    let mut r = gs[1..5].to_vec();
                    r[bad][d / 2] = if bad % 2 == 0 { f32::NAN } else { 1e6 };
                    runs.push(r.concat());
                }
                for x in runs {
                    let (mut c1, mut i1, mut v1, mut m1) = (vec![1u8], vec![2u8], Vec::new(), Vec::new());
                    let r1 = crate::quant::encode_groups(&x, d, bits, &spec, &mut c1, &mut i1, &mut v1, &mut m1);
                    // The f16 entry point on the same values (1e6 becomes inf: same error).
                    let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
                    let (mut c3, mut i3, mut v3, mut m3) = (vec![1u8], vec![2u8], Vec::new(), Vec::new());
                    let r3 = crate::quant::encode_groups_f16(&xh, d, bits, &spec, &mut c3, &mut i3, &mut v3, &mut m3);
                    assert_eq!(format!("{r1:?}"), format!("{r3:?}"), "f16 d {d} bits {bits}");
                    assert_eq!((&c1, &i1, &v1), (&c3, &i3, &v3), "f16 d {d} bits {bits}");
                    assert_eq!(format!("{m1:?}"), format!("{m3:?}"));
                    let (mut c2, mut i2, mut v2, mut m2) = (vec![1u8], vec![2u8], Vec::new(), Vec::new());
                    let mut r2 = Ok(());
                    for g in x.chunks_exact(d) {
                        match portable::encode_group(g, bits, &spec, &mut sink(&mut c2, &mut i2, &mut v2)) {
                            Ok(m) => m2.push(m),
                            Err(e) => {
                                r2 = Err(e);
                                break;
                            }
                        }
                    }
                    assert_eq!(format!("{r1:?}"), format!("{r2:?}"), "d {d} bits {bits}");
                    assert_eq!((c1, i1), (c2, i2), "d {d} bits {bits} {o:?}");
                    assert_eq!(
                        v1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        v2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    );
                    let key = |m: &GroupMeta| (m.m.to_bits(), m.s.to_bits(), m.bits, m.n_out);
                    assert_eq!(m1.iter().map(key).collect::<Vec<_>>(), m2.iter().map(key).collect::<Vec<_>>());
                }
            }
        }
    }
    let mut sink = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let r = crate::quant::encode_groups(
        &[0.0; 12],
        8,
        3,
        &QuantSpec::default(),
        &mut sink.0,
        &mut sink.1,
        &mut sink.2,
        &mut sink.3,
    );
    assert!(matches!(r, Err(KernelError::Config(_))));
}

#[test]
fn encode_errors_match_and_append_nothing() {
    let spec = QuantSpec::default();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 65520.0, -1e6] {
        for pos in [0usize, 5, 63] {
            let mut x = vec![0.5f32; 64];
            x[pos] = bad;
            let (r, c, i, v) = run(&x, 3, &spec, true);
            assert!(matches!(r, Err(KernelError::NonFinite { what: "group" })));
            assert_eq!((c, i.len(), v.len()), (vec![7], 0, 0));
        }
    }
    // Range overflow: 65504 - (-65504) at 0 bits does not fit f16.
    let x: Vec<f32> = (0..64).map(|i| if i < 32 { 65504.0 } else { -65504.0 }).collect();
    let none = QuantSpec { outliers: Outliers::NONE, ..Default::default() };
    let (r1, c1, _, _) = run(&x, 0, &none, true);
    let (r2, _, _, _) = run(&x, 0, &none, false);
    assert!(matches!(r1, Err(KernelError::NonFinite { what: "group range" })));
    assert!(matches!(r2, Err(KernelError::NonFinite { what: "group range" })));
    assert_eq!(c1, vec![7]);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_f16c_conversion_is_h2f() {
    if !avx2() {
        return;
    }
    for b in 0..=u16::MAX {
        let h = f16::from_bits(b);
        // SAFETY: the AVX2 level (F16C included) was checked above.
        let (a, e) = (unsafe { prim::x86::h2f_f16c(h) }, h2f(h));
        assert!(a.to_bits() == e.to_bits() || (a.is_nan() && e.is_nan()), "{b:#x}");
    }
}

/// The x86 encoders round the metadata to f16 with `vcvtps2ph` in a directed mode; the
/// reference rounds to nearest and steps down (up) if above (below): the same function.
#[cfg(target_arch = "x86_64")]
#[test]
fn directed_rounding_matches_reference() {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx2,f16c")]
    fn down(x: f32) -> u16 {
        _mm_extract_epi16::<0>(_mm_cvtps_ph::<_MM_FROUND_TO_NEG_INF>(_mm_set_ss(x))) as u16
    }
    #[target_feature(enable = "avx2,f16c")]
    fn up(x: f32) -> u16 {
        _mm_extract_epi16::<0>(_mm_cvtps_ph::<_MM_FROUND_TO_POS_INF>(_mm_set_ss(x))) as u16
    }
    let mut rng = Rng(5);
    if !avx2() {
        return;
    }
    for i in 0..200_000 {
        let x = match i % 4 {
            0 => rng.f() * 70000.0,
            1 => rng.f() * 1e-4,
            2 => rng.f() * 1e-7,
            _ => f32::from_bits(rng.next() as u32) % 65504.0,
        };
        if !x.is_finite() {
            continue;
        }
        // SAFETY: the AVX2 level (F16C included) was checked above.
        let (d, u) = unsafe { (down(x), up(x)) };
        assert_eq!(d, crate::base::f16_down(x).to_bits(), "{x}");
        assert_eq!(u, crate::base::f16_up(x).to_bits(), "{x}");
    }
}

#[test]
fn decode_matches_scalar_reference_bit_for_bit() {
    let mut rng = Rng(3);
    for d in [8usize, 16, 64, 256] {
        for x in groups(d, &mut rng) {
            for o in [Outliers::NONE, Outliers::PAPER] {
                for scheme in [Scheme::Midpoint, Scheme::MeanCentred] {
                    let spec = QuantSpec { scheme, outliers: o };
                    for bits in 0..=8u8 {
                        let (mut c, mut oi, mut ov) = (Vec::new(), Vec::new(), Vec::new());
                        let Ok(m) = encode_group(&x, bits, &spec, &mut sink(&mut c, &mut oi, &mut ov)) else {
                            continue;
                        };
                        c.extend_from_slice(&[0; 8]);
                        let (mut a, mut b) = (vec![0f32; d], vec![1f32; d]);
                        decode_group(group(&m, &c, &oi, &ov), scheme, &mut a);
                        portable::decode_group(group(&m, &c, &oi, &ov), scheme, &mut b);
                        let (a, b): (Vec<u32>, Vec<u32>) =
                            (a.iter().map(|v| v.to_bits()).collect(), b.iter().map(|v| v.to_bits()).collect());
                        assert_eq!(a, b, "d {d} bits {bits}");
                    }
                }
            }
        }
    }
}

type Out = (Result<()>, Vec<u8>, Vec<u8>, Vec<u16>, Vec<(u16, u16, u8, u8)>);

fn key(m: &GroupMeta) -> (u16, u16, u8, u8) {
    (m.m.to_bits(), m.s.to_bits(), m.bits, m.n_out)
}

/// The scalar reference, one group at a time, stopping at the first error.
fn reference(x: &[f32], d: usize, bits: u8, spec: &QuantSpec) -> Out {
    let (mut c, mut oi, mut ov, mut ms) = (vec![9u8], vec![4u8], Vec::new(), Vec::new());
    for g in x.chunks_exact(d) {
        match portable::encode_group(g, bits, spec, &mut sink(&mut c, &mut oi, &mut ov)) {
            Ok(m) => ms.push(key(&m)),
            Err(e) => return (Err(e), c, oi, ov.iter().map(|v| v.to_bits()).collect(), ms),
        }
    }
    (Ok(()), c, oi, ov.iter().map(|v| v.to_bits()).collect(), ms)
}

/// Runs the AVX-512 (`avx512`) or the AVX2 batch encoder on f32 and on f16 input and
/// checks both against the reference.
#[cfg(target_arch = "x86_64")]
fn check(x: &[f32], d: usize, bits: u8, spec: &QuantSpec, what: &str, avx512: bool) {
    let (k_lo, k_hi) = spec.outliers.capped(d);
    assert!(k_lo <= 1 && k_hi <= 1);
    let want = reference(x, d, bits, spec);
    let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    for half in [false, true] {
        let (mut c, mut oi, mut ov, mut ms) = (vec![9u8], vec![4u8], Vec::new(), Vec::new());
        let (out, m) = (&mut sink(&mut c, &mut oi, &mut ov), &mut ms);
        // SAFETY: the callers check the features first; d and the counts are valid.
        let r = unsafe {
            match (avx512, half) {
                (true, false) => x86::quant512::encode_midpoint_many(x, d, bits, k_lo, k_hi, out, m),
                (true, true) => x86::quant512::encode_midpoint_many(&xh[..], d, bits, k_lo, k_hi, out, m),
                (false, false) => x86::quant::encode_midpoint_many(x, d, bits, k_lo, k_hi, out, m),
                (false, true) => x86::quant::encode_midpoint_many(&xh[..], d, bits, k_lo, k_hi, out, m),
            }
        };
        let got: Out = (r, c, oi, ov.iter().map(|v| v.to_bits()).collect(), ms.iter().map(key).collect());
        // f16 input: values out of f16 range become inf, the same "group" error.
        assert_eq!(format!("{:?}", got.0), format!("{:?}", want.0), "{what} d {d} bits {bits} f16 {half}");
        assert_eq!(
            (&got.1, &got.2, &got.3, &got.4),
            (&want.1, &want.2, &want.3, &want.4),
            "{what} d {d} bits {bits} f16 {half} {spec:?}"
        );
    }
}

fn specs() -> [QuantSpec; 3] {
    let mid = |outliers| QuantSpec { scheme: Scheme::Midpoint, outliers };
    [mid(Outliers::NONE), mid(Outliers::PAPER), mid(Outliers { alpha: 0.01, mode: OutlierMode::PerSide })]
}

#[cfg(target_arch = "x86_64")]
fn all_cases(avx512: bool) {
    let mut rng = Rng(1234);
    for d in [8usize, 16, 24, 64, 72, 128, 200, 256] {
        let gs = groups(d, &mut rng);
        for spec in specs() {
            let (lo, hi) = spec.outliers.counts(d);
            if lo > 1 || hi > 1 {
                continue;
            }
            for bits in 0..=8u8 {
                for g in &gs {
                    check(g, d, bits, &spec, "single", avx512);
                }
                // Runs of every length 1..=7 (tails of the lock step), and the whole set.
                for len in 1..=7 {
                    check(&gs[..len].concat(), d, bits, &spec, "run", avx512);
                }
                check(&gs.concat(), d, bits, &spec, "all", avx512);
                // A bad group at every position of a run of 6.
                for bad in 0..6 {
                    for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 65520.0, -1e6] {
                        let mut r = gs[..6].to_vec();
                        r[bad][(bad * 7) % d] = v;
                        check(&r.concat(), d, bits, &spec, "bad", avx512);
                    }
                }
                // Range overflow ("group range") in the middle of a run.
                let mut r = gs[..5].to_vec();
                r[2] = (0..d).map(|i| if i % 2 == 0 { 65504.0 } else { -65504.0 }).collect();
                check(&r.concat(), d, bits, &spec, "range", avx512);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_matches_scalar_reference_every_width() {
    if level() == Level::Avx512 {
        all_cases(true);
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_matches_scalar_reference_every_width() {
    if avx2() {
        all_cases(false);
    }
}

#[test]
fn decode_matches_scalar_reference_every_width() {
    let mut rng = Rng(55);
    for d in [8usize, 16, 24, 64, 72, 128, 200, 256] {
        for bits in 1..=8u8 {
            for x in groups(d, &mut rng) {
                for spec in specs() {
                    let (mut c, mut oi, mut ov) = (Vec::new(), Vec::new(), Vec::new());
                    let Ok(m) = portable::encode_group(&x, bits, &spec, &mut sink(&mut c, &mut oi, &mut ov)) else {
                        continue;
                    };
                    // Exactly the group's bytes: no slack to read past.
                    assert_eq!(c.len(), m.code_bytes(d));
                    let (mut a, mut r) = (vec![0f32; d], vec![1f32; d]);
                    portable::decode_group(group(&m, &c, &oi, &ov), spec.scheme, &mut r);
                    let want: Vec<u32> = r.iter().map(|v| v.to_bits()).collect();
                    #[cfg(target_arch = "x86_64")]
                    if level() == Level::Avx512 {
                        // SAFETY: features detected; lengths as required.
                        unsafe {
                            x86::quant512::decode_quantized(
                                m.base(spec.scheme),
                                m.s.to_f32(),
                                bits,
                                &c,
                                &oi,
                                &ov,
                                &mut a,
                            )
                        };
                        assert_eq!(a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want, "d {d} bits {bits}");
                    }
                    // Random codes too (every code value, not only those of `x`).
                    let rc: Vec<u8> = (0..c.len()).map(|_| rng.next() as u8).collect();
                    portable::decode_group(group(&m, &rc, &oi, &ov), spec.scheme, &mut r);
                    decode_group(group(&m, &rc, &oi, &ov), spec.scheme, &mut a);
                    assert_eq!(
                        a.iter().map(|v| v.to_bits()).collect::<Vec<u32>>(),
                        r.iter().map(|v| v.to_bits()).collect::<Vec<u32>>(),
                        "random d {d} bits {bits}"
                    );
                }
            }
        }
    }
}

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0).collect()
}

#[test]
fn linear_rows_are_bit_identical_whatever_else_is_in_the_batch() {
    let (n, k) = (130, 70);
    let w = data(n * k, 1);
    let x = data(5 * k, 2);
    let mut all = vec![0f32; 5 * n];
    linear_rows(&x, 5, &w, n, k, &mut all);
    for m in 1..=5 {
        let mut part = vec![0f32; m * n];
        linear_rows(&x, m, &w, n, k, &mut part);
        assert_eq!(part[..], all[..m * n], "m = {m}");
    }
    let mut one = vec![0f32; n];
    linear_rows(&x[3 * k..], 1, &w, n, k, &mut one);
    assert_eq!(one[..], all[3 * n..4 * n]);
    // Register blocks (3 x 4) and edges give the portable reference's exact bits.
    for i in 0..5 {
        for j in 0..n {
            assert_eq!(
                all[i * n + j].to_bits(),
                scalar::row_dot(&x[i * k..][..k], &w[j * k..][..k]).to_bits(),
                "{i},{j}"
            );
        }
    }
}

#[test]
fn linear_rows_match_a_plain_dot_product() {
    let (n, k) = (3, 19);
    let (w, x) = (data(n * k, 3), data(2 * k, 4));
    let mut out = vec![0f32; 2 * n];
    linear_rows(&x, 2, &w, n, k, &mut out);
    for i in 0..2 {
        for j in 0..n {
            let want: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
            assert!((out[i * n + j] as f64 - want).abs() < 1e-4, "{i},{j}");
            assert!((scalar::row_dot(&x[i * k..][..k], &w[j * k..][..k]) - out[i * n + j]).abs() < 1e-5);
        }
    }
}

/// ulps between two finite floats of one sign.
fn ulps(a: f32, b: f32) -> u32 {
    a.to_bits().abs_diff(b.to_bits())
}

#[test]
fn exp_is_within_2_ulp_of_the_true_value_over_its_range() {
    let mut worst = (0, 0f32);
    let mut x = -87.0f32;
    while x <= 88.0 {
        let want = (x as f64).exp() as f32;
        let u = ulps(scalar::exp(x), want);
        if u > worst.0 {
            worst = (u, x);
        }
        x += 0.000_97;
    }
    assert!(worst.0 <= 2, "{} ulp at {}", worst.0, worst.1);
    // Clamped outside: never 0 or infinite, monotone at the edges.
    assert!(scalar::exp(-1000.0) > 0.0 && scalar::exp(-1000.0) == scalar::exp(-87.0));
    assert!(scalar::exp(1000.0).is_finite() && scalar::exp(1000.0) == scalar::exp(88.0));
    assert_eq!(scalar::exp(0.0), 1.0);
}

#[test]
fn silu_mul_is_bit_exact_at_this_level_and_close_to_the_libm_formula() {
    let mut rng = Rng(5);
    for len in [0, 1, 7, 8, 9, 31, 1536, 1543] {
        let mut gate: Vec<f32> = (0..len).map(|_| rng.f() * 12.0).collect();
        let up: Vec<f32> = (0..len).map(|_| rng.f() * 2.0).collect();
        // Extremes: large of both signs (the clamp), zeros of both signs, subnormals.
        for (i, v) in [-100.0, 100.0, 0.0, -0.0, 1e-40, -1e-40, 88.5, -88.5].into_iter().enumerate() {
            if i < len {
                gate[i] = v;
            }
        }
        let (mut fast, mut slow) = (gate.clone(), gate.clone());
        silu_mul(&mut fast, &up);
        scalar::silu_mul(&mut slow, &up);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fast), bits(&slow), "len {len}");
        for ((&g, &u), &s) in gate.iter().zip(&up).zip(&fast) {
            let want = g / (1.0 + (-g).exp()) * u;
            assert!((s - want).abs() <= 4.0 * f32::EPSILON * want.abs() + 1e-35, "silu({g}) * {u}: {s} vs {want}");
        }
    }
}
