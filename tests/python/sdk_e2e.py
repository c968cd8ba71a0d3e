"""Drives the Caracal gateway with the official OpenAI and Anthropic Python SDKs.

Run by tests/tests/sdk_e2e.rs (with /work/main/.venv/bin/python):

    python tests/python/sdk_e2e.py '<json config>'

Config: {"base_url": "http://127.0.0.1:PORT", "agent_key": "cak_...",
         "openai_model", "anthropic_model", "prompt", "completion_tokens", "stream_tokens",
         "anthropic_tokens", "anthropic_stream_tokens"}

Prints ONE JSON object: for each step either the observed result or
{"error": {"class", "status_code", "code", "type", "message", "body"}}.
The agent key is the SDKs' api_key: OpenAI sends it as `Authorization: Bearer cak_...`,
Anthropic as `x-api-key: cak_...`; the gateway swaps it for the provider key.
"""

import json
import sys
import traceback

import anthropic
import openai


def error_info(e):
    return {
        "error": {
            "class": type(e).__name__,
            "module": type(e).__module__.split(".")[0],
            "status_code": getattr(e, "status_code", None),
            "code": getattr(e, "code", None),
            "type": getattr(e, "type", None),
            "message": str(e),
            "body": getattr(e, "body", None),
        }
    }


def step(results, name, fn):
    try:
        results[name] = fn()
    except Exception as e:  # reported to the Rust test, which asserts on it
        info = error_info(e)
        if not isinstance(e, (openai.APIStatusError, anthropic.APIStatusError)):
            info["error"]["traceback"] = traceback.format_exc()
        results[name] = info


def main():
    cfg = json.loads(sys.argv[1])
    base = cfg["base_url"].rstrip("/")
    key = cfg["agent_key"]
    prompt = cfg["prompt"]
    results = {
        "openai_version": openai.__version__,
        "anthropic_version": anthropic.__version__,
    }

    oai = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=30)
    messages = [{"role": "user", "content": prompt}]

    def chat():
        raw = oai.chat.completions.with_raw_response.create(
            model=cfg["openai_model"],
            messages=messages,
            max_tokens=50,
            extra_headers={"x-mock-completion-tokens": str(cfg["completion_tokens"])},
        )
        c = raw.parse()
        return {
            "status": raw.status_code,
            "content": c.choices[0].message.content,
            "usage": c.usage.model_dump() if c.usage else None,
            "remaining": raw.headers.get("x-caracal-remaining-budget"),
            "reservation": raw.headers.get("x-caracal-reservation-id"),
        }

    def chat_stream():
        # No stream_options: the gateway turns include_usage on by itself.
        stream = oai.chat.completions.create(
            model=cfg["openai_model"],
            messages=messages,
            max_tokens=50,
            stream=True,
            extra_headers={"x-mock-completion-tokens": str(cfg["stream_tokens"])},
        )
        text, usage, chunks = "", None, 0
        for chunk in stream:
            chunks += 1
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
        return {
            "status": stream.response.status_code,
            "text": text,
            "chunks": chunks,
            "usage": usage,
            "remaining": stream.response.headers.get("x-caracal-remaining-budget"),
            "reservation": stream.response.headers.get("x-caracal-reservation-id"),
        }

    def chat_over_budget():
        c = oai.chat.completions.create(
            model=cfg["openai_model"], messages=messages, max_tokens=5000
        )
        return {"unexpected_success": c.model_dump()}

    step(results, "chat", chat)
    step(results, "chat_stream", chat_stream)
    step(results, "chat_over_budget", chat_over_budget)

    ant = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=30)

    def message():
        raw = ant.messages.with_raw_response.create(
            model=cfg["anthropic_model"],
            max_tokens=50,
            messages=messages,
            extra_headers={"x-mock-completion-tokens": str(cfg["anthropic_tokens"])},
        )
        m = raw.parse()
        return {
            "status": raw.status_code,
            "text": "".join(b.text for b in m.content if b.type == "text"),
            "usage": m.usage.model_dump(),
            "remaining": raw.headers.get("x-caracal-remaining-budget"),
            "reservation": raw.headers.get("x-caracal-reservation-id"),
        }

    def message_stream():
        with ant.messages.stream(
            model=cfg["anthropic_model"],
            max_tokens=50,
            messages=messages,
            extra_headers={"x-mock-completion-tokens": str(cfg["anthropic_stream_tokens"])},
        ) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
            headers = s.response.headers
        return {
            "text": text,
            "usage": final.usage.model_dump(),
            "remaining": headers.get("x-caracal-remaining-budget"),
            "reservation": headers.get("x-caracal-reservation-id"),
        }

    def message_over_budget():
        m = ant.messages.create(
            model=cfg["anthropic_model"], max_tokens=5000, messages=messages
        )
        return {"unexpected_success": m.model_dump()}

    step(results, "message", message)
    step(results, "message_stream", message_stream)
    step(results, "message_over_budget", message_over_budget)

    def chat_image():
        # A multi-MiB screenshot as a base64 data URL, as computer-use agents send.
        mib = int(cfg["image_mib"])
        data = "iVBORw0KGgo" * (mib * 1024 * 1024 // 11)
        raw = oai.chat.completions.with_raw_response.create(
            model=cfg["openai_model"],
            messages=[{"role": "user", "content": [
                {"type": "text", "text": prompt},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}},
            ]}],
            max_tokens=20,
            extra_headers={"x-mock-completion-tokens": str(cfg["image_tokens"])},
        )
        c = raw.parse()
        return {
            "status": raw.status_code,
            "image_bytes": len(data),
            "usage": c.usage.model_dump() if c.usage else None,
            "reservation": raw.headers.get("x-caracal-reservation-id"),
        }

    step(results, "chat_image", chat_image)

    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
