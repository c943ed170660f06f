//! `qaq-worker eval`: quality of the KV policies on real data with the real
//! model, in-process, through the worker's own forward pass and caches.
//!
//! - [`tasks`]: data loaders and prompt formats; the seeded sample.
//! - [`run`]: the protocols (multiple choice, perplexity, retrieval).
//! - [`store`]: per-(task, item, policy) results in a JSON-lines file, so runs
//!   resume and grow.
//! - [`report`]: rows per (task, policy); `eval.json`, `eval.md`, `eval.svg`.

pub mod report;
pub mod run;
pub mod store;
pub mod tasks;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use qaq_worker::config::DEFAULT_MODEL;
use qaq_worker::kv::PolicyChoice;
use qaq_worker::model::LoadedModel;
use store::{Outcome, Record, Store};
use tasks::McTask;

/// The policies of a full evaluation (issue 6's list).
pub const DEFAULT_POLICIES: &str = "fp16;uniform:8;uniform:4;uniform:3;uniform:2;uniform-k:2;uniform-v:2;kivi;\
qaq:sigma_s=0.003,sigma_x=0.003;qaq;qaq:sigma_s=0.03,sigma_x=0.03;qaq:sigma_s=0.1,sigma_x=0.1;qaq:alpha=0;qaq:window=1;\
qaq:sigma_s=0.001,sigma_x=0.03,bmin=1;qaq-tuned;qaq:sigma_s=0.001,sigma_x=0.03,bmin=1,kscale=1;\
qaq-tuned:sigma_s=0.003;qaq-tuned:sinks=4;qaq-tuned:valpha=0";

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Model: a .gguf file or an HF safetensors folder.
    #[arg(long, env = "QAQ_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Device: cpu, or cuda:N (GPU N; needs a build with the `cuda` feature).
    #[arg(long, env = "QAQ_DEVICE", default_value = "cpu", value_parser = qaq_worker::device::Device::parse)]
    pub device: qaq_worker::device::Device,
    /// The evaluation data folder (shared/data).
    #[arg(long, env = "QAQ_EVAL_DATA", default_value = "../shared/data")]
    pub data: PathBuf,
    /// Tasks: hellaswag, piqa, arc_easy, arc_challenge, winogrande, mathqa,
    /// ppl (WikiText-2 perplexity), kv (key–value retrieval, shared/data),
    /// passkey (generated passkey retrieval).
    #[arg(long, value_delimiter = ',', default_value = "hellaswag,piqa")]
    pub tasks: Vec<String>,
    /// KV policies, `;`-separated (fp16 is always added: rows are compared with it).
    #[arg(long, default_value = DEFAULT_POLICIES)]
    pub policies: String,
    /// Items per multiple-choice task (default: all).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seed of the item sample.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Perplexity: window lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "2048,8192")]
    pub ppl_contexts: Vec<usize>,
    /// Perplexity: windows per length (consecutive, from the start of the text).
    #[arg(long, default_value_t = 4)]
    pub ppl_windows: usize,
    /// Perplexity text.
    #[arg(long, default_value = "wikitext2/wiki.test.raw")]
    pub ppl_text: PathBuf,
    /// Perplexity: which predictions of each window are scored: `all` (task `ppl@N`),
    /// `second-half` (task `ppl-half@N`: the second half of each window, the first half
    /// being context only, as llama.cpp's llama-perplexity scores its chunks), or `both`.
    #[arg(long, default_value = "all", value_parser = ["all", "second-half", "both"])]
    pub ppl_score: String,
    /// Retrieval: context lengths in tokens (kv: the files kv_pairs_*_len_N).
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192")]
    pub kv_contexts: Vec<usize>,
    /// Retrieval: items per context length (kv: sampled over the three gold
    /// positions; passkey: depths 5%..95% in turn).
    #[arg(long, default_value_t = 100)]
    pub kv_limit: usize,
    /// Results file (resumed); measured items are not measured again.
    #[arg(long, default_value = "target/eval/results.jsonl")]
    pub results: PathBuf,
    /// Folder for eval.json, eval.md and eval.svg.
    #[arg(long, default_value = "target/eval")]
    pub out: PathBuf,
    /// Measure nothing: report what the results file already holds for the
    /// selected tasks, items and policies (rows cover the items measured).
    #[arg(long)]
    pub report_only: bool,
    /// Measure only every N-th item, from the K-th on (`K/N`, positions in the sampled
    /// order; perplexity: windows). One forward pass uses one core, so N processes with
    /// separate `--results` files measure N times as fast; concatenate the files, then
    /// `--report-only` reports them together.
    #[arg(long, default_value = "0/1", value_parser = Shard::parse)]
    pub shard: Shard,
}

/// `--shard K/N`: the items at positions `K, K + N, K + 2N, ...`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub k: usize,
    pub n: usize,
}

impl Shard {
    /// Parses `K/N` with `0 <= K < N <= 64`.
    pub fn parse(s: &str) -> Result<Shard, String> {
        let bad = || format!("--shard: {s:?} is not K/N with 0 <= K < N <= 64 (e.g. 1/2)");
        let (k, n) = s.trim().split_once('/').ok_or_else(bad)?;
        let (k, n) = (k.parse::<usize>().map_err(|_| bad())?, n.parse::<usize>().map_err(|_| bad())?);
        if k < n && n <= 64 { Ok(Shard { k, n }) } else { Err(bad()) }
    }

    /// Whether this process measures the item at `pos`.
    pub fn owns(&self, pos: usize) -> bool {
        pos % self.n == self.k
    }
}

/// Progress on stderr: a redrawn bar on a terminal, a line per 10% otherwise.
struct Progress {
    label: String,
    total: usize,
    done: usize,
    start: Instant,
    tty: bool,
    last_decile: usize,
}

impl Progress {
    fn new(label: String, total: usize) -> Self {
        Self { label, total, done: 0, start: Instant::now(), tty: std::io::stderr().is_terminal(), last_decile: 0 }
    }
    fn tick(&mut self) {
        self.done += 1;
        let el = self.start.elapsed().as_secs_f64();
        let eta = el / self.done as f64 * (self.total - self.done) as f64;
        let width = 30;
        let fill = width * self.done / self.total.max(1);
        let line = format!(
            "{:<16} [{}{}] {}/{} {:.0}s elapsed, ETA {:.0}s",
            self.label,
            "#".repeat(fill),
            " ".repeat(width - fill),
            self.done,
            self.total,
            el,
            eta
        );
        if self.tty {
            eprint!("\r{line}");
            if self.done == self.total {
                eprintln!();
            }
        } else if self.done * 10 / self.total.max(1) > self.last_decile || self.done == self.total {
            self.last_decile = self.done * 10 / self.total.max(1);
            eprintln!("{line}");
        }
    }
}

fn parse_policies(s: &str) -> anyhow::Result<Vec<PolicyChoice>> {
    let mut out = vec![PolicyChoice::parse("fp16").map_err(anyhow::Error::msg)?];
    for p in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let c = PolicyChoice::parse(p).map_err(|e| anyhow::anyhow!("--policies: {e}"))?;
        if !out.iter().any(|o| o.label == c.label) {
            out.push(c);
        }
    }
    Ok(out)
}

/// Runs `f` for the policies of `item` that have no result yet, storing what it returns.
fn measure(
    dry: bool,
    store: &mut Store,
    task: &str,
    item: &str,
    policies: &[PolicyChoice],
    f: impl FnOnce(&[PolicyChoice]) -> anyhow::Result<Vec<(Outcome, store::KvBytes)>>,
) -> anyhow::Result<()> {
    let todo: Vec<PolicyChoice> =
        policies.iter().filter(|p| store.get(task, item, &p.label).is_none()).cloned().collect();
    if todo.is_empty() || dry {
        return Ok(());
    }
    let results = f(&todo)?;
    for (p, (outcome, kv)) in todo.iter().zip(results) {
        let params = store::params_of(p);
        store.put(Record { task: task.into(), item: item.into(), policy: p.label.clone(), params, outcome, kv })?;
    }
    Ok(())
}

/// `qaq-worker eval`: [`evaluate`], then the outputs in `--out` and the tables on stdout.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let model = args.device.load_model(&args.model)?;
    let rows = evaluate(&args, &model)?;
    let meta = serde_json::json!({
        "model": args.model.display().to_string(),
        "seed": args.seed,
        "limit": args.limit,
        "tasks": args.tasks,
        "policies": parse_policies(&args.policies)?.into_iter().map(|p| p.label).collect::<Vec<_>>(),
        "ppl_windows": args.ppl_windows,
        "ppl_score": args.ppl_score,
        "kv_limit": args.kv_limit,
        "protocol": "zero-shot MC, mean per-token log-prob (qaq-algorithm.md 8.2); exact shared fp16 prefill, \
                     choices decoded token by token against each policy's compressed cache",
    });
    let header = format!(
        "# KV-policy evaluation\n\nModel `{}`; seed {}; generated by `qaq-worker eval` (`{}`).\n\
         Ratios count every stored byte (codes, metadata, outlier values and indices, padding); \
         the paper-style ratio (codes + metadata + 16 bits per outlier) is labelled as such.\n",
        args.model.display(),
        args.seed,
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    report::write(&args.out, &rows, &meta, &header)?;
    println!("{}", report::markdown(&rows, ""));
    eprintln!("eval: {:.0}s; results in {}", started.elapsed().as_secs_f64(), args.out.display());
    Ok(())
}

/// Measures what `args` asks for (reusing stored results) and returns one row
/// per (task, policy).
pub fn evaluate(args: &EvalArgs, model: &LoadedModel) -> anyhow::Result<Vec<report::Row>> {
    let policies = parse_policies(&args.policies)?;
    let labels: Vec<String> = policies.iter().map(|p| p.label.clone()).collect();
    anyhow::ensure!(args.limit != Some(0), "--limit: must be at least 1");
    let mut mc_tasks = Vec::new();
    let (mut want_ppl, mut want_kv, mut want_passkey) = (false, false, false);
    for t in &args.tasks {
        match t.as_str() {
            "ppl" => want_ppl = true,
            "kv" => want_kv = true,
            "passkey" => want_passkey = true,
            other => mc_tasks.push(McTask::parse(other).ok_or_else(|| {
                anyhow::anyhow!(
                    "--tasks: unknown task {other:?}; accepted: hellaswag, piqa, arc_easy, arc_challenge, winogrande, mathqa, ppl, kv, passkey"
                )
            })?),
        }
    }
    let mut store = Store::open(&args.results, &policies)?;
    let mut rows = Vec::new();

    for task in mc_tasks {
        let all = task.load(&args.data)?;
        let pick = tasks::sample(all.len(), args.limit, args.seed);
        let mut bar = Progress::new(task.name().into(), pick.len());
        for (pos, &i) in pick.iter().enumerate() {
            let item = &all[i];
            let skip = args.report_only || !args.shard.owns(pos);
            measure(skip, &mut store, task.name(), &item.id.to_string(), &policies, |todo| {
                let scores = run::score_mc(model, item, todo)?;
                let chars: Vec<u32> = item.continuations.iter().map(|c| c.trim().chars().count() as u32).collect();
                Ok(scores
                    .into_iter()
                    .map(|s| {
                        let o =
                            Outcome::Mc { sum_lp: s.sum_lp, tokens: s.tokens, chars: chars.clone(), label: item.label };
                        (o, s.kv)
                    })
                    .collect())
            })?;
            bar.tick();
        }
        let ids: Vec<String> = pick.iter().map(|&i| all[i].id.to_string()).collect();
        rows.extend(report::aggregate(task.name(), &ids, &labels, |it, p| store.get(task.name(), it, p).cloned()));
    }

    if want_ppl {
        let path = args.data.join(&args.ppl_text);
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let ids = model.tokenizer.encode(&text)?;
        let scorings: &[(&str, bool)] = match args.ppl_score.as_str() {
            "second-half" => &[("ppl-half", true)],
            "both" => &[("ppl", false), ("ppl-half", true)],
            _ => &[("ppl", false)],
        };
        for (&ctx, &(task, half)) in args.ppl_contexts.iter().flat_map(|c| scorings.iter().map(move |s| (c, s))) {
            check_context(model, "--ppl-contexts", ctx)?;
            let name = format!("{task}@{ctx}");
            let from = if half { ctx / 2 } else { 0 };
            let n = args.ppl_windows.min(ids.len() / ctx);
            anyhow::ensure!(n > 0, "--ppl-contexts: the text has {} tokens, fewer than {ctx}", ids.len());
            let mut bar = Progress::new(name.clone(), n * policies.len());
            let mut items = Vec::new();
            for w in 0..n {
                let window = &ids[w * ctx..(w + 1) * ctx];
                items.push(w.to_string());
                for p in &policies {
                    let skip = args.report_only || !args.shard.owns(w);
                    measure(skip, &mut store, &name, &w.to_string(), std::slice::from_ref(p), |_| {
                        let (nll, tokens, kv) = run::perplexity(model, window, p, from)?;
                        Ok(vec![(Outcome::Ppl { nll, tokens }, kv)])
                    })?;
                    bar.tick();
                }
            }
            rows.extend(report::aggregate(&name, &items, &labels, |it, p| store.get(&name, it, p).cloned()));
        }
    }

    let retrieval = [("kv", want_kv), ("passkey", want_passkey)];
    for (kind, _) in retrieval.into_iter().filter(|(_, on)| *on) {
        for &ctx in &args.kv_contexts {
            let all = if kind == "kv" {
                tasks::load_kv(&args.data, ctx)?
            } else {
                let count = |s: &str| model.tokenizer.encode_continuation(s).map_or(0, |v| v.len());
                tasks::passkey_items(ctx, args.kv_limit, args.seed, count)
            };
            let name = format!("{kind}@{ctx}");
            let pick = tasks::sample(all.len(), Some(args.kv_limit), args.seed);
            let mut bar = Progress::new(name.clone(), pick.len());
            let (mut items, mut too_long) = (Vec::new(), 0);
            for (pos, &i) in pick.iter().enumerate() {
                let item = &all[i];
                let (doc, q) = run::kv_prompt(model, item)?;
                if doc.len() + q.len() + 64 > model.model.config().context_length {
                    too_long += 1;
                    bar.tick();
                    continue;
                }
                items.push(item.id.clone());
                let skip = args.report_only || !args.shard.owns(pos);
                measure(skip, &mut store, &name, &item.id, &policies, |todo| {
                    Ok(run::retrieve(model, item, (&doc, &q), todo)?
                        .into_iter()
                        .map(|r| (Outcome::Retrieval { correct: r.correct, output: r.output }, r.kv))
                        .collect())
                })?;
                bar.tick();
            }
            if too_long > 0 {
                eprintln!("{name}: {too_long} items left out: prompt longer than the model's context");
            }
            rows.extend(report::aggregate(&name, &items, &labels, |it, p| store.get(&name, it, p).cloned()));
        }
    }

    Ok(rows)
}

fn check_context(model: &LoadedModel, flag: &str, ctx: usize) -> anyhow::Result<()> {
    let max = model.model.config().context_length;
    anyhow::ensure!((2..=max).contains(&ctx), "{flag}: {ctx} must be in [2, {max}] (the model's context)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Shard;

    #[test]
    fn shards_split_the_positions_without_overlap_or_gaps() {
        let shards = [Shard::parse("0/3").unwrap(), Shard::parse(" 1/3").unwrap(), Shard::parse("2/3 ").unwrap()];
        for pos in 0..30 {
            assert_eq!(shards.iter().filter(|s| s.owns(pos)).count(), 1, "position {pos}");
        }
        assert!(Shard::parse("0/1").unwrap().owns(7));
    }

    #[test]
    fn bad_shards_name_the_flag_and_the_form() {
        for bad in ["", "1", "2/2", "3/2", "-1/2", "0/0", "0/65", "a/b", "1/2/3"] {
            let e = Shard::parse(bad).unwrap_err();
            assert!(e.starts_with("--shard:") && e.contains("K/N"), "{bad:?}: {e}");
        }
    }
}
