//! OpenAI request bodies -> the `qaq.v1` [`GenerateRequest`] the gRPC front
//! builds too. Only what `qaq.v1` cannot express is checked here (JSON types,
//! `n`, log-probabilities, the OpenAI fields qaq does not serve); every range
//! is checked by `qaq_proto::validate` on the shared path, and its messages
//! are reported under the HTTP request's field names ([`FieldNames`]).
//!
//! Fields: `model`, `messages` (chat) / `prompt` (completions: a string or a
//! list of one string), `max_tokens` / `max_completion_tokens`,
//! `temperature` (absent: 1, as in OpenAI's API), `top_p`, `seed`, `stop`
//! (a string or a list), `stream`, `stream_options.include_usage`, `user`
//! (ignored), `n` (1 only). Refused with a 400 naming the field when set to
//! anything but their neutral value: `logprobs`, `top_logprobs`,
//! `presence_penalty`, `frequency_penalty`, `logit_bias`, `tools`,
//! `tool_choice`, `functions`, `function_call`, `response_format`,
//! `best_of`, `echo`, `suffix`. qaq's extensions: `top_k`,
//! `repetition_penalty`, `kv_policy` (a policy string or a `qaq.v1.KvPolicy`
//! object), `session_id`, `ignore_eos`. Other fields are ignored.

use serde::Deserialize;
use serde_json::Value;

use qaq_proto::v1::{ChatMessage, GenerateRequest, KvPolicy, SamplingParams};

use crate::error::HttpError;

/// The endpoint a body was posted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completion,
}

/// A parsed request: what runs, and how to answer.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The request for the shared path.
    pub request: GenerateRequest,
    /// Answer with Server-Sent Events.
    pub stream: bool,
    /// Streaming: end with a usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// How this request spelled the fields whose `qaq.v1` names differ.
    pub names: FieldNames,
}

/// The HTTP names of the fields a `qaq.v1` message may name differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldNames {
    endpoint: Endpoint,
    /// `max_tokens` or `max_completion_tokens`, whichever the request used.
    max_tokens: &'static str,
}

/// Header of the client's request id (echoed; used in logs and by `Abort`).
pub const X_REQUEST_ID: &str = "x-request-id";

impl FieldNames {
    /// The names of a request to `endpoint` that sent neither max-tokens field.
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint, max_tokens: "max_tokens" }
    }

    /// The HTTP name of a `qaq.v1` field path (`sampling.top_p` -> `top_p`).
    pub fn http_path(&self, path: &str) -> String {
        let split = path.find(['.', '[']).unwrap_or(path.len());
        let (head, tail) = path.split_at(split);
        match head {
            "max_new_tokens" => format!("{}{tail}", self.max_tokens),
            "sampling" => tail.trim_start_matches('.').to_string(),
            "request_id" => format!("{X_REQUEST_ID}{tail}"),
            "prompt" if self.endpoint == Endpoint::Chat => format!("messages{tail}"),
            _ => path.to_string(),
        }
    }

    /// A `qaq.v1` validation message (`field: ...`) with its field renamed,
    /// and that name (`None` when the message names no single field).
    pub fn rename(&self, message: &str) -> (String, Option<String>) {
        let Some((path, rest)) = message.split_once(':') else { return (message.to_string(), None) };
        if path.is_empty() || path.contains([' ', ',']) {
            return (message.to_string(), None);
        }
        let path = self.http_path(path);
        (format!("{path}:{rest}"), Some(path))
    }
}

/// The body, as far as serde types it; unions are `Value`s, read by hand
/// below so that their errors name the field.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Body {
    model: Option<String>,
    messages: Option<Vec<Message>>,
    prompt: Option<Value>,
    max_tokens: Option<Int>,
    max_completion_tokens: Option<Int>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<Int>,
    stop: Option<Value>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<Int>,
    logprobs: Option<Value>,
    top_logprobs: Option<Int>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    functions: Option<Vec<Value>>,
    function_call: Option<Value>,
    response_format: Option<Value>,
    best_of: Option<Int>,
    echo: Option<bool>,
    suffix: Option<String>,
    // qaq extensions.
    top_k: Option<Int>,
    repetition_penalty: Option<f64>,
    kv_policy: Option<Value>,
    session_id: Option<String>,
    ignore_eos: Option<bool>,
}

/// A JSON integer of either sign and any size up to `u64::MAX` (serde_json
/// reads `i128` itself as a syntax error for `1.5`; this is a type error
/// naming the field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Int(i128);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Int;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Value>,
}

/// `qaq.v1.KvPolicy` as a JSON object.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct KvPolicyObject {
    policy: String,
    sigma_s: Option<f32>,
    sigma_x: Option<f32>,
    outlier_ratio: Option<f32>,
    window: Option<u32>,
    min_bits: Option<u32>,
    max_bits: Option<u32>,
}

fn invalid(param: &str, message: String) -> HttpError {
    HttpError::invalid(Some(param.to_string()), message)
}

fn unsupported(param: &str, what: &str) -> HttpError {
    invalid(param, format!("{param}: {what}"))
}

/// Parses a request body posted to `endpoint`; `request_id` is the
/// `x-request-id` header, if any.
pub fn parse(endpoint: Endpoint, body: &[u8], request_id: Option<&str>) -> Result<Parsed, HttpError> {
    // serde would also read a struct from a JSON array.
    if body.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|&b| b == b'[') {
        return Err(HttpError::malformed("request body: must be a JSON object".into()));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let body: Body = serde_path_to_error::deserialize(&mut de).map_err(json_error)?;
    de.end().map_err(|e| HttpError::malformed(format!("request body: not valid JSON: {}", without_position(&e))))?;
    let mut names = FieldNames::new(endpoint);
    refuse_unsupported(&body)?;

    let mut req = GenerateRequest {
        model: body.model.unwrap_or_default(),
        request_id: request_id.unwrap_or_default().to_string(),
        session_id: body.session_id.unwrap_or_default(),
        ignore_eos: body.ignore_eos.unwrap_or(false),
        ..Default::default()
    };
    match endpoint {
        Endpoint::Chat => req.messages = messages(body.messages)?,
        Endpoint::Completion => req.prompt = prompt(body.prompt)?,
    }
    let max_tokens = match (body.max_completion_tokens.map(|n| n.0), body.max_tokens.map(|n| n.0)) {
        (Some(n), _) => Some(("max_completion_tokens", n)),
        (None, Some(n)) => Some(("max_tokens", n)),
        (None, None) => None,
    };
    if let Some((name, n)) = max_tokens {
        names.max_tokens = name;
        let n = u32::try_from(n)
            .map_err(|_| invalid(name, format!("{name}: must be in [1, context length - 1], got {n}")))?;
        req.max_new_tokens = Some(n);
    }
    let seed = body
        .seed
        .map(|s| s.0)
        .map(|s| u64::try_from(s).map_err(|_| invalid("seed", format!("seed: must be in [0, {}], got {s}", u64::MAX))))
        .transpose()?;
    let top_k = match body.top_k.map(|k| k.0) {
        None | Some(-1) => None,
        Some(k) => Some(u32::try_from(k).map_err(|_| {
            invalid("top_k", format!("top_k: must be -1 or 0 (disabled) or in [1, vocabulary size], got {k}"))
        })?),
    };
    req.sampling = Some(SamplingParams {
        // OpenAI's default temperature is 1 (qaq.v1's is greedy).
        temperature: Some(body.temperature.unwrap_or(1.0) as f32),
        top_p: body.top_p.map(|p| p as f32),
        top_k,
        seed,
        repetition_penalty: body.repetition_penalty.map(|r| r as f32),
    });
    req.stop = stop(body.stop)?;
    req.kv_policy = body.kv_policy.map(kv_policy).transpose()?;
    Ok(Parsed {
        request: req,
        stream: body.stream.unwrap_or(false),
        include_usage: body.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        names,
    })
}

/// A serde error at a field path -> 400 naming it; broken JSON -> 400.
fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> HttpError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let text = without_position(&inner);
    match inner.classify() {
        serde_json::error::Category::Data if path != "." => invalid(&path, format!("{path}: {text}")),
        serde_json::error::Category::Data => {
            HttpError::malformed(format!("request body: must be a JSON object ({text})"))
        }
        _ => HttpError::malformed(format!("request body: not valid JSON: {text}")),
    }
}

/// A serde_json error's message without its ` at line L column C`.
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// The OpenAI fields qaq cannot honour are refused unless neutral.
fn refuse_unsupported(b: &Body) -> Result<(), HttpError> {
    if let Some(Int(n)) = b.n
        && n != 1
    {
        return Err(invalid("n", format!("n: only 1 is supported, got {n}")));
    }
    let no_logprobs = "not supported: qaq workers do not return log-probabilities";
    if b.logprobs.as_ref().is_some_and(|v| !matches!(v, Value::Bool(false))) {
        return Err(unsupported("logprobs", no_logprobs));
    }
    if b.top_logprobs.is_some_and(|n| n.0 != 0) {
        return Err(unsupported("top_logprobs", no_logprobs));
    }
    for (name, v) in [("presence_penalty", b.presence_penalty), ("frequency_penalty", b.frequency_penalty)] {
        if let Some(v) = v
            && v != 0.0
        {
            return Err(invalid(name, format!("{name}: only 0 is supported, got {v} (qaq offers repetition_penalty)")));
        }
    }
    if b.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(unsupported("logit_bias", "not supported"));
    }
    for (name, v) in [("tools", &b.tools), ("functions", &b.functions)] {
        if v.as_ref().is_some_and(|v| !v.is_empty()) {
            return Err(unsupported(name, "tool calling is not supported"));
        }
    }
    for (name, v) in [("tool_choice", &b.tool_choice), ("function_call", &b.function_call)] {
        if v.as_ref().is_some_and(|v| !matches!(v.as_str(), Some("none" | "auto"))) {
            return Err(unsupported(name, "tool calling is not supported (only \"none\" or \"auto\")"));
        }
    }
    if let Some(f) = &b.response_format
        && f.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(unsupported("response_format", "only {\"type\": \"text\"} is supported"));
    }
    if let Some(Int(n)) = b.best_of
        && n != 1
    {
        return Err(invalid("best_of", format!("best_of: only 1 is supported, got {n}")));
    }
    if b.echo == Some(true) {
        return Err(unsupported("echo", "not supported"));
    }
    if b.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "not supported"));
    }
    Ok(())
}

/// Chat messages; `developer` is OpenAI's newer name for `system`; content
/// is a string or a list of text parts (joined with newlines).
fn messages(messages: Option<Vec<Message>>) -> Result<Vec<ChatMessage>, HttpError> {
    let messages = messages.unwrap_or_default();
    if messages.is_empty() {
        return Err(invalid("messages", "messages: must be a non-empty list of chat messages".into()));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = if m.role == "developer" { "system".to_string() } else { m.role };
            let content = match m.content {
                Some(Value::String(s)) => s,
                Some(Value::Array(parts)) => text_parts(i, &parts)?,
                _ => {
                    let name = format!("messages[{i}].content");
                    return Err(invalid(&name, format!("{name}: must be a string or a list of text parts")));
                }
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

fn text_parts(i: usize, parts: &[Value]) -> Result<String, HttpError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        let kind = p.get("type").and_then(Value::as_str);
        match (kind, p.get("text").and_then(Value::as_str)) {
            (Some("text"), Some(t)) => texts.push(t),
            (Some("text"), None) => {
                let name = format!("messages[{i}].content[{j}].text");
                return Err(invalid(&name, format!("{name}: must be a string")));
            }
            (other, _) => {
                let name = format!("messages[{i}].content[{j}].type");
                return Err(invalid(&name, format!("{name}: only \"text\" parts are supported, got {other:?}")));
            }
        }
    }
    Ok(texts.join("\n"))
}

/// A completion's prompt: a string or a list of exactly one string.
fn prompt(prompt: Option<Value>) -> Result<String, HttpError> {
    match prompt {
        None => Err(invalid("prompt", "prompt: required (a string or a list of one string)".into())),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => Ok(s.clone()),
            [] | [_, _, ..] => {
                Err(invalid("prompt", format!("prompt: one prompt per request is supported, got {}", items.len())))
            }
            [_] => Err(invalid("prompt", "prompt: token ids are not supported; send text".into())),
        },
        Some(_) => Err(invalid("prompt", "prompt: must be a string or a list of one string".into())),
    }
}

fn stop(stop: Option<Value>) -> Result<Vec<String>, HttpError> {
    let bad = || invalid("stop", "stop: must be a string or a list of strings".into());
    match stop {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s]),
        Some(Value::Array(items)) => {
            items.into_iter().map(|v| if let Value::String(s) = v { Ok(s) } else { Err(bad()) }).collect()
        }
        Some(_) => Err(bad()),
    }
}

/// `kv_policy`: a policy string (`"uniform:4"`) or a `qaq.v1.KvPolicy` object.
fn kv_policy(v: Value) -> Result<KvPolicy, HttpError> {
    let object = match v {
        Value::String(policy) => return Ok(KvPolicy { policy, ..Default::default() }),
        Value::Object(_) => serde_json::from_value::<KvPolicyObject>(v)
            .map_err(|e| invalid("kv_policy", format!("kv_policy: {}", without_position(&e))))?,
        _ => return Err(invalid("kv_policy", "kv_policy: must be a policy string or an object".into())),
    };
    Ok(KvPolicy {
        policy: object.policy,
        sigma_s: object.sigma_s,
        sigma_x: object.sigma_x,
        outlier_ratio: object.outlier_ratio,
        window: object.window,
        min_bits: object.min_bits,
        max_bits: object.max_bits,
    })
}

#[cfg(test)]
#[path = "openai_tests.rs"]
mod tests;
