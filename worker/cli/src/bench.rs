//! `qaq-worker bench`: the engine measured in-process, side by side in one run.
//!
//! - Batch mode (default): decode tokens/s for several batch sizes, and prefill tokens/s
//!   of as many `--prefill-tokens` prompts of real text (a separate run per batch size).
//!   With `--repeat N` (both modes) the measurements are made in N rounds, each round
//!   every batch size (or policy and context) once, and the tables give medians: on a
//!   shared machine the ones compared then see the same stretches of load.
//! - Context mode (`--contexts`): for each KV policy and context length, one
//!   sequence prefilled with real text, then decoded: decode tokens/s, real
//!   device bytes per cached token, how many sequences of 4k tokens fit
//!   in a device budget, and the prefill's tokens/s.
//! - Migration mode (`--contexts` with `--migration`): for each policy and context,
//!   the prefill of real text against moving its KV cache instead (snapshot, then
//!   restore: what a worker does on each side of Worker.ExportKv, without the
//!   network), side by side, and the snapshot's bytes per token (the transfer).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;

use qaq_worker::config::DEFAULT_MODEL;
use qaq_worker::engine::{EngineConfig, EngineHandle, Event, Job, KvSummary, SamplingConfig};
use qaq_worker::kv::{self, PolicyChoice};
use qaq_worker::model::LoadedModel;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Model: a .gguf file or an HF safetensors folder.
    #[arg(long, env = "QAQ_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Device: cpu, or cuda:N (GPU N; needs a build with the `cuda` feature).
    #[arg(long, env = "QAQ_DEVICE", default_value = "cpu", value_parser = qaq_worker::device::Device::parse)]
    pub device: qaq_worker::device::Device,
    /// Concurrent sequences, one run each (batch mode).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch: Vec<usize>,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 64)]
    pub tokens: u32,
    /// Prompt of every sequence (batch mode).
    #[arg(long, default_value = "The history of the Roman Empire")]
    pub prompt: String,
    /// KV policies to compare (context mode) or the one to use (batch mode: the first).
    #[arg(long, value_delimiter = ';', default_value = "fp16;qaq")]
    pub policies: Vec<String>,
    /// Context lengths (switches to context mode).
    #[arg(long, value_delimiter = ',')]
    pub contexts: Vec<usize>,
    /// Real text the context-mode prompts are cut from.
    #[arg(long, default_value = "../shared/data/wikitext2/wiki.test.raw")]
    pub text: PathBuf,
    /// Device budget for the "sequences that fit" column, in bytes.
    #[arg(long, default_value_t = 256 << 20)]
    pub fit_budget_bytes: u64,
    /// Sequence length for the "sequences that fit" column.
    #[arg(long, default_value_t = 4096)]
    pub fit_tokens: usize,
    /// Context mode: measure KV migration (snapshot + restore) against the prefill.
    #[arg(long)]
    pub migration: bool,
    /// Batch mode: prompt length (tokens of `--text`) of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prefill_tokens: usize,
    /// Rounds of measurements (batch and context modes): each round measures every batch
    /// size (or every policy at every context) once, so that the ones compared alternate
    /// in time; the tables give medians over the rounds, and a last column each round's
    /// decode tokens/s.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
}

/// One measured run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    pub policy: String,
    pub batch: usize,
    pub context: usize,
    pub tokens_per_seq: u32,
    /// Decode tokens per second, all sequences together (first tokens excluded).
    pub decode_tokens_per_s: f64,
    /// Mean time to first token in seconds.
    pub mean_ttft_s: f64,
    /// Prompt tokens of all sequences per second until the last first token.
    pub prefill_tokens_per_s: f64,
    /// Real device bytes per cached token at the end.
    pub bytes_per_token: f64,
    /// fp16 bytes per cached token.
    pub fp16_bytes_per_token: f64,
    pub avg_key_bits: f64,
    pub avg_value_bits: f64,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.tokens >= 2, "--tokens: must be at least 2");
    anyhow::ensure!(args.batch.iter().all(|&b| (1..=256).contains(&b)), "--batch: each in [1, 256]");
    anyhow::ensure!((1..=100).contains(&args.repeat), "--repeat: must be in [1, 100]");
    let policies = args
        .policies
        .iter()
        .map(|p| PolicyChoice::parse(p).map_err(|e| anyhow::anyhow!("--policies: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!policies.is_empty(), "--policies: give at least one");
    let model = Arc::new(args.device.load_model(&args.model)?);
    let text =
        std::fs::read_to_string(&args.text).map_err(|e| anyhow::anyhow!("--text {}: {e}", args.text.display()))?;
    let ids = model.tokenizer.encode(&text)?;
    if args.contexts.is_empty() {
        let prompt = model.tokenizer.encode(&args.prompt)?;
        let n = args.prefill_tokens;
        anyhow::ensure!(n >= 1 && n < model.model.config().context_length, "--prefill-tokens: must be in [1, context)");
        for &b in &args.batch {
            anyhow::ensure!(ids.len() >= b * n, "--text has only {} tokens, fewer than {b} x {n}", ids.len());
        }
        // runs[i]: (decode row, prefill tok/s) of batch size i, one per round.
        let mut runs: Vec<Vec<(BenchRow, f64)>> = vec![Vec::new(); args.batch.len()];
        for _ in 0..args.repeat {
            for (&b, runs) in args.batch.iter().zip(&mut runs) {
                let r = measure(&model, &policies[0], &vec![prompt.clone(); b], args.tokens)?;
                // Prefill: b prompts of n real-text tokens (different passages), one token each.
                let long: Vec<Vec<u32>> = ids.chunks(n).take(b).map(<[u32]>::to_vec).collect();
                let p = measure(&model, &policies[0], &long, 1)?;
                runs.push((r, p.prefill_tokens_per_s));
            }
        }
        println!(
            "| policy | batch | tokens/seq | decode tok/s (all) | tok/s per sequence | mean TTFT (s) | prefill tok/s ({n}-token prompts) | decode tok/s per round |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for (&b, runs) in args.batch.iter().zip(&runs) {
            let decode = median(runs.iter().map(|(r, _)| r.decode_tokens_per_s));
            let r = &runs[0].0;
            println!(
                "| {} | {} | {} | {:.1} | {:.1} | {:.3} | {:.1} | {} |",
                r.policy,
                r.batch,
                r.tokens_per_seq,
                decode,
                decode / b as f64,
                median(runs.iter().map(|(r, _)| r.mean_ttft_s)),
                median(runs.iter().map(|&(_, p)| p)),
                rounds(runs.iter().map(|(r, _)| r.decode_tokens_per_s))
            );
        }
        return Ok(());
    }
    let ctx_max = model.model.config().context_length;
    if args.migration {
        return migration_table(&model, &policies, &args.contexts, &ids);
    }
    for &c in &args.contexts {
        // Context = prompt + generated tokens.
        anyhow::ensure!(
            c <= ctx_max && c > args.tokens as usize,
            "--contexts: {c} must be in ({}, {ctx_max}] (prompt plus --tokens)",
            args.tokens
        );
        let prompt = c - args.tokens as usize;
        anyhow::ensure!(ids.len() >= prompt, "--text has only {} tokens, fewer than {prompt}", ids.len());
    }
    // runs[policy][context]: one row per round; a round measures every policy at every
    // context, so that the policies compared at one context alternate in time.
    let mut runs: Vec<Vec<Vec<BenchRow>>> = vec![vec![Vec::new(); args.contexts.len()]; policies.len()];
    for _ in 0..args.repeat {
        for (p, runs) in policies.iter().zip(&mut runs) {
            for (&c, runs) in args.contexts.iter().zip(runs) {
                let prompt = c - args.tokens as usize;
                runs.push(measure(&model, p, &[ids[..prompt].to_vec()], args.tokens)?);
            }
        }
    }
    println!(
        "| policy | context | decode tok/s | bytes/token | fp16 bytes/token | ratio | K bits | V bits | {}-token seqs in {} MiB | prefill tok/s | decode tok/s per round |",
        args.fit_tokens,
        args.fit_budget_bytes >> 20
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for runs in &runs {
        for (&c, runs) in args.contexts.iter().zip(runs) {
            // The cache's contents do not depend on the round: its figures from the first.
            let r = &runs[0];
            let fit = (args.fit_budget_bytes as f64 / (args.fit_tokens as f64 * r.bytes_per_token)).floor();
            println!(
                "| {} | {} | {:.2} | {:.0} | {:.0} | {:.2}x | {:.2} | {:.2} | {fit} | {:.1} | {} |",
                r.policy,
                c,
                median(runs.iter().map(|r| r.decode_tokens_per_s)),
                r.bytes_per_token,
                r.fp16_bytes_per_token,
                r.fp16_bytes_per_token / r.bytes_per_token,
                r.avg_key_bits,
                r.avg_value_bits,
                median(runs.iter().map(|r| r.prefill_tokens_per_s)),
                rounds(runs.iter().map(|r| r.decode_tokens_per_s))
            );
        }
    }
    Ok(())
}

/// The median (the mean of the middle two for an even count; NaN for none).
fn median(v: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Each round's value, in round order, for the last column.
fn rounds(v: impl Iterator<Item = f64>) -> String {
    v.map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(", ")
}

/// Migration mode: per policy and context, the prefill of `ids` against snapshot +
/// restore of the cache it built; the restored cache is checked to continue exactly.
fn migration_table(
    model: &LoadedModel,
    policies: &[PolicyChoice],
    contexts: &[usize],
    ids: &[u32],
) -> anyhow::Result<()> {
    use qaq_worker::kv::SeqCache;
    use qaq_worker::model::BatchItem;
    let shape = model.model.kv_shape();
    println!(
        "| policy | context | prefill s | snapshot bytes/token | snapshot ms | restore ms | prefill / (snapshot + restore) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for p in policies {
        for &c in contexts {
            anyhow::ensure!(
                (2..model.model.config().context_length).contains(&c) && c <= ids.len(),
                "--contexts: {c} must be in [2, {}) and within the text",
                model.model.config().context_length
            );
            let mut kv = SeqCache::new(&shape, p).map_err(|e| anyhow::anyhow!("{}: {e}", p.label))?;
            let t0 = Instant::now();
            for chunk in ids[..c - 1].chunks(512) {
                model.model.forward(&mut [BatchItem { tokens: chunk, kv: &mut kv }])?;
            }
            let prefill = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let bytes = kv.snapshot()?;
            let snap = t1.elapsed().as_secs_f64();
            let t2 = Instant::now();
            let mut moved = SeqCache::restore(&shape, p, &bytes)?;
            let restore = t2.elapsed().as_secs_f64();
            let next = [ids[c - 1]];
            let a = model.model.forward(&mut [BatchItem { tokens: &next, kv: &mut kv }])?;
            let b = model.model.forward(&mut [BatchItem { tokens: &next, kv: &mut moved }])?;
            anyhow::ensure!(a == b, "{}: the restored cache does not continue exactly", p.label);
            println!(
                "| {} | {c} | {prefill:.2} | {:.0} | {:.1} | {:.1} | {:.0}x |",
                p.label,
                bytes.len() as f64 / (c - 1) as f64,
                snap * 1e3,
                restore * 1e3,
                prefill / (snap + restore)
            );
        }
    }
    Ok(())
}

/// Runs one greedy sequence of `tokens` tokens per prompt, all at once, under `policy`.
pub fn measure(
    model: &Arc<LoadedModel>,
    policy: &PolicyChoice,
    prompts: &[Vec<u32>],
    tokens: u32,
) -> anyhow::Result<BenchRow> {
    let batch = prompts.len();
    let worst = kv::worst_bytes_per_token(&model.model.kv_shape(), &policy.policy).map_err(anyhow::Error::msg)?;
    let cfg = EngineConfig {
        max_batch: batch,
        budgets: qaq_worker::engine::Budgets { device: u64::MAX, host: u64::MAX },
        ..Default::default()
    };
    let engine = EngineHandle::start(model.clone(), cfg);
    let start = Instant::now();
    let mut rxs = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        engine.submit(Job {
            id: format!("bench-{i}"),
            prompt: prompt.clone(),
            resume: vec![],
            kv: None,
            max_new_tokens: tokens,
            sampling: SamplingConfig::default(),
            stops: vec![],
            ignore_eos: true,
            policy: policy.clone(),
            worst_bytes_per_token: worst,
            events: tx,
            received: start,
        })?;
        rxs.push(rx);
    }
    // One collector thread per sequence, so every first token is timed when it arrives.
    let collectors: Vec<_> = rxs
        .into_iter()
        .map(|mut rx| {
            std::thread::spawn(move || -> anyhow::Result<(f64, u64, KvSummary)> {
                let mut first = None;
                while let Some(ev) = rx.blocking_recv() {
                    first.get_or_insert_with(|| start.elapsed().as_secs_f64());
                    match ev {
                        Event::Delta { .. } => {}
                        Event::Done { completion_tokens, kv, .. } => {
                            return Ok((first.unwrap_or_default(), u64::from(completion_tokens), kv));
                        }
                        Event::Failed(e) => anyhow::bail!("bench sequence failed: {e}"),
                    }
                }
                anyhow::bail!("bench sequence ended without a result")
            })
        })
        .collect();
    let (mut first, mut generated, mut kv) = (Vec::new(), 0u64, KvSummary::default());
    for c in collectors {
        let (f, n, k) = c.join().map_err(|_| anyhow::anyhow!("collector panicked"))??;
        first.push(f);
        generated += n;
        kv = k;
    }
    let end = start.elapsed().as_secs_f64();
    let last_first = first.iter().cloned().fold(0.0, f64::max);
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    // The last sequence's cache (the statistics below are per token, like every other).
    let cached = (prompts[batch - 1].len() + tokens as usize - 1) as f64;
    Ok(BenchRow {
        policy: policy.label.clone(),
        batch,
        context: prompts[0].len(),
        tokens_per_seq: tokens,
        decode_tokens_per_s: (generated - batch as u64) as f64 / (end - last_first).max(1e-9),
        mean_ttft_s: first.iter().sum::<f64>() / batch as f64,
        prefill_tokens_per_s: prompt_tokens as f64 / last_first.max(1e-9),
        bytes_per_token: kv.device_bytes as f64 / cached,
        fp16_bytes_per_token: kv.fp16_equivalent_bytes as f64 / cached,
        avg_key_bits: kv.avg_key_bits,
        avg_value_bits: kv.avg_value_bits,
    })
}

#[cfg(test)]
mod tests {
    use super::{median, rounds};

    #[test]
    fn median_of_odd_and_even_counts_and_the_rounds_column() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0].into_iter()), 2.5);
        assert_eq!(median([7.5].into_iter()), 7.5);
        assert!(median(std::iter::empty()).is_nan());
        assert_eq!(rounds([482.54, 510.0].into_iter()), "482.5, 510.0");
    }
}
