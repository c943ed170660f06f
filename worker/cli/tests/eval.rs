//! The evaluation's regression subset (`make test`; `make eval` runs the full
//! one): 40 items of HellaSwag and PIQA, one perplexity window and four
//! passkeys of 1k tokens, fp16 against the worker's default policy and
//! `qaq-tuned`, on the real model and the real data. Bounds are wide enough for 40 items' sampling
//! noise and tight enough to catch a broken protocol, cache or accounting.

use std::path::{Path, PathBuf};

use clap::Parser;
use qaq_worker::config::DEFAULT_KV_POLICY;
use qaq_worker::model::{LoadedModel, load_model};
use qaq_worker_cli::eval::{EvalArgs, evaluate, report::Row};

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The default model (`make test` fetches it).
fn real() -> LoadedModel {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh (make test does)", p.display());
    load_model(&p).unwrap()
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: EvalArgs,
}

fn row<'a>(rows: &'a [Row], task: &str, policy: &str) -> &'a Row {
    rows.iter().find(|r| r.task == task && r.policy == policy).unwrap_or_else(|| panic!("no row {task} / {policy}"))
}

#[test]
fn eval_subset_stays_within_its_accuracy_and_compression_bounds_and_resumes() {
    let dir = std::env::temp_dir().join(format!("qaq-eval-ci-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = root().join("../shared/data");
    assert!(data.join("hellaswag").exists(), "{} is missing (shared/data)", data.display());
    let results = dir.join("results.jsonl");
    let policies = format!("qaq-tuned;{DEFAULT_KV_POLICY}");
    let argv = [
        "eval",
        "--data",
        data.to_str().unwrap(),
        "--tasks",
        "hellaswag,piqa,ppl,passkey",
        "--limit",
        "40",
        "--policies",
        &policies,
        "--ppl-contexts",
        "1024",
        "--ppl-windows",
        "1",
        "--kv-contexts",
        "1024",
        "--kv-limit",
        "4",
        "--results",
        results.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
    ];
    let args = Cli::parse_from(argv).args;
    let model = &real();
    let rows = evaluate(&args, model).unwrap();

    for task in ["hellaswag", "piqa"] {
        let (f, q) = (row(&rows, task, "fp16"), row(&rows, task, "qaq-tuned"));
        assert_eq!((f.items, q.items), (40, 40), "{task}");
        assert_eq!(f.real_ratio, 1.0, "{task}: fp16 stores every value raw");
        assert_eq!((f.k_bits, f.v_bits, f.agreement), (16.0, 16.0, Some(1.0)), "{task}");
        assert!(q.agreement.unwrap() >= 0.85, "{task}: QAQ agrees with fp16 on {:?}", q.agreement);
        assert!(q.real_ratio >= 3.0 && q.real_ratio < 16.0, "{task}: QAQ real ratio {}", q.real_ratio);
        assert!(q.paper_ratio > q.real_ratio, "{task}: the paper-style ratio leaves out indices and padding");
        assert!(q.k_bits > 1.0 && q.k_bits < 8.0 && q.v_bits > 0.5 && q.v_bits < 8.0, "{task}: {q:?}");
        assert!(q.requant_down > 0, "{task}: online QAQ re-quantizes while the choices are decoded");
        let dflt = row(&rows, task, DEFAULT_KV_POLICY);
        assert_eq!(dflt.items, 40, "{task}");
        assert!(dflt.agreement.unwrap() >= 0.85, "{task}: the default agrees with fp16 on {:?}", dflt.agreement);
        assert!(dflt.real_ratio >= 2.5, "{task}: the default's real ratio {}", dflt.real_ratio);
    }
    // Published SmolLM2-135M: HellaSwag ~42 (acc_norm), PIQA ~68; 40 items are noisy.
    let hs = row(&rows, "hellaswag", "fp16");
    assert!((0.30..=0.80).contains(&hs.score) && (0.30..=0.80).contains(&hs.acc_norm.unwrap()), "{hs:?}");
    let piqa = row(&rows, "piqa", "fp16");
    assert!((0.55..=0.95).contains(&piqa.score), "{piqa:?}");

    let (pf, pq) = (row(&rows, "ppl@1024", "fp16"), row(&rows, "ppl@1024", "qaq-tuned"));
    assert!(pf.score > 5.0 && pf.score < 40.0, "WikiText-2 perplexity at 1k: {}", pf.score);
    assert!(pq.score >= pf.score * 0.97 && pq.score <= pf.score * 1.10, "{pq:?} vs fp16 {}", pf.score);
    assert!(pq.real_ratio >= 3.5, "{pq:?}");
    // The default: within 1% of fp16 at 8k (docs/results); at 1k, one window, 2% is noise.
    let pd = row(&rows, "ppl@1024", DEFAULT_KV_POLICY);
    assert!(pd.score <= pf.score * 1.02 && pd.real_ratio >= 2.5, "{pd:?} vs fp16 {}", pf.score);
    let (kf, kq) = (row(&rows, "passkey@1024", "fp16"), row(&rows, "passkey@1024", "qaq-tuned"));
    assert!(kf.items == 4 && kf.score >= 0.5, "fp16 passkey retrieval: {kf:?}");
    assert!(kq.score >= kf.score - 0.25, "qaq-tuned passkey retrieval {kq:?} vs fp16 {kf:?}");
    let kd = row(&rows, "passkey@1024", DEFAULT_KV_POLICY);
    assert!(kd.score >= kf.score - 0.25, "the default's passkey retrieval {kd:?} vs fp16 {kf:?}");

    // A second run measures nothing new: same rows, results file unchanged.
    let before = std::fs::read_to_string(&results).unwrap();
    let again = evaluate(&args, model).unwrap();
    assert_eq!(std::fs::read_to_string(&results).unwrap(), before);
    assert_eq!(again.len(), rows.len());
    for (a, b) in again.iter().zip(&rows) {
        assert_eq!((&a.task, &a.policy, a.score, a.real_ratio), (&b.task, &b.policy, b.score, b.real_ratio));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
