//! Integration tests of the worker crate: forward-pass parity with
//! candle-transformers' llama (tiny random weights and the real model), the
//! tokenizer and chat template of the real model, and the engine end to end.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::llama as reference;
use qaq_worker::engine::{EngineConfig, EngineHandle, Event, Finish, Job, SamplingConfig};
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
        let next = qaq_worker::engine::sampling::argmax(&logits.get(0).unwrap().to_vec1::<f32>().unwrap());
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
    let w = qaq_worker::model::llama::random_weights(&cfg, 11);
    let ours = Llama::from_weights(cfg.clone(), w.clone()).unwrap();
    let (theirs, rc) = reference_model(&cfg, &w);
    let prompt = [1u32, 5, 9, 42, 7, 3];
    // Prefill logits, then three decode steps, compared at every step.
    let mut kv = DenseKv::new(ours.kv_shape());
    let mut cache = reference::Cache::new(true, DType::F32, &rc, &Device::Cpu).unwrap();
    let mut feed = prompt.to_vec();
    let mut pos = 0;
    for step in 0..4 {
        let a = ours.forward(&mut [BatchItem { tokens: &feed, kv: &mut kv }]).unwrap().get(0).unwrap();
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
    let mut w = qaq_worker::model::llama::random_weights(&cfg, 5);
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
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job {
        id: id.into(),
        prompt,
        resume: vec![],
        max_new_tokens: max_new,
        sampling: SamplingConfig::default(),
        stops,
        ignore_eos: true,
        events: tx,
        received: std::time::Instant::now(),
    };
    (job, rx)
}

fn collect(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> (String, Vec<u32>, Finish) {
    let (mut text, mut ids) = (String::new(), Vec::new());
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Delta { text: t, token_ids } => {
                text.push_str(&t);
                ids.extend(token_ids);
            }
            Event::Done { text: t, token_ids, finish, .. } => {
                text.push_str(&t);
                ids.extend(token_ids);
                return (text, ids, finish);
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
    let engine = EngineHandle::start(loaded.clone(), EngineConfig { max_batch: 8, prefill_chunk: 3, max_waiting: 16 });
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
