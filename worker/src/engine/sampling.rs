//! Next-token selection: repetition penalty, temperature, top-k, top-p, and
//! greedy decoding, with a seeded generator per sequence.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Validated sampling parameters of one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// 0 selects greedy decoding.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, repetition_penalty: 1.0, seed: 0 }
    }
}

/// Per-sequence sampler.
#[derive(Debug)]
pub struct Sampler {
    cfg: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig) -> Self {
        let rng = StdRng::seed_from_u64(cfg.seed);
        Self { cfg, rng }
    }

    /// Picks the next token from `logits`; `history` holds the prompt and the
    /// tokens generated so far (for the repetition penalty).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let c = &self.cfg;
        if c.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in history {
                if let Some(s) = seen.get_mut(t as usize)
                    && !*s
                {
                    *s = true;
                    let l = &mut logits[t as usize];
                    *l = if *l > 0.0 { *l / c.repetition_penalty } else { *l * c.repetition_penalty };
                }
            }
        }
        if c.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, l / c.temperature)).collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if c.top_k > 0 && c.top_k < cand.len() {
            cand.truncate(c.top_k);
        }
        let max = cand[0].1;
        let mut sum = 0.0;
        for x in &mut cand {
            x.1 = (x.1 - max).exp();
            sum += x.1;
        }
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = cand.len();
            for (i, x) in cand.iter().enumerate() {
                acc += x.1 / sum;
                if acc >= c.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
            sum = cand.iter().map(|x| x.1).sum();
        }
        let mut r = self.rng.random::<f32>() * sum;
        for &(id, p) in &cand {
            if r < p {
                return id;
            }
            r -= p;
        }
        cand[cand.len() - 1].0
    }
}

/// Index of the largest logit (the first one on ties); NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    // The largest value over 16 independent lanes (vectorized), then its first index;
    // with a NaN anywhere, the scalar rule below.
    const L: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; L];
    let mut nan = false;
    let chunks = logits.chunks_exact(L);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            nan |= x.is_nan();
            *m = if x > *m { x } else { *m };
        }
    }
    for (m, &x) in lanes.iter_mut().zip(tail) {
        nan |= x.is_nan();
        *m = if x > *m { x } else { *m };
    }
    if !nan && !logits.is_empty() {
        let max = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        return logits.iter().position(|&x| x == max).unwrap_or(0) as u32;
    }
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_is_the_first_largest_and_skips_nan() {
        // The plain rule, one comparison per logit.
        fn plain(l: &[f32]) -> u32 {
            let mut best = 0;
            for (i, &x) in l.iter().enumerate() {
                if x > l[best] || l[best].is_nan() {
                    best = i;
                }
            }
            best as u32
        }
        let mut state = 7u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        for len in [1, 2, 15, 16, 17, 33, 49152] {
            for case in 0..6 {
                let mut l: Vec<f32> = (0..len).map(|_| (next() % 50) as f32 - 25.0).collect();
                match case {
                    1 => l.iter_mut().for_each(|x| *x = f32::NEG_INFINITY),
                    2 => l[next() as usize % len] = f32::NAN,
                    3 => l[0] = f32::NAN,
                    4 => l.iter_mut().for_each(|x| *x = if *x > 0.0 { -0.0 } else { 0.0 }),
                    5 => l.iter_mut().for_each(|x| *x = f32::NAN),
                    _ => {}
                }
                assert_eq!(argmax(&l), plain(&l), "len {len} case {case}");
            }
        }
        assert_eq!(argmax(&[1.0, 5.0, 5.0, f32::NAN]), 1);
    }

    #[test]
    fn greedy_picks_the_max_and_penalty_can_change_it() {
        let mut s = Sampler::new(SamplingConfig::default());
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9], &[]), 1);
        let mut p = Sampler::new(SamplingConfig { repetition_penalty: 2.0, ..Default::default() });
        assert_eq!(p.sample(&mut [0.1, 3.0, 2.9], &[1]), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_is_reproducible() {
        let cfg = SamplingConfig { temperature: 1.0, top_k: 1, ..Default::default() };
        let mut s = Sampler::new(cfg);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 0.5, 0.9], &[]), 1);
        }
        let cfg = SamplingConfig { temperature: 1.0, seed: 42, ..Default::default() };
        let logits = [0.0f32, 0.2, 0.1, 0.3, 0.25];
        let run = || {
            let mut s = Sampler::new(cfg.clone());
            (0..32).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(a.iter().any(|&t| t != a[0]), "sampling at T=1 should vary: {a:?}");
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let cfg = SamplingConfig { temperature: 1.0, top_p: 0.5, seed: 3, ..Default::default() };
        let mut s = Sampler::new(cfg);
        // Token 2 holds ~88% of the mass: the nucleus at p=0.5 is {2}.
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 0.0, 3.0, 0.0], &[]), 2);
        }
    }
}
