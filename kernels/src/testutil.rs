//! Test helpers shared by the SIMD encoder tests (`simd::tests`).

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
