"""The official `openai` Python SDK through llmtap, against the mock upstream.

The mock's generated Chat Completions answers are specified in testkit/README.md: content
"Hello from the mock upstream." in 4 pieces, usage 11 prompt / 7 completion tokens, model
echoed, id `chatcmpl-mock`, `created` 1700000000.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from helpers import assert_record_matches, split_sdk_kwargs, trace_id_of

MODEL = "gpt-4o"
DEFAULT_CONTENT = "Hello from the mock upstream."
PROMPT_TOKENS = 11
COMPLETION_TOKENS = 7
# gpt-4o list price: $2.50 / 1M input tokens, $10.00 / 1M output tokens.
GPT_4O_COST = PROMPT_TOKENS * 2.5e-6 + COMPLETION_TOKENS * 1e-5

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current local time for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
]


def _messages(text: str = "Say hello.") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assert_reported_usage(record: dict) -> None:
    assert record["input_tokens"] == PROMPT_TOKENS
    assert record["output_tokens"] == COMPLETION_TOKENS
    assert record["usage_source"] == "reported"
    assert record["cost_usd"] == pytest.approx(GPT_4O_COST, rel=1e-12)


# ------------------------------------------------------------------------------------------
# (1) non-streaming chat


def test_chat_non_streaming(openai_client, records):
    raw = openai_client.chat.completions.with_raw_response.create(model=MODEL, messages=_messages())
    trace_id = trace_id_of(raw.headers)
    completion = raw.parse()

    assert completion.id == "chatcmpl-mock"
    assert completion.model == MODEL
    assert completion.choices[0].message.content == DEFAULT_CONTENT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == PROMPT_TOKENS
    assert completion.usage.completion_tokens == COMPLETION_TOKENS

    record = records(trace_id)
    assert record["trace_id"] == trace_id
    assert record["provider"] == "openai"
    assert record["route"] == "openai"
    assert record["operation"] == "chat"
    assert record["method"] == "POST"
    assert record["path"] == "/v1/chat/completions"
    assert record["status"] == 200
    assert record["error_kind"] == ""
    assert record["streamed"] in (False, 0)
    assert record["request_model"] == MODEL
    assert record["response_model"] == MODEL
    assert record["response_id"] == "chatcmpl-mock"
    assert record["finish_reason"] == "stop"
    _assert_reported_usage(record)
    assert record["output_text"] == DEFAULT_CONTENT


# ------------------------------------------------------------------------------------------
# (2) streaming chat without stream_options: llmtap asks upstream for usage, hides it


def test_chat_streaming_without_include_usage(openai_client, records, llmtap, last_upstream_request):
    raw = openai_client.chat.completions.with_raw_response.create(
        model=MODEL, messages=_messages(), stream=True
    )
    trace_id = trace_id_of(raw.headers)
    assert raw.headers.get("content-type", "").startswith("text/event-stream")
    chunks = list(raw.parse())

    # 1 role chunk + 4 content pieces + 1 finish chunk, exactly as without llmtap.
    assert len(chunks) == 6, [c.model_dump() for c in chunks]
    for c in chunks:
        assert c.usage is None, f"client did not ask for usage but got it: {c.model_dump()}"
        assert c.choices, f"client did not ask for usage but got a chunk without choices: {c.model_dump()}"
        assert c.id == "chatcmpl-mock"
        assert c.model == MODEL
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == DEFAULT_CONTENT
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 5 + ["stop"]

    # What went upstream carried include_usage (that is how the record gets real usage) ...
    upstream = json.loads(last_upstream_request()["body"])
    assert upstream.get("stream_options", {}).get("include_usage") is True, upstream

    record = records(trace_id)
    assert record["operation"] == "chat"
    assert record["streamed"] in (True, 1)
    assert record["request_model"] == MODEL
    assert record["finish_reason"] == "stop"
    assert record["output_text"] == DEFAULT_CONTENT
    _assert_reported_usage(record)
    # ... but the stored request body is what the client sent, not the rewrite.
    assert "stream_options" not in json.loads(record["request_body"])


def test_chat_streaming_without_include_usage_is_byte_identical(llmtap, mock):
    """Through llmtap the client receives exactly the bytes the upstream sends it without llmtap."""
    body = json.dumps({"model": MODEL, "messages": _messages(), "stream": True}).encode()
    headers = {
        "content-type": "application/json",
        "authorization": "Bearer sk-test-secret",
        "accept": "text/event-stream",
    }

    def fetch(url: str) -> tuple[int, str, bytes]:
        with httpx.Client(timeout=30, trust_env=False) as http:
            with http.stream("POST", url, content=body, headers=headers) as r:
                data = b"".join(r.iter_raw())
                return r.status_code, r.headers.get("content-type", ""), data

    direct = fetch(f"{mock.url}/v1/chat/completions")
    proxied = fetch(f"{llmtap.url}/v1/chat/completions")

    assert direct[0] == proxied[0] == 200
    assert proxied[1] == direct[1]
    assert b'"usage"' not in direct[2]  # sanity: the direct answer has no usage at all
    assert proxied[2] == direct[2]


# ------------------------------------------------------------------------------------------
# (3) streaming chat with include_usage: the client keeps what it asked for


def test_chat_streaming_with_include_usage(openai_client, records):
    raw = openai_client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=_messages(),
        stream=True,
        stream_options={"include_usage": True},
    )
    trace_id = trace_id_of(raw.headers)
    chunks = list(raw.parse())

    assert len(chunks) == 7, [c.model_dump() for c in chunks]
    *content_chunks, usage_chunk = chunks
    for c in content_chunks:
        assert c.choices
        assert c.usage is None
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == DEFAULT_CONTENT
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens == PROMPT_TOKENS
    assert usage_chunk.usage.completion_tokens == COMPLETION_TOKENS

    record = records(trace_id)
    assert record["streamed"] in (True, 1)
    assert record["finish_reason"] == "stop"
    _assert_reported_usage(record)
    assert json.loads(record["request_body"])["stream_options"] == {"include_usage": True}


# ------------------------------------------------------------------------------------------
# (4) streaming parallel tool calls


def test_chat_streaming_parallel_tool_calls(openai_client, records):
    raw = openai_client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=_messages("What is the weather and the time in Paris?"),
        tools=TOOLS,
        stream=True,
        extra_headers={"x-mock-tool-calls": "get_weather,get_time"},
    )
    trace_id = trace_id_of(raw.headers)

    calls: dict[int, dict[str, str]] = {}
    finish_reasons = []
    for chunk in raw.parse():
        assert chunk.usage is None
        for choice in chunk.choices:
            if choice.finish_reason is not None:
                finish_reasons.append(choice.finish_reason)
            for tc in choice.delta.tool_calls or []:
                acc = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                if tc.id:
                    acc["id"] = tc.id
                if tc.function is not None:
                    acc["name"] += tc.function.name or ""
                    acc["arguments"] += tc.function.arguments or ""

    assert finish_reasons == ["tool_calls"]
    assert [calls[i] for i in sorted(calls)] == [
        {"id": "call_0", "name": "get_weather", "arguments": '{"arg":0}'},
        {"id": "call_1", "name": "get_time", "arguments": '{"arg":1}'},
    ]

    record = records(trace_id)
    assert record["streamed"] in (True, 1)
    assert record["tool_calls"] == ["get_weather", "get_time"]
    assert record["tool_call_args"] == ['{"arg":0}', '{"arg":1}']
    assert record["tools_offered"] == ["get_weather", "get_time"]
    assert record["finish_reason"] == "tool_calls"
    _assert_reported_usage(record)


# ------------------------------------------------------------------------------------------
# (5) Responses API streaming, replayed from a fixture


def test_responses_streaming_fixture(openai_client, records, load_case):
    case = load_case("openai/responses_stream")
    expect = case.expect
    kwargs, extra_body = split_sdk_kwargs(openai_client.responses.create, case.request, drop=("stream",))

    raw = openai_client.responses.with_raw_response.create(
        **kwargs,
        stream=True,
        extra_body=extra_body or None,
        extra_headers={"x-mock-fixture": "openai/responses_stream"},
    )
    trace_id = trace_id_of(raw.headers)

    events = list(raw.parse())
    assert events, "no events parsed"
    types = [e.type for e in events]
    assert "response.completed" in types, types
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == expect["output_text"]
    completed = next(e for e in events if e.type == "response.completed")
    assert completed.response.output_text == expect["output_text"]

    record = records(trace_id)
    for key in ("input_tokens", "output_tokens", "finish_reason", "output_text"):
        assert key in expect, f"case expect block has no {key}"
    assert_record_matches(record, expect)


# ------------------------------------------------------------------------------------------
# (6) metadata headers are recorded and stripped; secrets are never stored


def test_metadata_headers_recorded_and_stripped(openai_client, records, last_upstream_request):
    marker = f"metadata-{uuid.uuid4().hex}"
    raw = openai_client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=_messages(marker),
        extra_headers={
            "x-llmtap-app": "sdk-tests",
            "x-llmtap-user": "user-42",
            "x-llmtap-tag-team": "search",
        },
    )
    trace_id = trace_id_of(raw.headers)
    assert raw.parse().choices[0].message.content == DEFAULT_CONTENT

    upstream = last_upstream_request()
    assert marker in upstream["body"], "mock's last request is not this test's request"
    forwarded = {name.lower(): value for name, value in upstream["headers"].items()}
    leaked = sorted(name for name in forwarded if name.startswith("x-llmtap-"))
    assert not leaked, f"llmtap forwarded its own metadata headers upstream: {leaked}"
    # The credential itself must still reach the upstream.
    assert forwarded.get("authorization") == "Bearer sk-test-secret"

    record = records(trace_id)
    assert record["app"] == "sdk-tests"
    assert record["user_id"] == "user-42"
    assert record["tags"].get("team") == "search", record["tags"]
    assert "sk-test-secret" not in record.raw
    assert "authorization" not in record.raw.lower()
