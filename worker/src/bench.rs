//! `qaq-worker bench`: decode throughput of the engine in-process, for several
//! batch sizes side by side in the same run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;

use crate::config::DEFAULT_MODEL;
use crate::engine::{EngineConfig, EngineHandle, Event, Job, SamplingConfig};
use crate::model::load_model;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Model: a .gguf file or an HF safetensors folder.
    #[arg(long, env = "QAQ_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Concurrent sequences, one run each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch: Vec<usize>,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 64)]
    pub tokens: u32,
    /// Prompt of every sequence.
    #[arg(long, default_value = "The history of the Roman Empire")]
    pub prompt: String,
}

/// One measured configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    pub batch: usize,
    pub tokens_per_seq: u32,
    /// Decode tokens per second, all sequences together (first tokens excluded).
    pub decode_tokens_per_s: f64,
    /// Per-sequence decode tokens per second.
    pub per_seq_tokens_per_s: f64,
    /// Mean time to first token in seconds.
    pub mean_ttft_s: f64,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.tokens >= 2, "--tokens: must be at least 2");
    anyhow::ensure!(args.batch.iter().all(|&b| (1..=256).contains(&b)), "--batch: each in [1, 256]");
    let model = Arc::new(load_model(&args.model).map_err(|e| anyhow::anyhow!("{}: {e}", args.model.display()))?);
    let prompt = model.tokenizer.encode(&args.prompt)?;
    println!("| batch | tokens/seq | decode tok/s (all) | tok/s per sequence | mean TTFT (s) |");
    println!("|---|---|---|---|---|");
    for &b in &args.batch {
        let row = measure(&model, &prompt, b, args.tokens)?;
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.3} |",
            row.batch, row.tokens_per_seq, row.decode_tokens_per_s, row.per_seq_tokens_per_s, row.mean_ttft_s
        );
    }
    Ok(())
}

/// Runs `batch` greedy sequences of `tokens` tokens each and measures them.
pub fn measure(
    model: &Arc<crate::model::LoadedModel>,
    prompt: &[u32],
    batch: usize,
    tokens: u32,
) -> anyhow::Result<BenchRow> {
    let engine = EngineHandle::start(model.clone(), EngineConfig { max_batch: batch, ..Default::default() });
    let start = Instant::now();
    let mut rxs = Vec::new();
    for i in 0..batch {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        engine.submit(Job {
            id: format!("bench-{i}"),
            prompt: prompt.to_vec(),
            resume: vec![],
            max_new_tokens: tokens,
            sampling: SamplingConfig::default(),
            stops: vec![],
            ignore_eos: true,
            events: tx,
            received: start,
        })?;
        rxs.push(rx);
    }
    // One collector thread per sequence, so every first token is timed when it arrives.
    let collectors: Vec<_> = rxs
        .into_iter()
        .map(|mut rx| {
            std::thread::spawn(move || -> anyhow::Result<(f64, u64)> {
                let mut first = None;
                while let Some(ev) = rx.blocking_recv() {
                    first.get_or_insert_with(|| start.elapsed().as_secs_f64());
                    match ev {
                        Event::Delta { .. } => {}
                        Event::Done { completion_tokens, .. } => {
                            return Ok((first.unwrap_or_default(), u64::from(completion_tokens)));
                        }
                        Event::Failed(e) => anyhow::bail!("bench sequence failed: {e}"),
                    }
                }
                anyhow::bail!("bench sequence ended without a result")
            })
        })
        .collect();
    let mut first = Vec::new();
    let mut generated = 0u64;
    for c in collectors {
        let (f, n) = c.join().map_err(|_| anyhow::anyhow!("collector panicked"))??;
        first.push(f);
        generated += n;
    }
    let end = start.elapsed().as_secs_f64();
    let last_first = first.iter().cloned().fold(0.0, f64::max);
    let decode = (generated - batch as u64) as f64 / (end - last_first).max(1e-9);
    Ok(BenchRow {
        batch,
        tokens_per_seq: tokens,
        decode_tokens_per_s: decode,
        per_seq_tokens_per_s: decode / batch as f64,
        mean_ttft_s: first.iter().sum::<f64>() / batch as f64,
    })
}
