//! Field-range validation of `qaq.v1` requests, shared by the coordinator
//! (client API) and the worker (internal API) so that both give the same
//! `INVALID_ARGUMENT` message naming the field and its allowed range.
//!
//! Only checks that need no tokenizer live here; the worker additionally
//! checks the tokenized prompt length against the context.

use tonic::Status;

use crate::v1::{GenerateRequest, KvPolicy};

/// Default `max_new_tokens` when a request leaves it unset.
pub const DEFAULT_MAX_NEW_TOKENS: u32 = 256;
/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Longest request id / session id in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Largest accepted prompt in bytes (before tokenization).
pub const MAX_PROMPT_BYTES: usize = 4 << 20;
/// Accepted chat roles.
pub const CHAT_ROLES: [&str; 3] = ["system", "user", "assistant"];

fn invalid(msg: String) -> Status {
    Status::invalid_argument(msg)
}

/// Validates every field of a `GenerateRequest` that can be checked without a
/// tokenizer. `context_length` is the model's context (0 if unknown) and
/// `vocab_size` its vocabulary (0 if unknown).
pub fn generate_request(req: &GenerateRequest, context_length: u32, vocab_size: u32) -> Result<(), Status> {
    let has_prompt = !req.prompt.is_empty();
    let has_messages = !req.messages.is_empty();
    match (has_prompt, has_messages) {
        (false, false) => {
            return Err(invalid("prompt: must not be empty (give a prompt or chat messages)".into()));
        }
        (true, true) => return Err(invalid("prompt, messages: give exactly one of the two".into())),
        _ => {}
    }
    if req.prompt.len() > MAX_PROMPT_BYTES {
        return Err(invalid(format!("prompt: at most {MAX_PROMPT_BYTES} bytes, got {}", req.prompt.len())));
    }
    for (i, m) in req.messages.iter().enumerate() {
        if !CHAT_ROLES.contains(&m.role.as_str()) {
            return Err(invalid(format!(
                "messages[{i}].role: must be one of {CHAT_ROLES:?}, got {:?}",
                truncate(&m.role)
            )));
        }
        if m.content.is_empty() {
            return Err(invalid(format!("messages[{i}].content: must not be empty")));
        }
        if m.content.len() > MAX_PROMPT_BYTES {
            return Err(invalid(format!("messages[{i}].content: at most {MAX_PROMPT_BYTES} bytes")));
        }
    }
    if let Some(n) = req.max_new_tokens {
        if n == 0 {
            return Err(invalid(format!(
                "max_new_tokens: must be in [1, {}], got 0",
                context_length.saturating_sub(1).max(1)
            )));
        }
        if context_length > 0 && n >= context_length {
            return Err(invalid(format!(
                "max_new_tokens: must be in [1, {}] (context length minus at least one prompt token), got {n}",
                context_length - 1
            )));
        }
    }
    resume_token_ids(req, context_length, vocab_size)?;
    if let Some(s) = &req.sampling {
        if let Some(t) = s.temperature
            && !(0.0..=100.0).contains(&t)
        {
            return Err(invalid(format!("sampling.temperature: must be in [0, 100], got {t}")));
        }
        if let Some(p) = s.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(invalid(format!("sampling.top_p: must be in (0, 1], got {p}")));
        }
        if let Some(k) = s.top_k
            && vocab_size > 0
            && k > vocab_size
        {
            return Err(invalid(format!("sampling.top_k: must be in [0, {vocab_size}], got {k}")));
        }
        if let Some(r) = s.repetition_penalty
            && !(r > 0.0 && r <= 10.0)
        {
            return Err(invalid(format!("sampling.repetition_penalty: must be in (0, 10], got {r}")));
        }
    }
    if req.stop.len() > MAX_STOP_STRINGS {
        return Err(invalid(format!("stop: at most {MAX_STOP_STRINGS} strings, got {}", req.stop.len())));
    }
    for (i, s) in req.stop.iter().enumerate() {
        if s.is_empty() || s.len() > MAX_STOP_BYTES {
            return Err(invalid(format!("stop[{i}]: must be 1..={MAX_STOP_BYTES} bytes, got {}", s.len())));
        }
    }
    id("request_id", &req.request_id)?;
    if req.session_id.len() > MAX_ID_BYTES {
        return Err(invalid(format!("session_id: at most {MAX_ID_BYTES} bytes, got {}", req.session_id.len())));
    }
    if let Some(p) = &req.kv_policy {
        kv_policy(p)?;
    }
    Ok(())
}

/// The tokens a client resumes after: at most `max_new_tokens` (its default
/// when unset), fewer than the context, each inside the vocabulary (bounds
/// that are 0 are unknown and not checked). The worker checks the sum with
/// the tokenized prompt.
fn resume_token_ids(req: &GenerateRequest, context_length: u32, vocab_size: u32) -> Result<(), Status> {
    let n = req.resume_token_ids.len();
    let max_new = req.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS);
    if n > max_new as usize {
        let field = if req.max_new_tokens.is_some() { "max_new_tokens" } else { "the default max_new_tokens" };
        return Err(invalid(format!("resume_token_ids: at most {max_new} tokens ({field}), got {n}")));
    }
    if context_length > 0 && n >= context_length as usize {
        return Err(invalid(format!(
            "resume_token_ids: at most {} tokens (context length minus at least one prompt token), got {n}",
            context_length - 1
        )));
    }
    if vocab_size > 0
        && let Some((i, t)) = req.resume_token_ids.iter().enumerate().find(|&(_, &t)| t >= vocab_size)
    {
        return Err(invalid(format!("resume_token_ids[{i}]: must be in [0, {}), got {t}", vocab_size)));
    }
    Ok(())
}

/// Validates a request id: empty, or 1..=128 bytes of `[A-Za-z0-9._:-]`.
pub fn id(field: &str, v: &str) -> Result<(), Status> {
    if v.len() > MAX_ID_BYTES {
        return Err(invalid(format!("{field}: at most {MAX_ID_BYTES} bytes, got {}", v.len())));
    }
    if !v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)) {
        return Err(invalid(format!("{field}: only [A-Za-z0-9._:-] allowed, got {:?}", truncate(v))));
    }
    Ok(())
}

/// Range checks of the numeric KV-policy fields. The policy string itself is
/// parsed (and its errors reported) by the worker, which owns the policies.
pub fn kv_policy(p: &KvPolicy) -> Result<(), Status> {
    for (name, v) in [("kv_policy.sigma_s", p.sigma_s), ("kv_policy.sigma_x", p.sigma_x)] {
        if let Some(v) = v
            && !(v > 0.0 && v <= 1e6)
        {
            return Err(invalid(format!("{name}: must be in (0, 1e6], got {v}")));
        }
    }
    if let Some(a) = p.outlier_ratio
        && !(0.0..0.5).contains(&a)
    {
        return Err(invalid(format!("kv_policy.outlier_ratio: must be in [0, 0.5), got {a}")));
    }
    if let Some(w) = p.window
        && !(1..=64).contains(&w)
    {
        return Err(invalid(format!("kv_policy.window: must be in [1, 64], got {w}")));
    }
    for (name, v) in [("kv_policy.min_bits", p.min_bits), ("kv_policy.max_bits", p.max_bits)] {
        if let Some(v) = v
            && v > 8
        {
            return Err(invalid(format!("{name}: must be in [0, 8], got {v}")));
        }
    }
    if let (Some(lo), Some(hi)) = (p.min_bits, p.max_bits)
        && lo > hi
    {
        return Err(invalid(format!("kv_policy.min_bits: must be <= max_bits ({hi}), got {lo}")));
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{ChatMessage, SamplingParams};

    fn ok_req() -> GenerateRequest {
        GenerateRequest { prompt: "hi".into(), ..Default::default() }
    }

    fn msg_of(r: GenerateRequest) -> String {
        let e = generate_request(&r, 8192, 49152).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        e.message().to_string()
    }

    #[test]
    fn accepts_a_plain_request() {
        generate_request(&ok_req(), 8192, 49152).unwrap();
    }

    #[test]
    fn names_each_bad_field() {
        assert!(msg_of(GenerateRequest::default()).starts_with("prompt:"));
        assert!(msg_of(GenerateRequest { max_new_tokens: Some(0), ..ok_req() }).starts_with("max_new_tokens:"));
        assert!(msg_of(GenerateRequest { max_new_tokens: Some(9000), ..ok_req() }).contains("[1, 8191]"));
        let s = |s: SamplingParams| GenerateRequest { sampling: Some(s), ..ok_req() };
        assert!(
            msg_of(s(SamplingParams { temperature: Some(-1.0), ..Default::default() }))
                .starts_with("sampling.temperature")
        );
        assert!(msg_of(s(SamplingParams { top_p: Some(0.0), ..Default::default() })).starts_with("sampling.top_p"));
        assert!(msg_of(s(SamplingParams { top_p: Some(1.5), ..Default::default() })).starts_with("sampling.top_p"));
        assert!(
            msg_of(s(SamplingParams { top_p: Some(f32::NAN), ..Default::default() })).starts_with("sampling.top_p")
        );
        let m = |role: &str, content: &str| GenerateRequest {
            prompt: String::new(),
            messages: vec![ChatMessage { role: role.into(), content: content.into() }],
            ..Default::default()
        };
        assert!(msg_of(m("robot", "x")).starts_with("messages[0].role"));
        assert!(msg_of(m("user", "")).starts_with("messages[0].content"));
        assert!(msg_of(GenerateRequest { request_id: "a b".into(), ..ok_req() }).starts_with("request_id"));
        assert!(msg_of(GenerateRequest { stop: vec![String::new()], ..ok_req() }).starts_with("stop[0]"));
        let p = KvPolicy { min_bits: Some(5), max_bits: Some(2), ..Default::default() };
        assert!(msg_of(GenerateRequest { kv_policy: Some(p), ..ok_req() }).starts_with("kv_policy.min_bits"));
    }

    #[test]
    fn resumed_tokens_fit_max_new_tokens_the_context_and_the_vocabulary() {
        let r = |n: usize, max: Option<u32>| GenerateRequest {
            resume_token_ids: vec![7; n],
            max_new_tokens: max,
            ..ok_req()
        };
        // Up to max_new_tokens (exactly that many: nothing left to generate, still valid).
        generate_request(&r(4, Some(4)), 8192, 49152).unwrap();
        generate_request(&r(256, None), 8192, 49152).unwrap();
        let e = msg_of(r(5, Some(4)));
        assert!(e.starts_with("resume_token_ids: at most 4 tokens (max_new_tokens), got 5"), "{e}");
        let e = msg_of(r(257, None));
        assert!(e.contains("at most 256") && e.contains("default max_new_tokens"), "{e}");
        let e = generate_request(&r(100, Some(200)), 64, 0).unwrap_err();
        assert!(e.message().starts_with("max_new_tokens:"), "{}", e.message());
        let e = generate_request(&r(100, None), 64, 0).unwrap_err();
        assert!(e.message().starts_with("resume_token_ids: at most 63 tokens (context"), "{}", e.message());
        let bad = GenerateRequest { resume_token_ids: vec![1, 49152], ..ok_req() };
        assert_eq!(msg_of(bad), "resume_token_ids[1]: must be in [0, 49152), got 49152");
    }
}
