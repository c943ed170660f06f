//! Device tests of the GPU forward pass (feature `cuda`) on the real model: the GPU pass
//! against the CPU pass, logits and greedy generation, with the fp16 and the QAQ cache,
//! directly and through the engine (as a serving worker runs it).
//! They need a GPU and fail (never skip) without one: `scripts/gpu-check.sh` runs them.

use std::path::PathBuf;
use std::sync::OnceLock;

use qaq_worker::engine::sampling::argmax;
use qaq_worker::engine::{EngineConfig, EngineHandle, Event, Job, SamplingConfig};
use qaq_worker::kv::{PolicyChoice, SeqCache};
use qaq_worker::model::{BatchItem, KvCache, LoadedModel, load_model};

fn model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

fn ordinal() -> usize {
    std::env::var("QAQ_GPU_ORDINAL").ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The real model twice: on the CPU and on the GPU.
fn models() -> &'static (LoadedModel, LoadedModel) {
    static CELL: OnceLock<(LoadedModel, LoadedModel)> = OnceLock::new();
    CELL.get_or_init(|| {
        let cpu = load_model(&model_path()).unwrap();
        let mut gpu = load_model(&model_path()).unwrap();
        let name = gpu
            .model
            .use_gpu(ordinal())
            .unwrap_or_else(|e| panic!("the GPU tests need a GPU (scripts/gpu-check.sh): {e}"));
        eprintln!("GPU forward pass on {name}");
        (cpu, gpu)
    })
}

fn cache(m: &LoadedModel, policy: &str) -> SeqCache {
    SeqCache::new(&m.model.kv_shape(), &PolicyChoice::parse(policy).unwrap()).unwrap()
}

/// Greedy tokens and, per step, the top-1 minus top-2 logit margin of the model's logits.
fn greedy(m: &LoadedModel, policy: &str, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let mut kv = cache(m, policy);
    let (mut out, mut margins) = (Vec::new(), Vec::new());
    let mut feed = prompt.to_vec();
    for _ in 0..n {
        let logits = m.model.forward(&mut [BatchItem { tokens: &feed, kv: &mut kv }]).unwrap();
        let row = logits.row(0).to_vec();
        let next = argmax(&row);
        let top = row[next as usize];
        let second =
            row.iter().enumerate().filter(|&(i, _)| i != next as usize).map(|(_, &v)| v).fold(f32::MIN, f32::max);
        margins.push(top - second);
        out.push(next);
        feed = vec![next];
    }
    (out, margins)
}

fn prompt(m: &LoadedModel) -> Vec<u32> {
    m.tokenizer.encode("The history of the Roman Empire began when").unwrap()
}

#[test]
fn gpu_forward_pass_matches_the_cpu_logits() {
    let (cpu, gpu) = models();
    let ids = prompt(cpu);
    let (mut a, mut b) = (cache(cpu, "fp16"), cache(gpu, "fp16"));
    let la = cpu.model.forward_all(&mut [BatchItem { tokens: &ids, kv: &mut a }]).unwrap();
    let lb = gpu.model.forward_all(&mut [BatchItem { tokens: &ids, kv: &mut b }]).unwrap();
    assert_eq!(la.len(), lb.len());
    assert_eq!(a.len(), b.len());
    let vocab = cpu.model.config().vocab_size;
    let mut worst = 0f32;
    for (ra, rb) in la.chunks_exact(vocab).zip(lb.chunks_exact(vocab)) {
        let range = ra.iter().fold(f32::MIN, |m, &v| m.max(v)) - ra.iter().fold(f32::MAX, |m, &v| m.min(v));
        let diff = ra.iter().zip(rb).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        worst = worst.max(diff / range);
        assert_eq!(argmax(ra), argmax(rb), "top-1 differs (max |diff| {diff}, logit range {range})");
    }
    eprintln!("GPU vs CPU logits over {} prompt tokens: worst max|diff| / range = {worst:.2e}", ids.len());
    // f16 weights and GEMM operands against the CPU's f32: about 1e-3 of the range.
    assert!(worst < 2e-2, "GPU logits stray {worst:.2e} of the logit range from the CPU's");
}

/// Greedy generation on the GPU equals the CPU's for 64 tokens, with the fp16 cache, a
/// QAQ cache and the default (rotated) cache. The GPU's GEMMs run on f16 operands, so the
/// two passes are not bit-identical: a difference is accepted only at a near-tie of the CPU's
/// logits (top-1 margin below 0.05), and reported.
#[test]
fn greedy_generation_on_the_gpu_equals_the_cpu_for_64_tokens() {
    let (cpu, gpu) = models();
    let ids = prompt(cpu);
    for policy in ["fp16", "qaq-tuned", "uniform:6/3:noout+rot"] {
        let (ta, margins) = greedy(cpu, policy, &ids, 64);
        let (tb, _) = greedy(gpu, policy, &ids, 64);
        match ta.iter().zip(&tb).position(|(x, y)| x != y) {
            None => eprintln!("{policy}: 64 greedy tokens equal on GPU and CPU"),
            Some(i) => {
                assert!(
                    margins[i] < 0.05,
                    "{policy}: GPU and CPU diverge at token {i} where the CPU's top-1 margin is {} \
                     (not a near-tie)\n cpu {ta:?}\n gpu {tb:?}",
                    margins[i]
                );
                eprintln!("{policy}: equal for {i} tokens, then a near-tie (margin {}) went the other way", margins[i]);
            }
        }
    }
}

/// The GPU pass drives the same caches: after a QAQ prompt and 16 decode steps the host
/// cache's statistics (sizes, widths) are those of the CPU run, up to the f16 rounding of
/// the GEMMs; the decode steps attended on the device tier, whose bytes are reported as
/// the cache's device bytes. The KIVI baseline has no device tier and attends on the host.
#[test]
fn the_qaq_cache_behind_the_gpu_pass_compresses_as_on_the_cpu() {
    let (cpu, gpu) = models();
    let ids = prompt(cpu);
    for policy in ["qaq-tuned", "fp16", "kivi"] {
        let (mut a, mut b) = (cache(cpu, policy), cache(gpu, policy));
        for (m, kv) in [(cpu, &mut a), (gpu, &mut b)] {
            let mut feed = ids.clone();
            for _ in 0..17 {
                let logits = m.model.forward(&mut [BatchItem { tokens: &feed, kv: &mut *kv }]).unwrap();
                feed = vec![argmax(logits.row(0))];
            }
        }
        let (sa, sb) = (a.stats(), b.stats());
        assert_eq!(a.len(), b.len());
        let rel = (sa.bytes_used() as f64 - sb.bytes_used() as f64).abs() / sa.bytes_used() as f64;
        eprintln!(
            "{policy} cache after the prompt and 16 steps: CPU {} bytes ({:.2} / {:.2} bits), GPU host copy {} \
             bytes ({:.2} / {:.2} bits), GPU device tier {:?} (bytes, uploaded)",
            sa.bytes_used(),
            sa.k.avg_bits(),
            sa.v.avg_bits(),
            sb.bytes_used(),
            sb.k.avg_bits(),
            sb.v.avg_bits(),
            b.device_tier_bytes()
        );
        assert!(rel < 0.05, "{policy}: cache sizes differ by {:.1}%", rel * 100.0);
        match (policy, b.device_tier_bytes()) {
            ("kivi", None) => assert_eq!(b.summary().device_bytes as usize, sb.bytes_used()),
            ("kivi", t) => panic!("kivi got a device tier {t:?}"),
            (_, None) => panic!("{policy}: the decode steps did not attend on the device"),
            (_, Some((bytes, up))) => {
                assert!(up as usize >= sb.bytes_used() / 2, "{policy}: uploaded {up} of {}", sb.bytes_used());
                assert_eq!(b.summary().device_bytes as usize, bytes);
            }
        }
    }
}

/// Serving runs the GPU pass through the engine, whose caches sit behind its abort
/// wrapper: every decode row of every layer must attend in the device tier (the prefill
/// attends on the host), for the fp16 and the default QAQ cache alike.
#[test]
fn through_the_engine_every_decode_row_attends_on_the_device() {
    let (cpu, _) = models();
    let mut gpu = load_model(&model_path()).unwrap();
    gpu.model.use_gpu(ordinal()).unwrap();
    let n_layers = gpu.model.config().n_layers as u64;
    let ids = prompt(cpu);
    let engine = EngineHandle::start(std::sync::Arc::new(gpu), EngineConfig::default());
    for policy in ["fp16", "qaq-tuned"] {
        let choice = PolicyChoice::parse(policy).unwrap();
        let worst = qaq_worker::kv::worst_bytes_per_token(&cpu.model.kv_shape(), &choice.policy).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        engine
            .submit(Job {
                id: format!("gpu-{policy}"),
                prompt: ids.clone(),
                resume: vec![],
                kv: None,
                max_new_tokens: 24,
                sampling: SamplingConfig::default(),
                stops: vec![],
                ignore_eos: true,
                policy: choice,
                worst_bytes_per_token: worst,
                events: tx,
                received: std::time::Instant::now(),
            })
            .unwrap();
        let done = loop {
            match rx.blocking_recv().expect("the engine answers") {
                Event::Done { completion_tokens, kv, .. } => break (completion_tokens, kv),
                Event::Failed(e) => panic!("{policy}: {e}"),
                Event::Delta { .. } => {}
            }
        };
        let (n, kv) = done;
        assert_eq!(n, 24);
        eprintln!("{policy}: {} device-attended decode rows over {n} tokens", kv.device_attended_rows);
        assert_eq!(kv.device_attended_rows, (n as u64 - 1) * n_layers, "{policy}: decode rows attended on the host");
    }
}
