//! Test helpers shared by the SIMD encoder tests (`simd::tests`) and the quantized
//! matmul's (`simd::qtests`, `qmat::tests`).

use crate::qmat::{QFormat, QMatrix};
use half::f16;

pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

pub(crate) fn r16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// Random, constant, +-0, repeated extremes, outliers, subnormal steps, f16 extremes.
pub(crate) fn groups(d: usize, rng: &mut Rng) -> Vec<Vec<f32>> {
    let mut gs: Vec<Vec<f32>> = Vec::new();
    for scale in [1.0f32, 3.0, 1e-3, 1e-6, 60000.0] {
        gs.push((0..d).map(|_| r16(rng.f() * scale)).collect());
    }
    gs.push(vec![0.099975586; d]);
    gs.push(vec![-0.0; d]);
    gs.push((0..d).map(|i| if i % 3 == 0 { -0.0 } else { 0.0 }).collect());
    gs.push((0..d).map(|i| if i % 2 == 0 { 1.5 } else { -2.25 }).collect());
    gs.push((0..d).map(|i| (i % 5) as f32 - 2.0).collect());
    let mut g: Vec<f32> = (0..d).map(|i| r16(i as f32 / 8.0)).collect();
    g[d / 2] = 1000.0;
    g[d - 1] = -65504.0;
    gs.push(g);
    gs.push((0..d).map(|i| if i == 0 { 65504.0 } else { -65504.0 }).collect());
    gs.push((0..d).map(|i| if i == d - 1 { -65504.0 } else { 65504.0 }).collect());
    gs.push((0..d).map(|_| r16(1.0 + rng.f() * 1e-3)).collect());
    gs.push((0..d).map(|i| f16::from_bits((i % 7) as u16 | if i % 2 == 0 { 0x8000 } else { 0 }).to_f32()).collect());
    gs.push((0..d).map(|i| if i == d - 1 { 0.5 } else { 0.25 }).collect());
    gs.push((0..d).map(|i| if i == 0 { -0.5 } else { 0.25 }).collect());
    gs
}

/// Random bytes for `rows` rows of `cols` values of `f`, every f16 scale finite.
pub(crate) fn random_blocks(f: QFormat, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let rb = f.row_bytes(cols).unwrap();
    let mut data: Vec<u8> = (0..rows * rb).map(|_| rng.next() as u8).collect();
    let scale_offsets: &[usize] = match f {
        QFormat::Q4_0 | QFormat::Q5_0 | QFormat::Q8_0 => &[0],
        QFormat::Q4_1 | QFormat::Q5_1 | QFormat::Q4_K | QFormat::Q5_K => &[0, 2],
        QFormat::Q2_K => &[80, 82],
        QFormat::Q3_K => &[108],
        QFormat::Q6_K => &[208],
        _ => &[],
    };
    for blk in data.chunks_exact_mut(f.block_bytes()) {
        for &o in scale_offsets {
            let v = half::f16::from_f32(rng.f() * 0.05);
            blk[o..o + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    if f == QFormat::F16 {
        for v in data.chunks_exact_mut(2) {
            v.copy_from_slice(&half::f16::from_f32(rng.f()).to_le_bytes());
        }
    }
    if matches!(f, QFormat::F32 | QFormat::BF16) {
        return QMatrix::from_f32(f, rows, cols, &(0..rows * cols).map(|_| rng.f()).collect::<Vec<_>>())
            .unwrap()
            .into_data();
    }
    data
}

/// Activations with some zero blocks and a spread of magnitudes.
pub(crate) fn activations(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n)
        .map(|i| match (i / 32) % 5 {
            0 => rng.f() * 3.0,
            1 => rng.f() * 1e-3,
            2 if i / 32 % 10 == 2 => 0.0,
            _ => rng.f() * 40.0 + 0.5,
        })
        .collect()
}
