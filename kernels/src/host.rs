//! Host tier: the fp16 backup of every token's K and V rows, behind a trait so the
//! worker can put it wherever it likes, budget it and evict from it.

use half::f16;

/// Storage for fp16 backups of whole rows (`n_kv_heads * head_dim` values each) of
/// one sequence, addressed by (layer, token). `Sync`: re-quantization reads it from
/// several threads at once.
pub trait HostTier: Send + Sync {
    /// Stores the K and V rows of `(layer, token)`.
    fn put(&mut self, layer: usize, token: usize, k: &[f16], v: &[f16]);
    /// The K and V rows, or `None` if never stored or evicted.
    fn get(&self, layer: usize, token: usize) -> Option<(&[f16], &[f16])>;
    /// Drops the backup of `(layer, token)`; returns whether it was present. A token
    /// without backup can no longer be re-quantized upward (counted, not an error).
    fn evict(&mut self, layer: usize, token: usize) -> bool;
    /// Bytes currently held.
    fn bytes(&self) -> usize;
}

/// The default host tier: one boxed K|V row per (layer, token) in RAM.
#[derive(Debug, Default)]
pub struct InMemoryHost {
    layers: Vec<Vec<Option<Box<[f16]>>>>,
    bytes: usize,
}

impl InMemoryHost {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl HostTier for InMemoryHost {
    fn put(&mut self, layer: usize, token: usize, k: &[f16], v: &[f16]) {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, Vec::new);
        }
        let l = &mut self.layers[layer];
        if l.len() <= token {
            l.resize_with(token + 1, || None);
        }
        let mut row = Vec::with_capacity(k.len() + v.len());
        row.extend_from_slice(k);
        row.extend_from_slice(v);
        self.bytes += 2 * row.len();
        if let Some(old) = l[token].replace(row.into_boxed_slice()) {
            self.bytes -= 2 * old.len();
        }
    }
    fn get(&self, layer: usize, token: usize) -> Option<(&[f16], &[f16])> {
        let row = self.layers.get(layer)?.get(token)?.as_deref()?;
        Some(row.split_at(row.len() / 2))
    }
    fn evict(&mut self, layer: usize, token: usize) -> bool {
        match self.layers.get_mut(layer).and_then(|l| l.get_mut(token)).and_then(Option::take) {
            Some(old) => {
                self.bytes -= 2 * old.len();
                true
            }
            None => false,
        }
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_evict() {
        let mut h = InMemoryHost::new();
        let k = [f16::from_f32(1.0); 4];
        let v = [f16::from_f32(2.0); 4];
        h.put(1, 3, &k, &v);
        assert_eq!(h.bytes(), 16);
        let (gk, gv) = h.get(1, 3).unwrap();
        assert_eq!((gk, gv), (&k[..], &v[..]));
        assert!(h.get(0, 0).is_none());
        assert!(h.evict(1, 3));
        assert!(!h.evict(1, 3));
        assert_eq!(h.bytes(), 0);
        assert!(h.get(1, 3).is_none());
    }
}
