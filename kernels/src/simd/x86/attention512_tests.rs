//! Tests of the AVX-512 attention kernels (in their own file: they build streams with
//! the store, which the SIMD layer itself does not use).
use super::*;
use crate::base::Scheme;
use crate::quant::{OutlierMode, Outliers, QuantSpec};
use crate::simd::{Level, level};
use crate::store::PackedStream;

/// The metadata read 16 tokens at a time ([`meta16`], [`kind`]) is what the scalar
/// reads give one token at a time ([`group_consts`], scans of the groups), bit for
/// bit: mixed widths, raw and zero-width groups, outliers, one-width blocks, partial
/// blocks, both schemes.
#[test]
fn metadata_read_sixteen_at_a_time_equals_one_at_a_time() {
    if level() != Level::Avx512 {
        return;
    }
    let mut rng = crate::testutil::Rng(7);
    let mut rnd = move || rng.f();
    let d = 64;
    // Each case met at least once: raw groups, outliers, one width, mixed widths.
    let mut seen = [false; 4];
    let widths: [&[u8]; 4] = [&[0, 1, 2, 3, 4, 5, 6, 7, 8, RAW], &[6], &[3, 3, 3, 5], &[RAW]];
    for (scheme, alpha) in [(Scheme::Midpoint, 0.0), (Scheme::Midpoint, 0.05), (Scheme::MeanCentred, 0.0)] {
        let spec = QuantSpec { scheme, outliers: Outliers { alpha, mode: OutlierMode::Total } };
        let offs = offsets(scheme);
        for ws in widths {
            let mut s = PackedStream::new(d, spec, false);
            for t in 0..150 {
                let row: Vec<f32> = (0..d).map(|_| half::f16::from_f32(rnd() * 3.0).to_f32()).collect();
                s.push(&row, ws[t % ws.len()]).unwrap();
            }
            for b in s.blocks() {
                let n = b.len();
                // SAFETY: AVX-512 detected; i0 < n.
                let k = unsafe { kind(b) };
                assert_eq!(k.raw, b.meta.iter().any(|m| m.bits == RAW), "{ws:?}");
                assert_eq!(k.outliers, b.meta.iter().any(|m| m.n_out > 0), "{ws:?} {alpha}");
                let one = b.meta.iter().all(|m| m.bits == b.meta[0].bits) && (1..=8).contains(&b.meta[0].bits);
                assert_eq!(k.width, one.then_some(b.meta[0].bits), "{ws:?}");
                for (x, y) in seen.iter_mut().zip([k.raw, k.outliers, k.width.is_some(), !one && !k.raw]) {
                    *x |= y;
                }
                for i0 in (0..n).step_by(16) {
                    let (mut st, mut ba) = ([0f32; 16], [0f32; 16]);
                    // SAFETY: as above; 16 floats each.
                    unsafe {
                        let (x, y) = meta16(b, i0, offsets16(&offs));
                        _mm512_storeu_ps(st.as_mut_ptr(), x);
                        _mm512_storeu_ps(ba.as_mut_ptr(), y);
                    }
                    for i in 0..16 {
                        let want = match b.meta.get(i0 + i) {
                            // SAFETY: AVX2 and F16C detected.
                            Some(m) => unsafe { group_consts(m, &offs, d) },
                            None => (0.0, 0.0, 0),
                        };
                        assert_eq!((ba[i].to_bits(), st[i].to_bits()), (want.0.to_bits(), want.1.to_bits()));
                    }
                }
            }
        }
    }
    assert_eq!(seen, [true; 4]);
}
