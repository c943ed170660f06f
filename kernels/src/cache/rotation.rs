//! The rotation a cache can store its keys and values in (a policy's `+rot`): a fixed
//! randomized Hadamard transform of each head's `D` values, `R x = H (s ⊙ x) / √D`,
//! with `H` the `D x D` Sylvester–Hadamard matrix and `s` a fixed vector of random
//! signs. `R` is orthogonal, so `(R q)·(R k) = q·k`: keys and queries rotated the same
//! way give the same attention, and an attention output over rotated values is rotated
//! back with `R⁻¹ y = s ⊙ (H y) / √D`. What rotation buys is in the quantization: a
//! channel outlier is spread over all `D` values of the rotated row, so a per-token
//! group's range (and its error) shrinks.
//!
//! Applied in place with the fast Walsh–Hadamard transform (`D log D` additions); `D`
//! must be a power of two.

use crate::error::{KernelError, Result};

/// The rotation of one head size.
#[derive(Clone, Debug, PartialEq)]
pub struct Rotation {
    /// `s / √D`: the signs with the normalization folded in.
    signs: Vec<f32>,
}

/// The sign of index `i`: a fixed pseudo-random bit (splitmix64 of `i`), the same in
/// every build and for every cache, so caches and their snapshots agree.
fn sign(i: usize) -> f32 {
    let mut z = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    if (z ^ (z >> 31)) & 1 == 0 { 1.0 } else { -1.0 }
}

impl Rotation {
    /// The rotation of heads of `d` values; `d` must be a power of two.
    pub fn new(d: usize) -> Result<Self> {
        if !d.is_power_of_two() {
            return Err(KernelError::Config(format!("rotation (+rot) needs a power-of-two head_dim, got {d}")));
        }
        let norm = 1.0 / (d as f32).sqrt();
        Ok(Rotation { signs: (0..d).map(|i| sign(i) * norm).collect() })
    }

    /// The signs with the normalization folded in (`s / √D`), what a device kernel
    /// multiplies by.
    pub fn signs(&self) -> &[f32] {
        &self.signs
    }

    /// Head size.
    pub fn d(&self) -> usize {
        self.signs.len()
    }

    /// Rotates every head of `rows` (consecutive heads of `D` values) in place.
    pub fn rotate(&self, rows: &mut [f32]) {
        for x in rows.chunks_exact_mut(self.d()) {
            for (v, s) in x.iter_mut().zip(&self.signs) {
                *v *= s;
            }
            fwht(x);
        }
    }

    /// Rotates every head of `rows` back (the inverse of [`Rotation::rotate`]).
    pub fn unrotate(&self, rows: &mut [f32]) {
        for x in rows.chunks_exact_mut(self.d()) {
            fwht(x);
            for (v, s) in x.iter_mut().zip(&self.signs) {
                *v *= s;
            }
        }
    }

    /// `rows` rotated, as a new vector.
    pub fn rotated(&self, rows: &[f32]) -> Vec<f32> {
        let mut r = rows.to_vec();
        self.rotate(&mut r);
        r
    }
}

/// The unnormalized Walsh–Hadamard transform of `x` (length a power of two), in place.
fn fwht(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for block in x.chunks_exact_mut(2 * h) {
            let (a, b) = block.split_at_mut(h);
            for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                let (s, t) = (*u + *v, *u - *v);
                *u = s;
                *v = t;
            }
        }
        h *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn is_orthogonal_and_undone_by_unrotate() {
        let r = Rotation::new(64).unwrap();
        let q: Vec<f32> = (0..128).map(|i| ((i * 7) as f32 * 0.31).sin()).collect();
        let k: Vec<f32> = (0..128).map(|i| ((i * 3) as f32 * 0.17).cos() * 2.0).collect();
        let (rq, rk) = (r.rotated(&q), r.rotated(&k));
        for h in 0..2 {
            let s = h * 64..(h + 1) * 64;
            let (a, b) = (dot(&q[s.clone()], &k[s.clone()]), dot(&rq[s.clone()], &rk[s.clone()]));
            assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "head {h}: {a} vs {b}");
            assert!((dot(&q[s.clone()], &q[s.clone()]) - dot(&rq[s.clone()], &rq[s])).abs() < 1e-3);
        }
        let mut back = rq.clone();
        r.unrotate(&mut back);
        for (a, b) in back.iter().zip(&q) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn spreads_a_channel_outlier_over_the_head() {
        let r = Rotation::new(64).unwrap();
        let mut x = vec![0.1f32; 64];
        x[5] = 40.0;
        let y = r.rotated(&x);
        let max = |v: &[f32]| v.iter().fold(0f32, |m, a| m.max(a.abs()));
        // The outlier's energy is spread: every rotated value is about 40 / 8.
        assert!(max(&y) < 6.0 && y.iter().all(|v| v.abs() > 4.0), "{y:?}");
        assert!(max(&x) / 0.1 > 100.0);
    }

    #[test]
    fn signs_are_fixed_and_mixed() {
        let r = Rotation::new(64).unwrap();
        assert_eq!(r, Rotation::new(64).unwrap());
        let neg = r.signs.iter().filter(|&&s| s < 0.0).count();
        assert!((20..44).contains(&neg), "{neg} negative signs of 64");
        assert!(Rotation::new(96).unwrap_err().to_string().contains("power-of-two head_dim"));
    }
}
