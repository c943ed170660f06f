//! Tests of the x86 attention kernels (in their own file: they build streams with the
//! store, which the SIMD layer itself does not use).
use super::*;
use crate::quant::{OutlierMode, Outliers, QuantSpec};
use crate::simd::{Level, level};
use crate::store::PackedStream;

/// The AVX-512VL build computes exactly what the AVX2 build computes (same
/// operations, more registers): every width, raw groups, outliers, both schemes,
/// 1..=6 query heads, head dims with and without the held-in-registers path.
#[test]
fn the_wide_build_is_bit_identical_to_the_avx2_build() {
    if level() != Level::Avx512 {
        return;
    }
    let mut rng = crate::testutil::Rng(99);
    let mut rnd = move || rng.f();
    for d in [8usize, 24, 64, 128] {
        for (scheme, alpha) in [(Scheme::Midpoint, 0.01), (Scheme::Midpoint, 0.05), (Scheme::MeanCentred, 0.0)] {
            let spec = QuantSpec { scheme, outliers: Outliers { alpha, mode: OutlierMode::Total } };
            let n = 200;
            let (mut ks, mut vs) = (PackedStream::new(d, spec, false), PackedStream::new(d, spec, false));
            for t in 0..n {
                let row: Vec<f32> = (0..d).map(|_| half::f16::from_f32(rnd() * 3.0).to_f32()).collect();
                ks.push(&row, [0u8, 1, 2, 3, 4, 5, 6, 7, 8, RAW][t % 10]).unwrap();
                vs.push(&row, [3u8, RAW, 0, 8, 1, 5, 2][t % 7]).unwrap();
            }
            for g in 1..=6 {
                let qs: Vec<f32> = (0..g * d).map(|_| rnd() * 0.5).collect();
                let (mut s1, mut s2) = (vec![0f32; g * n], vec![0f32; g * n]);
                let (mut o1, mut o2) = (vec![0f32; g * d], vec![0f32; g * d]);
                // SAFETY: AVX-512 (and so AVX2 and the rest) detected; shapes as required.
                unsafe {
                    packed_scores(ks.view(), &qs, g, &mut s1, true);
                    packed_scores(ks.view(), &qs, g, &mut s2, false);
                    softmax_rows(&mut s1, g, n);
                    softmax_rows(&mut s2, g, n);
                    weighted_values(vs.view(), &s1, g, &mut o1, true);
                    weighted_values(vs.view(), &s2, g, &mut o2, false);
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&s1), bits(&s2), "d {d} g {g} {spec:?}: probabilities");
                assert_eq!(bits(&o1), bits(&o2), "d {d} g {g} {spec:?}: outputs");
            }
        }
    }
}
