#!/usr/bin/env python3
"""Drives a qaq coordinator's OpenAI-compatible HTTP front with the official `openai`
package, as a user's tools would (run by coordinator/tests/cluster/http.rs).

    openai_check.py BASE_URL API_KEY

BASE_URL is http://HOST:PORT/v1 and API_KEY a key of the coordinator's --api-keys-file.
Checks /v1/models, a chat completion, a streamed chat completion with include_usage (its
text equal to the non-streamed greedy text with the same seed), a completion and a
streamed one, bad fields (openai.BadRequestError naming the field), an unknown model
(openai.NotFoundError) and a wrong key (openai.AuthenticationError). Exits 1 on the first
failed check.
"""

import sys

import openai

BASE, KEY = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=120)
checks = 0


def check(ok, what):
    global checks
    if not ok:
        print(f"openai_check: FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


def refused(error_type, field, **kwargs):
    """A request that must fail with `error_type` whose message names `field`."""
    try:
        client.chat.completions.create(**kwargs)
    except error_type as e:
        message = e.body.get("message", "") if isinstance(e.body, dict) else str(e)
        check(field in message, f"{error_type.__name__} names {field!r}: {message!r}")
        check(e.body.get("param") in (field, None), f"param of {field!r}: {e.body!r}")
        print(f"  refused as expected: {error_type.__name__} {e.status_code}: {message}")
        return
    check(False, f"{kwargs} was accepted")


models = client.models.list()
ids = [m.id for m in models.data]
check(len(ids) == 1 and ids[0], f"/v1/models lists one model: {ids}")
model = ids[0]
print(f"  model {model}")

messages = [{"role": "user", "content": "Name three colours."}]
greedy = dict(model=model, messages=messages, max_tokens=24, temperature=0, seed=7)
r = client.chat.completions.create(**greedy)
text = r.choices[0].message.content
check(r.object == "chat.completion" and r.choices[0].message.role == "assistant", f"chat shape: {r}")
check(bool(text), "chat text is not empty")
check(r.choices[0].finish_reason in ("stop", "length"), f"finish_reason {r.choices[0].finish_reason}")
u = r.usage
check(u.prompt_tokens > 0 and 0 < u.completion_tokens <= 24, f"usage {u}")
check(u.total_tokens == u.prompt_tokens + u.completion_tokens, f"total_tokens {u}")
kv = (u.model_extra or {}).get("qaq") or {}
check(kv.get("kv_bytes", 0) > 0 and kv.get("kv_fp16_equivalent_bytes", 0) > kv["kv_bytes"], f"usage.qaq KV bytes: {kv}")
check(kv.get("avg_key_bits", 0) > 0 and "requantizations_up" in kv, f"usage.qaq bits: {kv}")
print(f"  chat: {text!r} ({u.completion_tokens} tokens, KV {kv['kv_bytes']} B vs fp16 {kv['kv_fp16_equivalent_bytes']} B)")

parts, finish, usage, kinds = [], None, None, set()
stream = client.chat.completions.create(**greedy, stream=True, stream_options={"include_usage": True})
for chunk in stream:
    kinds.add(chunk.object)
    if chunk.choices:
        parts.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
check(kinds == {"chat.completion.chunk"}, f"chunk objects {kinds}")
check("".join(parts) == text, f"streamed text {''.join(parts)!r} == non-streamed {text!r}")
check(finish == r.choices[0].finish_reason, f"streamed finish_reason {finish}")
check(usage is not None and usage.completion_tokens == u.completion_tokens, f"usage chunk {usage}")
print(f"  streamed chat: {len(parts)} chunks, same text, usage {usage.completion_tokens} tokens")

c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
check(c.object == "text_completion" and c.choices[0].text, f"completion {c}")
check(c.usage.completion_tokens == 8 or c.choices[0].finish_reason == "stop", f"completion usage {c.usage}")
streamed = "".join(
    ch.choices[0].text
    for ch in client.completions.create(model=model, prompt=["Once upon a time"], max_tokens=8, temperature=0, stream=True)
    if ch.choices
)
check(streamed == c.choices[0].text, f"streamed completion {streamed!r} == {c.choices[0].text!r}")
print(f"  completion: {c.choices[0].text!r}")

ok = dict(model=model, messages=messages, max_tokens=4)
refused(openai.BadRequestError, "max_tokens", **{**ok, "max_tokens": 0})
refused(openai.BadRequestError, "temperature", **ok, temperature=-1)
refused(openai.BadRequestError, "top_p", **ok, top_p=1.5)
refused(openai.BadRequestError, "n", **ok, n=2)
refused(openai.BadRequestError, "logprobs", **ok, logprobs=True)
refused(openai.BadRequestError, "messages[0].role", **{**ok, "messages": [{"role": "robot", "content": "x"}]})
refused(openai.NotFoundError, "model", **{**ok, "model": "llama-9000b"})

bad = openai.OpenAI(base_url=BASE, api_key="not-a-key", max_retries=0, timeout=30)
try:
    bad.models.list()
    check(False, "a wrong key was accepted")
except openai.AuthenticationError as e:
    check(e.status_code == 401, f"status {e.status_code}")
    print(f"  wrong key refused: {e.status_code}")

print(f"openai_check: ok ({checks} checks)")
