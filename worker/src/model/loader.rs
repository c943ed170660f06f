//! Loads llama-family models from a GGUF file (quantized weights are
//! dequantized to f32 once) or an HF safetensors folder (`config.json`,
//! `model.safetensors` or sharded `model-*.safetensors`, `tokenizer.json`).
//!
//! Weights are normalised to HF names and layout. llama.cpp stores the Q and K
//! projections of llama-architecture models with rows permuted for
//! interleaved RoPE; they are permuted back here so one RoPE convention serves
//! both formats.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

use super::tokenizer::TextTokenizer;
use super::{Llama, LlamaConfig, ModelError, Result};

/// A model ready to serve.
pub struct LoadedModel {
    /// Name clients use (file or folder stem).
    pub name: String,
    pub model: Llama,
    pub tokenizer: TextTokenizer,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel").field("name", &self.name).field("model", &self.model).finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io { path: path.display().to_string(), source }
}

/// Loads a model from a `.gguf` file or an HF folder.
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    let (cfg, weights, tokenizer) = load_weights(path)?;
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    Ok(LoadedModel { name, model: Llama::from_weights(cfg, weights)?, tokenizer })
}

/// Loads the configuration, HF-named f32 weights and tokenizer.
pub fn load_weights(path: &Path) -> Result<(LlamaConfig, HashMap<String, Tensor>, TextTokenizer)> {
    if !path.exists() {
        Err(ModelError::Format(format!(
            "{} does not exist (run scripts/fetch-model.sh for the default model)",
            path.display()
        )))
    } else if path.is_dir() {
        load_hf_dir(path)
    } else if path.extension().is_some_and(|e| e == "gguf") {
        load_gguf(path)
    } else {
        Err(ModelError::Format(format!("{}: expected a .gguf file or an HF model folder", path.display())))
    }
}

fn md<'a>(c: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    c.metadata.get(key).ok_or_else(|| ModelError::Format(format!("GGUF metadata lacks {key}")))
}

fn md_usize(c: &gguf_file::Content, key: &str) -> Result<usize> {
    let v = md(c, key)?;
    Ok(v.to_u64().or_else(|_| v.to_u32().map(u64::from)).or_else(|_| v.to_i32().map(|x| x as u64))? as usize)
}

fn load_gguf(path: &Path) -> Result<(LlamaConfig, HashMap<String, Tensor>, TextTokenizer)> {
    let mut f = File::open(path).map_err(io(path))?;
    let c = gguf_file::Content::read(&mut f).map_err(|e| ModelError::Format(format!("{}: {e}", path.display())))?;
    let arch = md(&c, "general.architecture")?.to_string()?.clone();
    if !["llama", "mistral", "qwen2"].contains(&arch.as_str()) {
        return Err(ModelError::Format(format!("unsupported architecture {arch:?} (llama, mistral, qwen2)")));
    }
    let a = |k: &str| format!("{arch}.{k}");
    let n_heads = md_usize(&c, &a("attention.head_count"))?;
    let hidden = md_usize(&c, &a("embedding_length"))?;
    let n_kv_heads = md_usize(&c, &a("attention.head_count_kv")).unwrap_or(n_heads);
    let head_dim = md_usize(&c, &a("rope.dimension_count")).unwrap_or(hidden / n_heads.max(1));
    let tokens = md(&c, "tokenizer.ggml.tokens")?.to_vec()?.len();
    let cfg = LlamaConfig {
        architecture: arch.clone(),
        hidden_size: hidden,
        intermediate_size: md_usize(&c, &a("feed_forward_length"))?,
        n_layers: md_usize(&c, &a("block_count"))?,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab_size: md_usize(&c, &a("vocab_size")).unwrap_or(tokens),
        rope_theta: md(&c, &a("rope.freq_base")).and_then(|v| Ok(v.to_f32()?)).unwrap_or(10_000.0),
        rms_eps: md(&c, &a("attention.layer_norm_rms_epsilon"))?.to_f32()? as f64,
        context_length: md_usize(&c, &a("context_length"))?,
        tie_embeddings: !c.tensor_infos.contains_key("output.weight"),
    };
    cfg.validate()?;
    let dev = Device::Cpu;
    let mut get = |name: &str| -> Result<Tensor> {
        let q = c.tensor(&mut f, name, &dev).map_err(|e| ModelError::Format(format!("tensor {name}: {e}")))?;
        Ok(q.dequantize(&dev)?)
    };
    let permuted = arch != "qwen2";
    let mut w = HashMap::new();
    w.insert("model.embed_tokens.weight".to_string(), get("token_embd.weight")?);
    w.insert("model.norm.weight".to_string(), get("output_norm.weight")?);
    if !cfg.tie_embeddings {
        w.insert("lm_head.weight".to_string(), get("output.weight")?);
    }
    for i in 0..cfg.n_layers {
        let (g, h) = (format!("blk.{i}"), format!("model.layers.{i}"));
        let pairs = [
            ("attn_norm.weight", "input_layernorm.weight"),
            ("ffn_norm.weight", "post_attention_layernorm.weight"),
            ("attn_v.weight", "self_attn.v_proj.weight"),
            ("attn_output.weight", "self_attn.o_proj.weight"),
            ("ffn_gate.weight", "mlp.gate_proj.weight"),
            ("ffn_up.weight", "mlp.up_proj.weight"),
            ("ffn_down.weight", "mlp.down_proj.weight"),
        ];
        for (src, dst) in pairs {
            w.insert(format!("{h}.{dst}"), get(&format!("{g}.{src}"))?);
        }
        let (q, k) = (get(&format!("{g}.attn_q.weight"))?, get(&format!("{g}.attn_k.weight"))?);
        let (q, k) = if permuted {
            (unpermute(&q, cfg.n_heads, head_dim)?, unpermute(&k, cfg.n_kv_heads, head_dim)?)
        } else {
            (q, k)
        };
        w.insert(format!("{h}.self_attn.q_proj.weight"), q);
        w.insert(format!("{h}.self_attn.k_proj.weight"), k);
        for (src, dst) in
            [("attn_q.bias", "q_proj.bias"), ("attn_k.bias", "k_proj.bias"), ("attn_v.bias", "v_proj.bias")]
        {
            let name = format!("{g}.{src}");
            if c.tensor_infos.contains_key(&name) {
                w.insert(format!("{h}.self_attn.{dst}"), get(&name)?);
            }
        }
    }
    let tokenizer = TextTokenizer::from_gguf(&c.metadata)?;
    Ok((cfg, w, tokenizer))
}

/// Inverse of llama.cpp's Q/K row permutation: rows grouped per head as
/// `[head, half, 2]` go back to `[head, 2, half]`.
pub fn unpermute(w: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((heads, head_dim / 2, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

#[derive(serde::Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_theta")]
    rope_theta: f32,
    rms_norm_eps: f64,
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
}

fn default_theta() -> f32 {
    10_000.0
}

fn load_hf_dir(dir: &Path) -> Result<(LlamaConfig, HashMap<String, Tensor>, TextTokenizer)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
    let hf: HfConfig = serde_json::from_str(&text).map_err(|e| ModelError::Format(format!("config.json: {e}")))?;
    let arch = match hf.architectures.first().map(String::as_str) {
        Some("LlamaForCausalLM") | None => "llama",
        Some("MistralForCausalLM") => "mistral",
        Some("Qwen2ForCausalLM") => "qwen2",
        Some(other) => return Err(ModelError::Format(format!("unsupported architecture {other}"))),
    };
    let cfg = LlamaConfig {
        architecture: arch.into(),
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        n_layers: hf.num_hidden_layers,
        n_heads: hf.num_attention_heads,
        n_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        head_dim: hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
        vocab_size: hf.vocab_size,
        rope_theta: hf.rope_theta,
        rms_eps: hf.rms_norm_eps,
        context_length: hf.max_position_embeddings,
        tie_embeddings: hf.tie_word_embeddings,
    };
    cfg.validate()?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Format(format!("{}: no *.safetensors files", dir.display())));
    }
    let mut w = HashMap::new();
    for f in &files {
        for (name, t) in candle_core::safetensors::load(f, &Device::Cpu)? {
            w.insert(name, t.to_dtype(DType::F32)?);
        }
    }
    let tokenizer = TextTokenizer::from_hf_dir(dir)?;
    Ok((cfg, w, tokenizer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_the_llama_cpp_permutation() {
        // llama.cpp: reshape(heads, 2, half, cols).swapaxes(1, 2).
        let (heads, hd, cols) = (2, 4, 3);
        let hf = Tensor::arange(0f32, (heads * hd * cols) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * hd, cols))
            .unwrap();
        let permuted = hf
            .reshape((heads, 2, hd / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((heads * hd, cols))
            .unwrap();
        assert_ne!(permuted.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        let back = unpermute(&permuted, heads, hd).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn missing_and_foreign_files_are_clear_errors() {
        let e = load_weights(Path::new("/nonexistent/model.gguf")).err().unwrap().to_string();
        assert!(e.contains("fetch-model"), "{e}");
        let e = load_weights(Path::new("/etc/hostname")).err().unwrap().to_string();
        assert!(e.contains("expected a .gguf"), "{e}");
    }
}
