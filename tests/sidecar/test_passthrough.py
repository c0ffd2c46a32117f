"""Through the sidecar, a client gets the runtime's reply: exactly it when it asked for log-probabilities,
and otherwise the same reply without the log-probabilities the sidecar asked for on its behalf. Checked with
the official `openai` client, streamed and not, against the same request sent to the runtime directly
(greedy, so both generate the same tokens), for the built-in server and the real llama-server. `id` and
`created` differ between any two requests, and so do llama.cpp's `timings` (how long this one took)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import MODEL_NAME
from tests.sidecar.conftest import RunningSidecar, Runtime, sidecar_for

PROMPT = "The module provides"
VARYING = ("id", "created", "timings")


@pytest.fixture(params=["builtin", "llamacpp"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Runtime, RunningSidecar]]:
    """A runtime (the built-in server, or llama-server) and the sidecar in front of it."""
    runtime: Runtime = request.getfixturevalue("runtime" if request.param == "builtin" else "llama")
    with sidecar_for(runtime) as sidecar:
        yield runtime, sidecar


def clients(runtime: Runtime, sidecar: RunningSidecar) -> tuple[openai.OpenAI, openai.OpenAI]:
    direct = openai.OpenAI(base_url=f"{runtime.url}/v1", api_key="unused", max_retries=0)
    through = openai.OpenAI(base_url=f"{sidecar.url}/v1", api_key="unused", max_retries=0)
    return direct, through


def without(doc: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in keys}


def raw_json(client: openai.OpenAI, kind: str, **request: Any) -> dict[str, Any]:
    """The reply's JSON as it came over the wire (not the client's model of it)."""
    api = client.completions if kind == "completions" else client.chat.completions
    raw = api.with_raw_response.create(**request)
    return json.loads(raw.http_response.text)


def raw_stream(client: openai.OpenAI, kind: str, **request: Any) -> list[dict[str, Any]]:
    """Every chunk of a streamed reply as it came over the wire, and the client's own parse of each."""
    api = client.completions if kind == "completions" else client.chat.completions
    with api.with_streaming_response.create(stream=True, **request) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


# llama.cpp reuses the KV cache of an earlier request's prompt (`cache_prompt`): the same tokens then get
# log-probabilities that differ in their last digits, and `cached_tokens` differs. Off, a repeated request
# is computed as the first one was (the built-in server ignores the field; its prefix cache is off here).
SAME_EACH_TIME = {"cache_prompt": False}
REQUESTS: dict[str, dict[str, Any]] = {
    "completions": {
        "model": MODEL_NAME,
        "prompt": PROMPT,
        "max_tokens": 12,
        "temperature": 0,
        "extra_body": SAME_EACH_TIME,
    },
    "chat": {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Return a new list of the"}],
        "max_tokens": 12,
        "temperature": 0,
        # The tiny model's chat answers would often end at once: the same length whatever it would rather do
        # (llama.cpp has no min_tokens; both runtimes take ignore_eos).
        "extra_body": {"ignore_eos": True, **SAME_EACH_TIME},
    },
}
ASKED = {"completions": {"logprobs": 2}, "chat": {"logprobs": True, "top_logprobs": 2}}


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_a_client_that_did_not_ask_gets_the_runtimes_reply_without_logprobs(
    pair: tuple[Runtime, RunningSidecar], kind: str
):
    runtime, sidecar = pair
    direct, through = clients(runtime, sidecar)
    expected = raw_json(direct, kind, **REQUESTS[kind])
    got = raw_json(through, kind, **REQUESTS[kind])
    assert without(got, *VARYING) == without(expected, *VARYING)
    assert all(choice.get("logprobs") is None for choice in got["choices"])  # as the runtime answers without them
    # The client's own objects agree too.
    api_direct = direct.completions if kind == "completions" else direct.chat.completions
    api_through = through.completions if kind == "completions" else through.chat.completions
    a = api_direct.create(**REQUESTS[kind]).model_dump()
    b = api_through.create(**REQUESTS[kind]).model_dump()
    assert without(b, *VARYING) == without(a, *VARYING)
    # … while the sidecar measured the generation from the log-probabilities it asked for.
    assert sidecar.metric("slm_request_perplexity_count", sidecar.labels(endpoint=f"/v1/{_path(kind)}")) == 2


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_a_client_that_asked_gets_exactly_the_runtimes_logprobs(pair: tuple[Runtime, RunningSidecar], kind: str):
    runtime, sidecar = pair
    direct, through = clients(runtime, sidecar)
    request = {**REQUESTS[kind], **ASKED[kind]}
    expected = raw_json(direct, kind, **request)
    got = raw_json(through, kind, **request)
    assert without(got, *VARYING) == without(expected, *VARYING)
    logprobs = got["choices"][0]["logprobs"]
    assert logprobs is not None
    if "content" in logprobs:  # the chat shape (llama.cpp answers its completions with it too)
        assert all(len(entry["top_logprobs"]) == 2 for entry in logprobs["content"])
    else:
        assert all(len(entry) == 2 for entry in logprobs["top_logprobs"])


@pytest.mark.parametrize("kind", ["completions", "chat"])
@pytest.mark.parametrize("asked", [False, True])
def test_streams_match_the_runtimes_chunk_for_chunk(pair: tuple[Runtime, RunningSidecar], kind: str, asked: bool):
    runtime, sidecar = pair
    direct, through = clients(runtime, sidecar)
    request = {**REQUESTS[kind], **(ASKED[kind] if asked else {})}
    expected = raw_stream(direct, kind, **request)
    got = raw_stream(through, kind, **request)
    assert len(got) == len(expected) > 2
    assert [without(c, *VARYING) for c in got] == [without(c, *VARYING) for c in expected]
    if not asked:
        assert all(choice.get("logprobs") is None for chunk in got for choice in chunk["choices"])
    # The openai client reads the same text from both.
    api = through.completions if kind == "completions" else through.chat.completions
    pieces = []
    for chunk in api.create(stream=True, **request):
        for choice in chunk.choices:
            pieces.append(choice.text if kind == "completions" else (choice.delta.content or ""))
    expected_text = "".join(
        (c["choices"][0].get("text") if kind == "completions" else c["choices"][0]["delta"].get("content")) or ""
        for c in expected
    )
    assert "".join(pieces) == expected_text


def test_models_pass_through(pair: tuple[Runtime, RunningSidecar]):
    runtime, sidecar = pair
    direct, through = clients(runtime, sidecar)
    assert [m.id for m in through.models.list()] == [m.id for m in direct.models.list()] == [MODEL_NAME]


def test_runtime_errors_keep_their_status_and_body_and_are_counted(runtime: Runtime, sidecar: RunningSidecar):
    request = {**REQUESTS["completions"], "model": "not-served"}
    expected = httpx.post(f"{runtime.url}/v1/completions", json=request, timeout=30)
    got = sidecar.client.post("/v1/completions", json=request)
    assert got.status_code == expected.status_code == 404
    assert got.json() == expected.json()
    _, through = clients(runtime, sidecar)
    with pytest.raises(openai.NotFoundError, match="not-served"):
        through.completions.create(**request)
    errors = sidecar.labels(endpoint="/v1/completions", error="invalid_input")
    assert sidecar.metric("slm_request_errors_total", errors) == 2
    assert sidecar.metric("api_requests_total", {"endpoint": "/v1/completions", "status": "404"}) == 2


def _path(kind: str) -> str:
    return "completions" if kind == "completions" else "chat/completions"
