//! Dumps one prompt's real KV cache and queries from the model, in the format
//! `kernels/examples/kv_report.rs` reads (magic `QAQKVD01`, five LE u32:
//! n_layers, n_kv_heads, n_q_heads, head_dim, n_tokens; then f32 K, V
//! `[layer][token][kv_head*head_dim]` and Q `[layer][token][q_head*head_dim]`,
//! post-RoPE).
//!
//! Usage: `cargo run --release -p qaq-worker --example dump_kv -- MODEL TEXT_FILE TOKENS OUT`

use std::io::Write;

use qaq_worker::model::{BatchItem, DenseKv, DeviceTier, KvCache, KvError, KvShape, load_model};

/// A dense cache that also records every query row it is asked to attend with.
struct Recording {
    inner: DenseKv,
    shape: KvShape,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    queries: Vec<Vec<f32>>,
}

impl KvCache for Recording {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), KvError> {
        self.keys[layer].extend_from_slice(k);
        self.values[layer].extend_from_slice(v);
        self.inner.append(layer, k, v)
    }
    fn attend(&mut self, layer: usize, q: &[f32], n_q: usize, out: &mut [f32]) -> Result<(), KvError> {
        self.queries[layer].extend_from_slice(q);
        self.inner.attend(layer, q, n_q, out)
    }
    fn device_tier(&mut self) -> Option<&mut dyn DeviceTier> {
        None
    }
    fn bytes_used(&self) -> usize {
        self.inner.bytes_used()
    }
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(a.len() == 5, "usage: dump_kv MODEL TEXT_FILE TOKENS OUT");
    let model = load_model(std::path::Path::new(&a[1]))?;
    let text = std::fs::read_to_string(&a[2])?;
    let n: usize = a[3].parse()?;
    let mut ids = model.tokenizer.encode(&text)?;
    anyhow::ensure!(ids.len() >= n, "the text has only {} tokens", ids.len());
    ids.truncate(n);
    let shape = model.model.kv_shape();
    let l = shape.n_layers;
    let mut rec = Recording {
        inner: DenseKv::new(shape),
        shape,
        keys: vec![Vec::new(); l],
        values: vec![Vec::new(); l],
        queries: vec![Vec::new(); l],
    };
    model.model.forward(&mut [BatchItem { tokens: &ids, kv: &mut rec }])?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(&a[4])?);
    f.write_all(b"QAQKVD01")?;
    for x in [l, rec.shape.n_kv_heads, rec.shape.n_heads, rec.shape.head_dim, n] {
        f.write_all(&(x as u32).to_le_bytes())?;
    }
    for part in [&rec.keys, &rec.values, &rec.queries] {
        for layer in part.iter() {
            for x in layer {
                f.write_all(&x.to_le_bytes())?;
            }
        }
    }
    f.flush()?;
    eprintln!("dumped {n} tokens x {l} layers to {}", a[4]);
    Ok(())
}
