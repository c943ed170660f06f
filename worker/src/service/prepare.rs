//! Request preparation: a `Worker.Submit` request validated against this worker (its
//! model, context, vocabulary, KV policies and budget), tokenized, and turned into an
//! engine [`Job`]. Every rejection names the field and its allowed range.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use qaq_proto::v1::SubmitRequest;
use qaq_proto::validate;
use tokio::sync::mpsc;

use crate::engine::{Event, Job, SamplingConfig};
use crate::error::WorkerError;
use crate::kv::{self, PolicyChoice, QaqOverrides};
use crate::model::LoadedModel;

/// The worker's KV settings, against which requests are resolved.
#[derive(Debug)]
pub struct KvSettings {
    /// Default policy (`--kv-policy` with the `--kv-*` flags applied).
    pub default: PolicyChoice,
    /// Worst-case device bytes per token, by policy label (measured once each).
    worst: Mutex<HashMap<String, usize>>,
    /// The node this worker runs on (NCCL migration between workers of one node).
    pub node: String,
}

impl KvSettings {
    /// Settings with default policy `default`, on the node named by the host name.
    pub fn new(default: PolicyChoice) -> Self {
        Self { default, worst: Default::default(), node: crate::config::hostname() }
    }

    /// The same settings on node `node`.
    pub fn on_node(self, node: String) -> Self {
        Self { node, ..self }
    }

    /// The request's policy: its override (string and QAQ fields) or the default.
    pub fn resolve(&self, req: Option<&qaq_proto::v1::KvPolicy>) -> Result<PolicyChoice, WorkerError> {
        let Some(p) = req else { return Ok(self.default.clone()) };
        let base = if p.policy.trim().is_empty() {
            self.default.clone()
        } else {
            PolicyChoice::parse(&p.policy).map_err(|e| WorkerError::invalid("kv_policy.policy", e))?
        };
        let o = QaqOverrides {
            sigma_s: p.sigma_s.map(f64::from),
            sigma_x: p.sigma_x.map(f64::from),
            outlier_ratio: p.outlier_ratio.map(f64::from),
            window: p.window.map(|w| w as usize),
            min_bits: p.min_bits.map(|b| b.min(255) as u8),
            max_bits: p.max_bits.map(|b| b.min(255) as u8),
            every: None,
        };
        // The overrides' errors start with the field family they were given.
        o.apply(base, "kv_policy").map_err(|e| WorkerError::invalid("kv_policy", strip(&e, "kv_policy: ")))
    }

    /// Worst-case device bytes per token of a policy for this model.
    pub fn worst_bytes_per_token(&self, model: &LoadedModel, p: &PolicyChoice) -> Result<usize, WorkerError> {
        let mut m = self.worst.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&w) = m.get(&p.label) {
            return Ok(w);
        }
        let w = kv::worst_bytes_per_token(&model.model.kv_shape(), &p.policy)
            .map_err(|e| WorkerError::invalid("kv_policy", e))?;
        m.insert(p.label.clone(), w);
        Ok(w)
    }
}

fn strip<'a>(s: &'a str, prefix: &str) -> &'a str {
    s.strip_prefix(prefix).unwrap_or(s)
}

/// Validates `req` against the worker (`device_budget`: its device KV budget), tokenizes
/// it and builds the engine job and the receiver of its events.
pub fn prepare(
    model: &LoadedModel,
    kv: &KvSettings,
    device_budget: u64,
    req: SubmitRequest,
) -> Result<(Job, mpsc::UnboundedReceiver<Event>), WorkerError> {
    let cfg = model.model.config();
    let ctx = cfg.context_length;
    let r = req.request.ok_or_else(|| WorkerError::invalid("request", "must be set"))?;
    validate::generate_request(&r, ctx as u32, cfg.vocab_size as u32).map_err(WorkerError::Invalid)?;
    if r.request_id.is_empty() {
        return Err(WorkerError::invalid("request.request_id", "must be set by the coordinator"));
    }
    if !r.model.is_empty() && r.model != model.name {
        return Err(WorkerError::NotFound {
            field: "model",
            message: format!("{:?} is not served by this worker (it serves {:?})", r.model, model.name),
        });
    }
    let policy = kv.resolve(r.kv_policy.as_ref())?;
    let worst = kv.worst_bytes_per_token(model, &policy)?;
    let tok = &model.tokenizer;
    let text = if r.messages.is_empty() {
        r.prompt.clone()
    } else {
        let turns: Vec<(String, String)> = r.messages.iter().map(|m| (m.role.clone(), m.content.clone())).collect();
        tok.render_chat(&turns).map_err(|e| WorkerError::invalid("messages", e.to_string()))?
    };
    let prompt = tok.encode(&text).map_err(|e| WorkerError::invalid("prompt", e.to_string()))?;
    if prompt.is_empty() {
        return Err(WorkerError::invalid("prompt", "tokenizes to no tokens"));
    }
    if let Some(&bad) = req.resume_token_ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        return Err(WorkerError::invalid(
            "resume_token_ids",
            format!("token {bad} outside the vocabulary [0, {})", cfg.vocab_size),
        ));
    }
    let used = prompt.len() + req.resume_token_ids.len();
    if used >= ctx {
        return Err(WorkerError::invalid(
            "prompt",
            format!(
                "{} tokens (with {} resumed) but the context holds {ctx}; at most {} prompt tokens are allowed",
                prompt.len(),
                req.resume_token_ids.len(),
                ctx - 1
            ),
        ));
    }
    let need = (used as u64).saturating_mul(worst as u64);
    if need > device_budget {
        return Err(WorkerError::ResourceExhausted {
            field: "prompt",
            message: format!(
                "{used} tokens need up to {need} bytes of KV cache under {:?}, more than the worker's device \
                 budget (--kv-device-budget-bytes {device_budget})",
                policy.label
            ),
        });
    }
    let room = (ctx - prompt.len()) as u32;
    let max_new = match r.max_new_tokens {
        Some(n) if n > room => {
            return Err(WorkerError::invalid(
                "max_new_tokens",
                format!("must be in [1, {room}] for this {}-token prompt (context {ctx}), got {n}", prompt.len()),
            ));
        }
        Some(n) => n,
        None => validate::DEFAULT_MAX_NEW_TOKENS.min(room),
    };
    if req.resume_token_ids.len() as u32 >= max_new {
        return Err(WorkerError::invalid(
            "resume_token_ids",
            format!("{} tokens already reach max_new_tokens {max_new}", req.resume_token_ids.len()),
        ));
    }
    let s = r.sampling.unwrap_or_default();
    let sampling = SamplingConfig {
        temperature: s.temperature.unwrap_or(0.0),
        top_p: s.top_p.unwrap_or(1.0),
        top_k: s.top_k.unwrap_or(0) as usize,
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        seed: s.seed.unwrap_or_else(|| seed_of(&r.request_id)),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        id: r.request_id,
        prompt,
        resume: req.resume_token_ids,
        kv: None,
        max_new_tokens: max_new,
        sampling,
        stops: r.stop,
        ignore_eos: r.ignore_eos,
        policy,
        worst_bytes_per_token: worst,
        events: tx,
        received: Instant::now(),
    };
    Ok((job, rx))
}

/// A request's default sampling seed: FNV-1a of its id (the same on every worker, so a
/// resubmitted request samples alike).
fn seed_of(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}
