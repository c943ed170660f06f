use super::*;

fn chat(body: &str) -> Result<Parsed, HttpError> {
    parse(Endpoint::Chat, body.as_bytes(), None)
}

fn completion(body: &str) -> Result<Parsed, HttpError> {
    parse(Endpoint::Completion, body.as_bytes(), Some("my-id.1"))
}

/// The 400's param and message of a body that must be refused.
fn refused(r: Result<Parsed, HttpError>) -> (String, String) {
    let e = r.expect_err("refused");
    assert_eq!(e.status, 400, "{e:?}");
    (e.param.unwrap_or_default(), e.message)
}

#[test]
fn translates_a_chat_request() {
    let p = chat(
        r#"{"model": "smol", "messages": [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}],
            "max_completion_tokens": 12, "temperature": 0, "top_p": 0.9, "seed": 7, "stop": "END",
            "stream": true, "stream_options": {"include_usage": true}, "user": "u-1", "n": 1,
            "logprobs": false, "top_k": 40, "repetition_penalty": 1.1, "kv_policy": "uniform:4",
            "session_id": "chat-9", "ignore_eos": true, "parallel_tool_calls": true}"#,
    )
    .unwrap();
    let r = &p.request;
    assert_eq!(r.model, "smol");
    assert_eq!(r.messages.len(), 2);
    assert_eq!((r.messages[0].role.as_str(), r.messages[0].content.as_str()), ("system", "Be brief."));
    assert_eq!(r.messages[1].content, "Hi\nthere");
    assert!(r.prompt.is_empty());
    assert_eq!(r.max_new_tokens, Some(12));
    let s = r.sampling.unwrap();
    assert_eq!((s.temperature, s.top_p, s.seed, s.top_k), (Some(0.0), Some(0.9), Some(7), Some(40)));
    assert_eq!(s.repetition_penalty, Some(1.1));
    assert_eq!(r.stop, ["END"]);
    assert_eq!(r.kv_policy.as_ref().unwrap().policy, "uniform:4");
    assert_eq!((r.session_id.as_str(), r.ignore_eos), ("chat-9", true));
    assert!(p.stream && p.include_usage);
    // A max-tokens message is reported under the name the request used.
    let (m, param) = p.names.rename("max_new_tokens: must be in [1, 8191], got 0");
    assert_eq!(
        (m.as_str(), param.as_deref()),
        ("max_completion_tokens: must be in [1, 8191], got 0", Some("max_completion_tokens"))
    );
}

#[test]
fn translates_a_completion_request_with_openai_defaults() {
    let p = completion(r#"{"model": "", "prompt": ["Once upon"], "max_tokens": 5, "stop": ["a", "b"]}"#).unwrap();
    let r = &p.request;
    assert_eq!((r.prompt.as_str(), r.request_id.as_str()), ("Once upon", "my-id.1"));
    assert!(r.messages.is_empty());
    assert_eq!(r.max_new_tokens, Some(5));
    assert_eq!(r.stop, ["a", "b"]);
    // OpenAI samples at temperature 1 unless told otherwise.
    assert_eq!(r.sampling.unwrap().temperature, Some(1.0));
    assert!(!p.stream && !p.include_usage);
    let p = completion(r#"{"prompt": "x", "kv_policy": {"policy": "qaq", "max_bits": 4}, "top_k": -1}"#).unwrap();
    let kv = p.request.kv_policy.unwrap();
    assert_eq!((kv.policy.as_str(), kv.max_bits), ("qaq", Some(4)));
    assert_eq!(p.request.sampling.unwrap().top_k, None);
    // null is absent.
    let p = completion(r#"{"prompt": "x", "max_tokens": null, "stop": null, "n": null, "logprobs": null}"#).unwrap();
    assert_eq!((p.request.max_new_tokens, p.request.stop.len()), (None, 0));
}

#[test]
fn refuses_what_it_cannot_serve_naming_the_field() {
    let cases = [
        (r#"{"prompt": "x", "n": 2}"#, "n", "only 1"),
        (r#"{"prompt": "x", "logprobs": 1}"#, "logprobs", "log-probabilities"),
        (r#"{"prompt": "x", "top_logprobs": 3}"#, "top_logprobs", "log-probabilities"),
        (r#"{"prompt": "x", "presence_penalty": 0.5}"#, "presence_penalty", "only 0"),
        (r#"{"prompt": "x", "logit_bias": {"50256": -100}}"#, "logit_bias", "not supported"),
        (r#"{"prompt": "x", "tools": [{"type": "function"}]}"#, "tools", "tool calling"),
        (r#"{"prompt": "x", "tool_choice": "required"}"#, "tool_choice", "tool calling"),
        (r#"{"prompt": "x", "response_format": {"type": "json_object"}}"#, "response_format", "text"),
        (r#"{"prompt": "x", "best_of": 3}"#, "best_of", "only 1"),
        (r#"{"prompt": "x", "echo": true}"#, "echo", "not supported"),
        (r#"{"prompt": ["a", "b"]}"#, "prompt", "one prompt"),
        (r#"{"prompt": [1, 2]}"#, "prompt", "one prompt"),
        (r#"{"prompt": [[1, 2]]}"#, "prompt", "token ids"),
        (r#"{}"#, "prompt", "required"),
        (r#"{"prompt": "x", "stop": [1]}"#, "stop", "strings"),
        (r#"{"prompt": "x", "max_tokens": -5}"#, "max_tokens", "got -5"),
        (r#"{"prompt": "x", "seed": -1}"#, "seed", "got -1"),
        (r#"{"prompt": "x", "top_k": -7}"#, "top_k", "got -7"),
        (r#"{"prompt": "x", "kv_policy": {"polcy": "qaq"}}"#, "kv_policy", "unknown field"),
        (r#"{"prompt": "x", "kv_policy": 3}"#, "kv_policy", "policy string"),
    ];
    for (body, param, text) in cases {
        let (p, m) = refused(completion(body));
        assert_eq!(p, param, "{body}: {m}");
        assert!(m.starts_with(&format!("{param}:")) && m.contains(text), "{body}: {m}");
    }
    let (p, m) = refused(chat(r#"{"messages": []}"#));
    assert_eq!(p, "messages", "{m}");
    let (p, m) = refused(chat(r#"{"messages": [{"role": "user", "content": null}]}"#));
    assert_eq!(p, "messages[0].content", "{m}");
    let (p, m) = refused(chat(r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#));
    assert_eq!(p, "messages[0].content[0].type", "{m}");
}

#[test]
fn wrong_types_name_the_field_and_broken_json_is_a_400() {
    let (p, m) = refused(completion(r#"{"prompt": "x", "temperature": "hot"}"#));
    assert_eq!(p, "temperature");
    assert!(m.starts_with("temperature: invalid type: string \"hot\""), "{m}");
    assert!(!m.contains("line 1"), "{m}");
    let (p, m) = refused(chat(r#"{"messages": [{"role": 3, "content": "x"}]}"#));
    assert_eq!(p, "messages[0].role", "{m}");
    let (p, m) = refused(completion(r#"{"prompt": "x", "max_tokens": 1.5}"#));
    assert_eq!(p, "max_tokens", "{m}");
    let (p, _) = refused(completion(r#"{"prompt": "x", "stream": "yes"}"#));
    assert_eq!(p, "stream");
    for body in ["{", "not json", r#"{"prompt": "x"} trailing"#, "[]", "", "\"x\""] {
        let e = completion(body).expect_err(body);
        assert_eq!((e.status, e.code), (400, Some("invalid_json")), "{body}: {e:?}");
        assert!(e.message.starts_with("request body:"), "{body}: {}", e.message);
    }
}

#[test]
fn renames_qaq_fields_to_their_http_names() {
    let chat = FieldNames::new(Endpoint::Chat);
    let completion = FieldNames::new(Endpoint::Completion);
    let cases = [
        (
            chat,
            "max_new_tokens: must be in [1, 8191], got 0",
            "max_tokens: must be in [1, 8191], got 0",
            Some("max_tokens"),
        ),
        (
            chat,
            "sampling.temperature: must be in [0, 100], got -1",
            "temperature: must be in [0, 100], got -1",
            Some("temperature"),
        ),
        (chat, "sampling.top_p: must be in (0, 1], got 2", "top_p: must be in (0, 1], got 2", Some("top_p")),
        (chat, "prompt: must not be empty", "messages: must not be empty", Some("messages")),
        (completion, "prompt: must not be empty", "prompt: must not be empty", Some("prompt")),
        (chat, "messages[1].role: must be one of", "messages[1].role: must be one of", Some("messages[1].role")),
        (
            chat,
            "request_id: only [A-Za-z0-9._:-] allowed",
            "x-request-id: only [A-Za-z0-9._:-] allowed",
            Some("x-request-id"),
        ),
        (chat, "stop[0]: must be 1..=256 bytes", "stop[0]: must be 1..=256 bytes", Some("stop[0]")),
        (
            chat,
            "kv_policy.window: must be in [1, 64]",
            "kv_policy.window: must be in [1, 64]",
            Some("kv_policy.window"),
        ),
        (chat, "prompt, messages: give exactly one", "prompt, messages: give exactly one", None),
        (chat, "no field here", "no field here", None),
    ];
    for (names, from, to, param) in cases {
        let (m, p) = names.rename(from);
        assert_eq!((m.as_str(), p.as_deref()), (to, param), "{from}");
    }
}
