"""Helpers shared by the SDK test modules (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
# LLMTAP_FIXTURES_DIR points the suite (and the mock) at another fixtures folder.
FIXTURES = Path(os.environ.get("LLMTAP_FIXTURES_DIR") or REPO / "ingest" / "tests" / "fixtures")

TRACE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
TRACE_HEADER = "x-llmtap-trace-id"


def trace_id_of(headers: Any) -> str:
    """The trace id llmtap put on a response (any mapping-like headers object)."""
    trace_id = headers.get(TRACE_HEADER)
    assert trace_id, f"response has no {TRACE_HEADER} header: {dict(headers)}"
    assert TRACE_ID_RE.match(trace_id), f"{TRACE_HEADER} is not 32 lowercase hex: {trace_id!r}"
    return trace_id


@dataclass
class Case:
    name: str  # provider/case
    path: Path
    data: dict[str, Any]

    @property
    def request(self) -> dict[str, Any]:
        return self.data["request"]

    @property
    def expect(self) -> dict[str, Any]:
        return self.data["expect"]

    def body_bytes(self) -> bytes:
        return (self.path.parent / self.data["response"]["body_file"]).read_bytes()


def load_case_file(name: str) -> Case:
    path = FIXTURES / f"{name}.case.json"
    if not path.is_file():
        pytest.fail(f"fixture case {path} does not exist (yet)", pytrace=False)
    return Case(name=name, path=path, data=json.loads(path.read_text()))


def split_sdk_kwargs(method: Callable[..., Any], request: dict[str, Any], drop: tuple[str, ...] = ()):
    """Split a JSON request body into the SDK method's keyword arguments and `extra_body`."""
    params = set(inspect.signature(method).parameters) - {
        "extra_headers",
        "extra_query",
        "extra_body",
        "timeout",
        "output_format",  # a Python type in the SDK's stream helper, not a JSON value
    }
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for k, v in request.items():
        if k in drop:
            continue
        (kwargs if k in params else extra)[k] = v
    return kwargs, extra


# Columns whose expected value depends on how the fixture author serialised the request,
# not on what the SDK sends: compared loosely or not at all.
_SERIALISATION_DEPENDENT = {"request_bytes"}


def assert_record_matches(record: dict[str, Any], expect: dict[str, Any]) -> None:
    """Every column of a case's `expect` block must be in the record with that value."""
    problems = []
    for key, want in expect.items():
        if key in _SERIALISATION_DEPENDENT:
            continue
        if key not in record:
            problems.append(f"{key}: missing (want {want!r})")
            continue
        got = record[key]
        if key == "request_body" and isinstance(want, str) and isinstance(got, str):
            try:
                ok = json.loads(got) == json.loads(want)
            except ValueError:
                ok = got == want
        elif isinstance(want, float) or key == "cost_usd":
            ok = (
                isinstance(got, (int, float))
                and not isinstance(got, bool)
                and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-15)
            )
        else:
            ok = got == want
        if not ok:
            problems.append(f"{key}: got {got!r}, want {want!r}")
    assert not problems, "record differs from the case's expect block:\n  " + "\n  ".join(problems)
