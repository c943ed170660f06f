//! Text <-> token ids, and chat rendering with the model's own template.
//!
//! From GGUF metadata a byte-level BPE tokenizer is assembled from
//! `tokenizer.ggml.{tokens,merges,token_type}` (gpt2-style models); an HF
//! folder provides `tokenizer.json` (and `tokenizer_config.json` for the chat
//! template).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use super::{ModelError, Result};

/// Names of end-of-turn tokens that also end a generation when present.
const END_TOKENS: [&str; 4] = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"];

/// GGUF token type of control (special) tokens.
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF token type of user-defined tokens, also matched before BPE.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// A tokenizer with the model's special ids and chat template.
pub struct TextTokenizer {
    inner: Tokenizer,
    eos_ids: Vec<u32>,
    bos_id: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("eos_ids", &self.eos_ids).finish_non_exhaustive()
    }
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

fn gguf_strings(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    let v = md.get(key).ok_or_else(|| ModelError::Tokenizer(format!("GGUF metadata lacks {key}")))?;
    v.to_vec()?.iter().map(|x| Ok(x.to_string()?.clone())).collect()
}

impl TextTokenizer {
    /// Builds the tokenizer from GGUF metadata.
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let model = md.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).map(String::as_str);
        if model != Some("gpt2") {
            return Err(ModelError::Tokenizer(format!(
                "GGUF tokenizer model {model:?} is not supported (byte-level BPE \"gpt2\" is); \
                 use an HF folder with tokenizer.json instead"
            )));
        }
        let tokens = gguf_strings(md, "tokenizer.ggml.tokens")?;
        let merges = gguf_strings(md, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ModelError::Tokenizer(format!("bad merge {m:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v.to_vec()?.iter().map(|x| x.to_i32().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(tok_err)?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        inner.with_decoder(Some(ByteLevel::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, ty)| **ty == TOKEN_TYPE_CONTROL || **ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(t, ty)| AddedToken::from(t.clone(), *ty == TOKEN_TYPE_CONTROL))
            .collect();
        inner.add_special_tokens(special).map_err(tok_err)?;
        let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let mut eos_ids: Vec<u32> = id("tokenizer.ggml.eos_token_id").into_iter().collect();
        if let Some(eot) = id("tokenizer.ggml.eot_token_id") {
            eos_ids.push(eot);
        }
        let add_bos = md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        let chat_template = md.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
        Ok(Self::finish(inner, eos_ids, id("tokenizer.ggml.bos_token_id"), add_bos, chat_template))
    }

    /// Loads `tokenizer.json` (+ `tokenizer_config.json`) from an HF folder.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(tok_err)?;
        let cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let token_of = |key: &str| -> Option<u32> {
            let v = cfg.get(key)?;
            let s = v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            inner.token_to_id(s)
        };
        let eos_ids = token_of("eos_token").into_iter().collect();
        let bos = token_of("bos_token");
        let add_bos = cfg.get("add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
        let chat_template = cfg.get("chat_template").and_then(|v| v.as_str()).map(String::from);
        Ok(Self::finish(inner, eos_ids, bos, add_bos, chat_template))
    }

    fn finish(
        inner: Tokenizer,
        mut eos_ids: Vec<u32>,
        bos_id: Option<u32>,
        add_bos: bool,
        chat_template: Option<String>,
    ) -> Self {
        eos_ids.extend(END_TOKENS.iter().filter_map(|t| inner.token_to_id(t)));
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Self { inner, eos_ids, bos_id, add_bos, chat_template }
    }

    /// Token ids of `text` (special tokens written in the text are recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos
            && let Some(b) = self.bos_id
        {
            ids.push(b);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Token ids of `text` as a continuation of earlier text: never a BOS.
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false).map_err(tok_err)?.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// Writes the tokenizer as an HF `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(tok_err)
    }

    /// Tokens that end a generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders chat turns `(role, content)` with the model's template and a
    /// generation prompt for the assistant.
    pub fn render_chat(&self, messages: &[(String, String)]) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::Tokenizer("the model has no chat template; send a plain prompt".into()))?;
        let mut env = minijinja::Environment::new();
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", template).map_err(tok_err)?;
        let msgs: Vec<_> = messages.iter().map(|(r, c)| minijinja::context! { role => r, content => c }).collect();
        let tok = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i)).unwrap_or_default();
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => msgs,
                    add_generation_prompt => true,
                    bos_token => tok(self.bos_id),
                    eos_token => tok(self.eos_ids.first().copied()),
                })
            })
            .map_err(tok_err)
    }
}
