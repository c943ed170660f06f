//! Loads llama-family models from a GGUF file (matrices stay in their quantized GGUF
//! format: [`qaq_kernels::qmat::QMatrix`]) or an HF safetensors folder (`config.json`,
//! `model.safetensors` or sharded `model-*.safetensors`, `tokenizer.json`; f32).
//!
//! Weights are normalised to HF names and layout. llama.cpp stores the Q and K
//! projections of llama-architecture models with rows permuted for
//! interleaved RoPE; they are permuted back here so one RoPE convention serves
//! both formats.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use qaq_kernels::qmat::{QFormat, QMatrix};

use super::tokenizer::TextTokenizer;
use super::weights::{HostTensor, HostWeights, host_tensors};
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

/// Loads a model from a `.gguf` file or an HF folder, on the CPU.
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    let (cfg, tensors, tokenizer) = read_model(path)?;
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let weights = HostWeights::from_named(&cfg, tensors)?;
    Ok(LoadedModel { name, model: Llama::from_host(cfg, weights)?, tokenizer })
}

/// Loads the configuration, the HF-named weights dequantized to f32, and the tokenizer
/// (the reference the tests give candle's f32 llama).
pub fn load_weights(path: &Path) -> Result<(LlamaConfig, HashMap<String, Tensor>, TextTokenizer)> {
    let (cfg, tensors, tokenizer) = read_model(path)?;
    let w = tensors.into_iter().map(|(k, t)| Ok((k, t.to_tensor()?))).collect::<Result<_>>()?;
    Ok((cfg, w, tokenizer))
}

/// Reads the configuration, the HF-named tensors as the host keeps them, and the tokenizer.
pub fn read_model(path: &Path) -> Result<(LlamaConfig, HashMap<String, HostTensor>, TextTokenizer)> {
    if !path.exists() {
        Err(ModelError::Format(format!(
            "{} does not exist (run scripts/fetch-model.sh for the default model)",
            path.display()
        )))
    } else if path.is_dir() {
        let (cfg, w, tok) = load_hf_dir(path)?;
        Ok((cfg, host_tensors(&w)?, tok))
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

/// The GGUF type of a tensor as a matrix format of the kernels.
pub fn format(dtype: GgmlDType) -> Result<QFormat> {
    Ok(match dtype {
        GgmlDType::F32 => QFormat::F32,
        GgmlDType::F16 => QFormat::F16,
        GgmlDType::BF16 => QFormat::BF16,
        GgmlDType::Q4_0 => QFormat::Q4_0,
        GgmlDType::Q4_1 => QFormat::Q4_1,
        GgmlDType::Q5_0 => QFormat::Q5_0,
        GgmlDType::Q5_1 => QFormat::Q5_1,
        GgmlDType::Q8_0 => QFormat::Q8_0,
        GgmlDType::Q2K => QFormat::Q2_K,
        GgmlDType::Q3K => QFormat::Q3_K,
        GgmlDType::Q4K => QFormat::Q4_K,
        GgmlDType::Q5K => QFormat::Q5_K,
        GgmlDType::Q6K => QFormat::Q6_K,
        other => return Err(ModelError::Format(format!("weights of GGUF type {other:?} are not supported"))),
    })
}

/// A GGUF tensor as the host keeps it: a matrix in its own format (rows of whole blocks,
/// the bytes as stored), a vector as f32.
fn host_tensor(name: &str, q: QTensor) -> Result<HostTensor> {
    let err = |e: &dyn std::fmt::Display| ModelError::Format(format!("tensor {name}: {e}"));
    Ok(match *q.shape().dims() {
        [rows, cols] => {
            let data = q.data().map_err(|e| err(&e))?.into_owned();
            HostTensor::Mat(QMatrix::new(format(q.dtype())?, rows, cols, data).map_err(|e| err(&e))?)
        }
        _ => HostTensor::Vec(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?),
    })
}

fn load_gguf(path: &Path) -> Result<(LlamaConfig, HashMap<String, HostTensor>, TextTokenizer)> {
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
    let mut get = |name: &str| -> Result<HostTensor> {
        let q = c.tensor(&mut f, name, &Device::Cpu).map_err(|e| ModelError::Format(format!("tensor {name}: {e}")))?;
        host_tensor(name, q)
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
            (unpermute(q, cfg.n_heads, head_dim)?, unpermute(k, cfg.n_kv_heads, head_dim)?)
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
/// `[head, half, 2]` go back to `[head, 2, half]` (whole rows move, so a quantized matrix
/// is permuted as stored).
pub fn unpermute(w: HostTensor, heads: usize, head_dim: usize) -> Result<HostTensor> {
    let HostTensor::Mat(mut m) = w else {
        return Err(ModelError::Format("a Q or K projection must be a matrix".into()));
    };
    m.permute_rows(&unpermutation(heads, head_dim)).map_err(|e| ModelError::Format(e.to_string()))?;
    Ok(HostTensor::Mat(m))
}

/// Row `i` of the HF layout is row `unpermutation(..)[i]` of llama.cpp's.
pub fn unpermutation(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    (0..heads * head_dim)
        .map(|r| {
            let (head, within) = (r / head_dim, r % head_dim);
            let (two, i) = (within / half, within % half);
            head * head_dim + i * 2 + two
        })
        .collect()
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
        let back = unpermute(HostTensor::from_tensor(&permuted).unwrap(), heads, hd).unwrap();
        assert_eq!(back.to_tensor().unwrap().to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn missing_and_foreign_files_are_clear_errors() {
        let e = load_weights(Path::new("/nonexistent/model.gguf")).err().unwrap().to_string();
        assert!(e.contains("fetch-model"), "{e}");
        let e = load_weights(Path::new("/etc/hostname")).err().unwrap().to_string();
        assert!(e.contains("expected a .gguf"), "{e}");
    }
}
