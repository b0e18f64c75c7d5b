"""The official `anthropic` Python SDK through llmtap, replaying provider fixtures from the mock.

Expected values come from each case's `expect` block (ingest/tests/fixtures/README.md), so the
tests follow the fixtures rather than restating them.
"""

from __future__ import annotations

import json
import warnings

from helpers import assert_record_matches, split_sdk_kwargs, trace_id_of


def _usage_total_input(usage) -> int:
    # llmtap's input_tokens counts cached and cache-written tokens too (DESIGN.md, Records).
    return (
        usage.input_tokens
        + (usage.cache_creation_input_tokens or 0)
        + (usage.cache_read_input_tokens or 0)
    )


def _sdk_call_kwargs(method, request: dict) -> dict:
    kwargs, extra_body = split_sdk_kwargs(method, request, drop=("stream",))
    if extra_body:
        kwargs["extra_body"] = extra_body
    return kwargs


# ------------------------------------------------------------------------------------------
# (1) streaming tool use through client.messages.stream(...)


def test_messages_stream_tool_use_fixture(anthropic_client, records, load_case):
    case = load_case("anthropic/messages_stream_tools")
    expect = case.expect
    kwargs = _sdk_call_kwargs(anthropic_client.messages.stream, case.request)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # an old model name in the fixture is fine
        manager = anthropic_client.messages.stream(
            **kwargs,
            extra_headers={"x-mock-fixture": "anthropic/messages_stream_tools"},
        )
    with manager as stream:
        trace_id = trace_id_of(stream.response.headers)
        final = stream.get_final_message()

    tool_uses = [b for b in final.content if b.type == "tool_use"]
    assert tool_uses, f"final message has no tool_use block: {final.model_dump()}"
    assert [b.name for b in tool_uses] == expect["tool_calls"]
    assert [b.input for b in tool_uses] == [json.loads(a) for a in expect["tool_call_args"]]
    assert final.stop_reason == expect["finish_reason"]
    assert _usage_total_input(final.usage) == expect["input_tokens"]
    assert final.usage.output_tokens == expect["output_tokens"]

    record = records(trace_id)
    for key in (
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "tool_calls",
        "tool_call_args",
        "finish_reason",
        "cost_usd",
    ):
        assert key in expect, f"case expect block has no {key}"
    assert_record_matches(record, expect)
    assert record["operation"] == "messages"
    assert record["provider"] == "anthropic"
    assert record["streamed"] in (True, 1)


# ------------------------------------------------------------------------------------------
# (2) non-streaming messages


def test_messages_non_streaming_fixture(anthropic_client, records, load_case):
    case = load_case("anthropic/messages_json")
    expect = case.expect
    body = json.loads(case.body_bytes())
    kwargs = _sdk_call_kwargs(anthropic_client.messages.create, case.request)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        raw = anthropic_client.messages.with_raw_response.create(
            **kwargs,
            extra_headers={"x-mock-fixture": "anthropic/messages_json"},
        )
    trace_id = trace_id_of(raw.headers)
    message = raw.parse()

    # The SDK parsed exactly what the upstream sent.
    assert message.id == body["id"]
    assert message.model == body["model"]
    assert message.stop_reason == body["stop_reason"]
    assert [b.type for b in message.content] == [b["type"] for b in body["content"]]
    for got, want in zip(message.content, body["content"]):
        if want["type"] == "text":
            assert got.text == want["text"]
    assert message.usage.input_tokens == body["usage"]["input_tokens"]
    assert message.usage.output_tokens == body["usage"]["output_tokens"]

    record = records(trace_id)
    assert_record_matches(record, expect)
    assert record["operation"] == "messages"
    assert record["provider"] == "anthropic"
    assert record["streamed"] in (False, 0)
    assert record["response_id"] == body["id"]
    assert record["finish_reason"] == body["stop_reason"]
