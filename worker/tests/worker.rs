//! Integration tests of the worker crate (one binary): forward-pass parity with
//! candle-transformers' llama (tiny random weights and the real model), the
//! tokenizer and chat template of the real model, the engine end to end, the
//! KV budgets (preemption, host-tier eviction) and the worker's gRPC service.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::llama as reference;
use qaq_worker::engine::{Budgets, EngineConfig, EngineHandle, Event, Finish, Job, KvSummary, SamplingConfig};
use qaq_worker::kv::PolicyChoice;
use qaq_worker::model::loader::load_weights;
use qaq_worker::model::{BatchItem, DenseKv, KvCache, Llama, LlamaConfig, LoadedModel, TextTokenizer};

fn model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh (make test does)", p.display());
    p
}

/// The real model's config, weights and tokenizer, loaded once per test binary.
fn real() -> &'static (LlamaConfig, HashMap<String, Tensor>, Arc<LoadedModel>) {
    static CELL: OnceLock<(LlamaConfig, HashMap<String, Tensor>, Arc<LoadedModel>)> = OnceLock::new();
    CELL.get_or_init(|| {
        let (cfg, w, tok) = load_weights(&model_path()).unwrap();
        let model = Llama::from_weights(cfg.clone(), w.clone()).unwrap();
        (cfg, w, Arc::new(LoadedModel { name: "SmolLM2-135M-Instruct.Q4_1".into(), model, tokenizer: tok }))
    })
}

fn reference_model(cfg: &LlamaConfig, w: &HashMap<String, Tensor>) -> (reference::Llama, reference::Config) {
    let rc = reference::LlamaConfig {
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        vocab_size: cfg.vocab_size,
        num_hidden_layers: cfg.n_layers,
        num_attention_heads: cfg.n_heads,
        num_key_value_heads: Some(cfg.n_kv_heads),
        rms_norm_eps: cfg.rms_eps,
        rope_theta: cfg.rope_theta,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: cfg.context_length,
        tie_word_embeddings: Some(cfg.tie_embeddings),
    }
    .into_config(false);
    let vb = candle_nn::VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    (reference::Llama::load(vb, &rc).unwrap(), rc)
}

fn greedy_ours(m: &Llama, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut kv = DenseKv::new(m.kv_shape());
    let mut out = Vec::new();
    let mut feed = prompt.to_vec();
    for _ in 0..n {
        let logits = m.forward(&mut [BatchItem { tokens: &feed, kv: &mut kv }]).unwrap();
        let next = qaq_worker::engine::sampling::argmax(logits.row(0));
        out.push(next);
        feed = vec![next];
    }
    assert_eq!(kv.len(), prompt.len() + n - 1);
    out
}

fn greedy_reference(m: &reference::Llama, rc: &reference::Config, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = reference::Cache::new(true, DType::F32, rc, &Device::Cpu).unwrap();
    let mut out = Vec::new();
    let mut feed = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..n {
        let input = Tensor::new(feed.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = m.forward(&input, pos, &mut cache).unwrap();
        pos += feed.len();
        let next = qaq_worker::engine::sampling::argmax(&logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        out.push(next);
        feed = vec![next];
    }
    out
}

#[test]
fn tiny_random_model_matches_candle_llama_logits() {
    let cfg = LlamaConfig::tiny();
    let w = qaq_worker::model::weights::random_weights(&cfg, 11);
    let ours = Llama::from_weights(cfg.clone(), w.clone()).unwrap();
    let (theirs, rc) = reference_model(&cfg, &w);
    let prompt = [1u32, 5, 9, 42, 7, 3];
    // Prefill logits, then three decode steps, compared at every step.
    let mut kv = DenseKv::new(ours.kv_shape());
    let mut cache = reference::Cache::new(true, DType::F32, &rc, &Device::Cpu).unwrap();
    let mut feed = prompt.to_vec();
    let mut pos = 0;
    for step in 0..4 {
        let a = ours.forward(&mut [BatchItem { tokens: &feed, kv: &mut kv }]).unwrap();
        let a = Tensor::new(a.row(0), &Device::Cpu).unwrap();
        let input = Tensor::new(feed.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let b = theirs.forward(&input, pos, &mut cache).unwrap().squeeze(0).unwrap();
        pos += feed.len();
        let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-4 * scale.max(1.0), "step {step}: max |diff| {diff} (scale {scale})");
        feed = vec![qaq_worker::engine::sampling::argmax(&a.to_vec1::<f32>().unwrap())];
    }
}

#[test]
fn hf_safetensors_folder_loads_like_the_same_weights_in_memory() {
    let cfg = LlamaConfig { tie_embeddings: true, ..LlamaConfig::tiny() };
    let mut w = qaq_worker::model::weights::random_weights(&cfg, 5);
    w.remove("lm_head.weight");
    let dir = std::env::temp_dir().join(format!("qaq-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_eps,
        "max_position_embeddings": cfg.context_length, "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    real().2.tokenizer.save(&dir.join("tokenizer.json")).unwrap();
    let loaded = qaq_worker::model::load_model(&dir).unwrap();
    assert_eq!(loaded.model.config(), &cfg);
    assert_eq!(loaded.tokenizer.encode("Hello world").unwrap(), real().2.tokenizer.encode("Hello world").unwrap());
    let direct = Llama::from_weights(cfg.clone(), w).unwrap();
    let prompt = [3u32, 1, 4, 1, 5];
    assert_eq!(greedy_ours(&loaded.model, &prompt, 6), greedy_ours(&direct, &prompt, 6));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn real_model_greedy_matches_candle_llama_for_32_tokens() {
    let (cfg, w, loaded) = real();
    let prompt = loaded.tokenizer.encode("The capital of France is Paris. The capital of Germany is").unwrap();
    let ours = greedy_ours(&loaded.model, &prompt, 32);
    let (theirs, rc) = reference_model(cfg, w);
    let expected = greedy_reference(&theirs, &rc, &prompt, 32);
    assert_eq!(
        ours,
        expected,
        "ours: {:?}\nreference: {:?}",
        loaded.tokenizer.decode(&ours),
        loaded.tokenizer.decode(&expected)
    );
    let text = loaded.tokenizer.decode(&ours).unwrap();
    assert!(text.contains("Berlin"), "{text:?}");
}

/// The GGUF run as its own format intends (candle-transformers' `quantized_llama`:
/// quantized matmuls, activations quantized to 8 bits): at every step of a 32-token greedy
/// run our logits stay within a small fraction of the logit range of its logits, and the
/// greedy tokens are the same.
#[test]
fn real_model_matches_candle_quantized_llama_at_every_step_of_32_greedy_tokens() {
    use candle_core::quantized::gguf_file;
    use candle_transformers::models::quantized_llama;
    // The model as served: GGUF matrices kept quantized (not `real()`, which is built from
    // dequantized f32 weights for the f32 references above).
    let loaded = &qaq_worker::model::load_model(&model_path()).unwrap();
    let mut f = std::fs::File::open(model_path()).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut theirs = quantized_llama::ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    let prompt = loaded.tokenizer.encode("The history of the Roman Empire began when").unwrap();
    let mut kv = DenseKv::new(loaded.model.kv_shape());
    let (mut feed, mut pos, mut worst) = (prompt.clone(), 0, 0f32);
    for step in 0..32 {
        let ours = loaded.model.forward(&mut [BatchItem { tokens: &feed, kv: &mut kv }]).unwrap();
        let a = ours.row(0);
        let input = Tensor::new(feed.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let b = theirs.forward(&input, pos).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        pos += feed.len();
        let range = b.iter().fold(f32::MIN, |m, &v| m.max(v)) - b.iter().fold(f32::MAX, |m, &v| m.min(v));
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        worst = worst.max(diff / range);
        assert!(diff / range < QUANTIZED_REFERENCE_TOLERANCE, "step {step}: max |diff| {diff}, logit range {range}");
        let next = qaq_worker::engine::sampling::argmax(a);
        assert_eq!(next, qaq_worker::engine::sampling::argmax(&b), "step {step}: greedy tokens differ");
        feed = vec![next];
    }
    eprintln!("worst max |diff| / logit range over 32 steps: {worst:.2e}");
}

/// Largest max |logit difference| / logit range allowed against `quantized_llama`. Both
/// round every matmul input to 8-bit codes; a last-bit difference in f32 arithmetic (e.g. the
/// order of an attention sum) can flip a code, so the two differ by about what quantized
/// vs f32 activations do (1.5–2.8% of the range over this run), not by f32 rounding.
const QUANTIZED_REFERENCE_TOLERANCE: f32 = 0.05;

#[test]
fn real_tokenizer_round_trips_and_knows_the_chat_tokens() {
    let tok: &TextTokenizer = &real().2.tokenizer;
    let text = "Hello world! Numbers 12345, unicode: naïve café ✓.";
    let ids = tok.encode(text).unwrap();
    assert!(ids.len() > 10 && ids.len() < 40, "{ids:?}");
    assert_eq!(tok.decode(&ids).unwrap(), text);
    // Digits are split one by one.
    assert_eq!(tok.encode("12345").unwrap().len(), 5);
    // Special tokens in text map to single ids; eos is <|im_end|>.
    let im_end = tok.encode("<|im_end|>").unwrap();
    assert_eq!(im_end.len(), 1);
    assert!(tok.eos_ids().contains(&im_end[0]));
    let chat = tok.render_chat(&[("user".into(), "Hi there".into())]).unwrap();
    assert!(chat.starts_with("<|im_start|>system\n"), "{chat:?}");
    assert!(chat.ends_with("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"), "{chat:?}");
}

fn job(
    id: &str,
    prompt: Vec<u32>,
    max_new: u32,
    stops: Vec<String>,
) -> (Job, tokio::sync::mpsc::UnboundedReceiver<Event>) {
    job_with(id, prompt, max_new, stops, PolicyChoice::parse("fp16").unwrap())
}

fn job_with(
    id: &str,
    prompt: Vec<u32>,
    max_new: u32,
    stops: Vec<String>,
    policy: PolicyChoice,
) -> (Job, tokio::sync::mpsc::UnboundedReceiver<Event>) {
    let worst = qaq_worker::kv::worst_bytes_per_token(&real().2.model.kv_shape(), &policy.policy).unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job {
        id: id.into(),
        prompt,
        resume: vec![],
        kv: None,
        max_new_tokens: max_new,
        sampling: SamplingConfig::default(),
        stops,
        ignore_eos: true,
        policy,
        worst_bytes_per_token: worst,
        events: tx,
        received: std::time::Instant::now(),
    };
    (job, rx)
}

fn collect(rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> (String, Vec<u32>, Finish) {
    let (text, ids, finish, _) = collect_kv(rx);
    (text, ids, finish)
}

fn collect_kv(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> (String, Vec<u32>, Finish, KvSummary) {
    let (mut text, mut ids) = (String::new(), Vec::new());
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Delta { text: t, token_ids } => {
                text.push_str(&t);
                ids.extend(token_ids);
            }
            Event::Done { text: t, token_ids, finish, kv, .. } => {
                text.push_str(&t);
                ids.extend(token_ids);
                return (text, ids, finish, kv);
            }
            Event::Failed(e) => panic!("sequence failed: {e}"),
        }
    }
    panic!("stream ended without Done");
}

#[test]
fn engine_batches_sequences_like_it_runs_them_alone() {
    let loaded = real().2.clone();
    let prompts = ["Once upon a time", "The three primary colors are", "def fibonacci(n):"];
    let enc: Vec<Vec<u32>> = prompts.iter().map(|p| loaded.tokenizer.encode(p).unwrap()).collect();
    let alone: Vec<Vec<u32>> = enc.iter().map(|p| greedy_ours(&loaded.model, p, 12)).collect();
    // Small prefill chunks force chunked prefill beside running decodes.
    let engine = EngineHandle::start(
        loaded.clone(),
        EngineConfig { max_batch: 8, prefill_chunk: 3, max_waiting: 16, ..EngineConfig::default() },
    );
    let rxs: Vec<_> = enc
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (j, rx) = job(&format!("r{i}"), p.clone(), 12, vec![]);
            engine.submit(j).unwrap();
            rx
        })
        .collect();
    for (rx, want) in rxs.into_iter().zip(&alone) {
        let (text, ids, finish) = collect(rx);
        assert_eq!(finish, Finish::Length);
        assert_eq!(&ids, want);
        assert_eq!(text, loaded.tokenizer.decode(want).unwrap());
    }
    // The engine publishes its load right after the step that finished them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while engine.load().running() != 0 {
        assert!(std::time::Instant::now() < deadline, "running count stayed {}", engine.load().running());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn engine_stops_on_stop_strings_and_aborts() {
    let loaded = real().2.clone();
    let engine = EngineHandle::start(loaded.clone(), EngineConfig::default());
    let prompt = loaded.tokenizer.encode("The capital of France is Paris. The capital of Germany is").unwrap();
    let (j, rx) = job("stop", prompt.clone(), 32, vec!["Berlin".into()]);
    engine.submit(j).unwrap();
    let (text, _, finish) = collect(rx);
    assert_eq!(finish, Finish::Stop);
    assert!(!text.contains("Berlin"), "{text:?}");
    // Abort of a long generation: the stream ends with Aborted and the slot frees.
    let (j, mut rx) = job("long", prompt, 5000, vec![]);
    engine.submit(j).unwrap();
    assert!(matches!(rx.blocking_recv(), Some(Event::Delta { .. })));
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    assert!(rt.block_on(engine.abort("long")));
    assert!(!rt.block_on(engine.abort("long")));
    let (_, _, finish) = collect(rx);
    assert_eq!(finish, Finish::Aborted);
}

fn engine_with(device: u64, host: u64) -> EngineHandle {
    let cfg = EngineConfig { budgets: Budgets { device, host }, ..EngineConfig::default() };
    EngineHandle::start(real().2.clone(), cfg)
}

fn qaq() -> PolicyChoice {
    PolicyChoice::parse("qaq").unwrap()
}

#[test]
fn qaq_generates_2000_tokens_within_a_device_budget_fp16_could_not_hold() {
    let loaded = real().2.clone();
    let fp16_per_token = loaded.model.config().fp16_kv_bytes_per_token() as u64;
    let prompts = ["Tell me a long story about a dragon.", "Write an essay on the history of bridges."];
    let n_new = 1000u32;
    // Room for both sequences compressed, a third of what fp16 would need.
    let budget = 2 * (n_new as u64 + 16) * fp16_per_token / 3;
    let engine = engine_with(budget, u64::MAX);
    let rxs: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (j, rx) = job_with(&format!("long{i}"), loaded.tokenizer.encode(p).unwrap(), n_new, vec![], qaq());
            engine.submit(j).unwrap();
            rx
        })
        .collect();
    let mut generated = 0;
    for rx in rxs {
        let (_, ids, finish, kv) = collect_kv(rx);
        assert_eq!(finish, Finish::Length);
        generated += ids.len();
        assert!(kv.fp16_equivalent_bytes as f64 / kv.device_bytes as f64 >= 4.0, "{kv:?}");
        assert!(kv.requantizations_down > 0, "{kv:?}");
    }
    assert!(generated >= 2000, "{generated}");
    let l = engine.load();
    let peak = l.peak_device_bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(peak > 0 && peak <= budget, "peak {peak} vs budget {budget}");
}

#[test]
fn a_preempted_sequence_resumes_with_exactly_the_tokens_of_an_undisturbed_run() {
    let loaded = real().2.clone();
    let (pa, pb) =
        (loaded.tokenizer.encode("The moon is").unwrap(), loaded.tokenizer.encode("My favourite food is").unwrap());
    let n = 48;
    // Undisturbed runs, one at a time, with no memory pressure.
    let free = engine_with(u64::MAX, u64::MAX);
    let (ja, ra) = job_with("a", pa.clone(), n, vec![], qaq());
    free.submit(ja).unwrap();
    let (_, alone_a, _, kv_a) = collect_kv(ra);
    let (jb, rb) = job_with("b", pb.clone(), n, vec![], qaq());
    free.submit(jb).unwrap();
    let (_, alone_b, _, kv_b) = collect_kv(rb);
    // A budget that holds either sequence but not both at their full length.
    let worst = qaq_worker::kv::worst_bytes_per_token(&loaded.model.kv_shape(), &qaq().policy).unwrap() as u64;
    let budget = kv_a.device_bytes.max(kv_b.device_bytes) * 3 / 2 + 2 * worst;
    let tight = engine_with(budget, u64::MAX);
    let (ja, ra) = job_with("a", pa, n, vec![], qaq());
    let (jb, rb) = job_with("b", pb, n, vec![], qaq());
    tight.submit(ja).unwrap();
    tight.submit(jb).unwrap();
    let (_, got_a, fa, _) = collect_kv(ra);
    let (_, got_b, fb, _) = collect_kv(rb);
    assert_eq!((fa, fb), (Finish::Length, Finish::Length));
    let l = tight.load();
    assert!(l.preemptions.load(std::sync::atomic::Ordering::Relaxed) >= 1, "no preemption happened");
    assert!(l.peak_device_bytes.load(std::sync::atomic::Ordering::Relaxed) <= budget);
    assert_eq!(got_a, alone_a);
    assert_eq!(got_b, alone_b);
}

#[test]
fn a_full_host_tier_evicts_backups_and_generation_goes_on() {
    let loaded = real().2.clone();
    let per_token = qaq_worker::kv::backup_bytes_per_token(&loaded.model.kv_shape()) as u64;
    let host_budget = 64 * per_token;
    let engine = engine_with(u64::MAX, host_budget);
    let (j, rx) =
        job_with("h", loaded.tokenizer.encode("List the planets of the solar system.").unwrap(), 160, vec![], qaq());
    engine.submit(j).unwrap();
    let (text, ids, finish, kv) = collect_kv(rx);
    assert_eq!(finish, Finish::Length);
    assert_eq!(ids.len(), 160);
    assert!(!text.is_empty());
    assert!(kv.device_bytes > 0);
    let l = engine.load();
    let o = std::sync::atomic::Ordering::Relaxed;
    assert!(l.backup_evictions.load(o) > 0, "no backup was evicted");
    let peak = l.peak_host_bytes.load(o);
    assert!(peak <= host_budget, "host peak {peak} over budget {host_budget}");
}

/// `qaq-worker serve` arguments parsed as on the command line.
fn serve_config(args: &[&str]) -> anyhow::Result<qaq_worker::config::WorkerConfig> {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        serve: qaq_worker::config::ServeArgs,
    }
    let mut argv = vec!["qaq-worker", "--metrics-listen", ""];
    argv.extend_from_slice(args);
    Ok(<Cli as clap::Parser>::try_parse_from(argv)?.serve.validate()?)
}

/// Serves the real model in-process on a loopback port; returns its address
/// and a guard that stops it.
fn serve(args: &[&str]) -> (tokio::runtime::Runtime, String, tokio::sync::oneshot::Sender<()>) {
    let cfg = serve_config(args).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    rt.spawn(qaq_worker::server::run(listener, String::new(), real().2.clone(), cfg, async move {
        let _ = rx.await;
    }));
    (rt, addr, tx)
}

#[test]
fn budgets_that_cannot_hold_a_sequence_are_start_up_errors() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The host tier holds QAQ's fp16 backups: a QAQ policy needs room there (the default
    // policy keeps none).
    for (flag, value, policy) in
        [("--kv-device-budget-bytes", "0", "qaq-tuned"), ("--kv-host-budget-bytes", "1000", "qaq-tuned")]
    {
        let cfg = serve_config(&[flag, value, "--kv-policy", policy]).unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let err = rt
            .block_on(qaq_worker::server::run(listener, String::new(), real().2.clone(), cfg, async {}))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(flag) && err.contains("one sequence"), "{err}");
    }
    let cfg = serve_config(&["--registration-secret", "s3cr3t-value"]).unwrap();
    assert!(!format!("{cfg:?}").contains("s3cr3t-value"), "the secret shows in Debug output");
    let err = serve_config(&["--kv-policy", "uniform:9"]).unwrap_err().to_string();
    assert!(err.contains("--kv-policy") && err.contains("uniform:N"), "{err}");
    let err = serve_config(&["--kv-policy", "fp16", "--kv-sigma-x", "0.1"]).unwrap_err().to_string();
    assert!(err.contains("qaq policy only"), "{err}");
}

#[test]
fn coordinator_flag_takes_a_comma_separated_list() {
    assert!(serve_config(&[]).unwrap().coordinators.is_empty());
    assert!(serve_config(&["--coordinator", " , "]).unwrap().coordinators.is_empty());
    let cfg = serve_config(&["--coordinator", "10.0.0.1:50051, coord-headless.ns.svc:50051,,https://c:1 "]).unwrap();
    assert_eq!(cfg.coordinators, ["10.0.0.1:50051", "coord-headless.ns.svc:50051", "https://c:1"]);
    let err = serve_config(&["--coordinator", "a:1,http://"]).unwrap_err().to_string();
    assert!(err.starts_with("--coordinator: \"http://\""), "{err}");
}

#[test]
fn device_flag_defaults_to_cpu_and_rejects_other_forms() {
    use qaq_worker::device::Device;
    assert_eq!(serve_config(&[]).unwrap().device, Device::Cpu);
    assert_eq!(serve_config(&["--device", "cuda:1"]).unwrap().device, Device::Cuda(1));
    let err = serve_config(&["--device", "gpu0"]).unwrap_err().to_string();
    assert!(err.contains("--device") && err.contains("cpu | cuda:N"), "{err}");
}

#[test]
fn grpc_requests_choose_their_kv_policy_and_oversized_prompts_are_refused() {
    use qaq_proto::v1::{GenerateRequest, KvPolicy, SubmitRequest, worker_client::WorkerClient};
    // Room for a few hundred tokens at the widest QAQ setting.
    let (rt, addr, stop) = serve(&["--kv-device-budget-bytes", "8000000"]);
    rt.block_on(async {
        let mut c = WorkerClient::connect(format!("http://{addr}")).await.unwrap();
        let submit = |prompt: String, policy: Option<KvPolicy>| SubmitRequest {
            request: Some(GenerateRequest {
                prompt,
                max_new_tokens: Some(4),
                request_id: "r1".into(),
                kv_policy: policy,
                ..Default::default()
            }),
            ..Default::default()
        };
        let pol = |s: &str| Some(KvPolicy { policy: s.into(), ..Default::default() });
        let e = c.submit(submit("Hello".into(), pol("bogus:3"))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("kv_policy.policy") && e.message().contains("uniform:N"), "{}", e.message());
        let p = Some(KvPolicy { policy: "fp16".into(), sigma_x: Some(0.5), ..Default::default() });
        let e = c.submit(submit("Hello".into(), p)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = c.submit(submit("word ".repeat(3000), None)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("--kv-device-budget-bytes 8000000"), "{}", e.message());
        // A valid override is applied and reported in the final message.
        let mut s = c.submit(submit("The sky is".into(), pol("uniform:4"))).await.unwrap().into_inner();
        let mut last = None;
        while let Some(m) = s.message().await.unwrap() {
            last = Some(m);
        }
        let kv = last.unwrap().kv_stats.unwrap();
        assert_eq!(kv.policy, "uniform:4");
        assert_eq!((kv.avg_key_bits, kv.avg_value_bits), (4.0, 4.0));
        assert!(kv.compression_ratio > 2.5 && kv.compression_ratio < 4.0, "{kv:?}");
        let stats = c.stats(qaq_proto::v1::StatsRequest {}).await.unwrap().into_inner();
        let load = stats.load.unwrap();
        assert_eq!((load.kv_device_budget_bytes, load.running), (8_000_000, 0));
    });
    let _ = stop.send(());
}

/// KV migration at the edges, over the worker's gRPC service: ExportKv of nothing
/// parked is NOT_FOUND, a bad id or source address is INVALID_ARGUMENT naming the
/// field, and a migrated request whose source cannot be reached is prefilled instead
/// and still produces exactly the unmigrated tokens (fp16: prefill and decode agree).
#[test]
fn kv_migration_edges_are_clear_errors_or_a_prefill() {
    use qaq_proto::v1::{ExportKvRequest, GenerateRequest, KvPolicy, SubmitRequest, worker_client::WorkerClient};
    let (rt, addr, stop) = serve(&["--kv-park-ms", "1000"]);
    assert!(serve_config(&["--kv-park-ms", "600001"]).unwrap_err().to_string().contains("--kv-park-ms"));
    assert!(serve_config(&["--node", "a b"]).unwrap_err().to_string().starts_with("--node: must be"));
    assert_eq!(serve_config(&["--node", "gpu-node-3"]).unwrap().node, "gpu-node-3");
    rt.block_on(async {
        let mut c = WorkerClient::connect(format!("http://{addr}")).await.unwrap();
        let e = c.export_kv(ExportKvRequest { request_id: "nope".into(), ..Default::default() }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        assert!(e.message().contains("request_id"), "{e:?}");
        for bad in ["", "a b"] {
            let e = c.export_kv(ExportKvRequest { request_id: bad.into(), ..Default::default() }).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e:?}");
            assert!(e.message().starts_with("request_id"), "{e:?}");
        }
        // An NCCL offer is checked before anything is looked up.
        let offer = |node: &str| Some(qaq_proto::v1::NcclOffer { node: node.into() });
        for bad in ["", "two words"] {
            let r = ExportKvRequest { request_id: "nope".into(), nccl: offer(bad) };
            let e = c.export_kv(r).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e:?}");
            assert!(e.message().starts_with("nccl.node"), "{e:?}");
        }
        let r = ExportKvRequest { request_id: "nope".into(), nccl: offer("node-a") };
        assert_eq!(c.export_kv(r).await.unwrap_err().code(), tonic::Code::NotFound);
        let request = |id: &str| GenerateRequest {
            prompt: "The capital of France is".into(),
            max_new_tokens: Some(8),
            ignore_eos: true,
            request_id: id.into(),
            kv_policy: Some(KvPolicy { policy: "fp16".into(), ..Default::default() }),
            ..Default::default()
        };
        let collect = |mut s: tonic::Streaming<qaq_proto::v1::GenerateResponse>| async move {
            let mut ids = Vec::new();
            while let Some(m) = s.message().await.unwrap() {
                ids.extend(m.token_ids);
            }
            ids
        };
        let submit = SubmitRequest { request: Some(request("r-ref")), ..Default::default() };
        let all = collect(c.submit(submit).await.unwrap().into_inner()).await;
        assert_eq!(all.len(), 8);
        let bad = SubmitRequest {
            request: Some(request("r-bad")),
            resume_token_ids: all[..3].to_vec(),
            kv_source_address: "127.0.0.1:1 x".into(),
        };
        let e = c.submit(bad).await.map(|_| ()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("kv_source_address"), "{e:?}");
        // Nobody listens on port 1: the pull fails and the tokens are prefilled.
        let moved = SubmitRequest {
            request: Some(request("r-moved")),
            resume_token_ids: all[..3].to_vec(),
            kv_source_address: "127.0.0.1:1".into(),
        };
        let rest = collect(c.submit(moved).await.unwrap().into_inner()).await;
        assert_eq!(rest, all[3..], "a migrated request continues with the unmigrated tokens");
    });
    let _ = stop.send(());
}
