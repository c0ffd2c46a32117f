"""Fuzzing the contents of the strings, not only the shapes the OpenAPI document allows (test_fuzz):
lone surrogates, NULs and control characters, invalid UTF-8, huge repeats and text that tokenizers
find awkward, in every field of every route that takes text or messages, streamed or not. Each
request gets an answer or a 4xx that says what is wrong — never a 5xx, never an error event in a
stream — and is logged once: its request line, and no other line.

Hypothesis generates the strings (derandomized: a failure reproduces; bounded examples per route).
Bodies are written with JSON escapes (`\\ud800`), as a client would send a lone surrogate; the
invalid UTF-8 cases are raw bytes inside a JSON string.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import MODEL_NAME, serve, settings_for

HOSTILE_PIECES = [
    "\ud800", "\udfff", "\ud83d", "\ude00x", "\x00", "\x00\x00\x00", "\x01\x02\x1b[31m\x7f", "\u202e", "\ufeff",
    "\u200b\u200d", "\ufffd", "\U0010ffff", "\U0001f600", "e\u0301\u0301\u0301", "<|endoftext|>", "<s>", "</s>",
    "\r\n", "\t", " " * 64, "\\", '"', "{{", "{% raw %}", "\u0000<|im_start|>",
]  # fmt: skip

pieces = st.one_of(
    st.sampled_from(HOSTILE_PIECES),
    st.integers(0xD800, 0xDFFF).map(chr),  # every surrogate, alone
    st.text(st.characters(max_codepoint=0x10FFFF, exclude_categories=()), max_size=12),  # controls, Co, Cn …
)
hostile_text = st.one_of(
    st.lists(pieces, min_size=1, max_size=8).map("".join),
    st.builds(
        lambda piece, times: piece * times, st.sampled_from([*HOSTILE_PIECES, "ab", "é"]), st.integers(100, 30_000)
    ),
)

_ids = itertools.count()


def _messages(text: str, as_parts: bool) -> list[dict[str, Any]]:
    content: Any = [{"type": "text", "text": text}] if as_parts else text
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]


def _body(route: str, text: str, variant: int, stream: bool) -> dict[str, Any]:
    """`text` in one of the text fields of `route`'s body."""
    if route == "/generate":
        return [
            {"prompt": text, "max_tokens": 2, "stream": stream},
            {"prompt": "Return the", "max_tokens": 2, "stop": [text[:64] or "x"], "stream": stream},
        ][variant % 2]
    if route == "/v1/completions":
        return [
            {"model": MODEL_NAME, "prompt": text, "max_tokens": 2, "stream": stream},
            {"model": MODEL_NAME, "prompt": [text], "max_tokens": 2, "stream": stream, "user": text[:256]},
        ][variant % 2]
    if route == "/v1/chat/completions":
        tool = {"type": "function", "function": {"name": "f", "description": text[:8192]}}
        return [
            {"model": MODEL_NAME, "messages": _messages(text, False), "max_tokens": 2, "stream": stream},
            {"model": MODEL_NAME, "messages": _messages(text, True), "max_tokens": 2, "stream": stream},
            {"model": MODEL_NAME, "messages": _messages("hi", False), "max_tokens": 2, "stream": stream,
             "tools": [tool], "tool_choice": "none"},
        ][variant % 3]  # fmt: skip
    return [{"prompt": text}, {"messages": _messages(text, variant % 2 == 1)}][variant % 2]


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=True).encode()  # lone surrogates as \\udXXX escapes


@pytest.fixture(scope="module")
def fuzz_server(tiny_engine, tiny_model_dir):
    with serve(tiny_engine, settings_for(tiny_model_dir, max_new_tokens=4)) as srv:
        yield srv


def _check(fuzz_server, json_records, route: str, content: bytes) -> None:
    request_id = f"fuzz-{next(_ids)}"
    headers = {"content-type": "application/json", "x-request-id": request_id}
    r = fuzz_server.client.post(route, content=content, headers=headers)
    assert r.status_code < 500, f"{route} {content[:200]!r} -> {r.status_code}: {r.text[:300]}"
    if r.status_code >= 400:
        message = r.json()["error"]["message"]
        assert message and message != "internal server error", r.text[:300]
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        errors = [json.loads(e)["error"] for e in events[:-1] if "error" in json.loads(e)]
        assert not errors, errors
    lines = [d for d in json_records() if d.get("request_id") == request_id]
    assert [d["event"] for d in lines] == ["request"], lines  # its line, once, and no error line
    assert lines[0]["http.response.status_code"] == r.status_code


ROUTES = ["/generate", "/v1/completions", "/v1/chat/completions", "/tokenize"]


@pytest.mark.parametrize("route", ROUTES)
def test_no_text_gets_a_server_error_and_each_request_is_logged_once(fuzz_server, json_records, route):
    @given(text=hostile_text, variant=st.integers(0, 5), stream=st.booleans())
    @settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    def check(text: str, variant: int, stream: bool) -> None:
        _check(fuzz_server, json_records, route, _encode(_body(route, text, variant, stream)))

    check()


@pytest.mark.parametrize("route", ROUTES)
def test_a_lone_surrogate_is_a_422_that_names_the_field(fuzz_server, json_records, route):
    body = _encode(_body(route, "Hello \ud800 world", 0, False))
    r = fuzz_server.client.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert "surrogate" in error["message"] and "U+D800" in error["message"]
    assert error["param"] in ("prompt", "messages.1.content")


@pytest.mark.parametrize("route", ROUTES)
def test_invalid_utf8_is_a_400_that_says_so(fuzz_server, json_records, route):
    body = _encode(_body(route, "Hello PLACEHOLDER world", 0, False)).replace(b"PLACEHOLDER", b"\xff\xfe\xc3(")
    for stream in (False, True):
        if stream:
            body = body.replace(b'"max_tokens"', b'"stream": true, "max_tokens"')
        _check(fuzz_server, json_records, route, body)
        r = fuzz_server.client.post(route, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert "UTF-8" in r.json()["error"]["message"]
