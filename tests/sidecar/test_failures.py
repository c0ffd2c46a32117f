"""When things go wrong: a client that goes away stops the runtime's work; a runtime that is down, slow,
breaks off a stream, gives no log-probabilities or refuses them; each ends in the right status, counted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import MODEL_NAME
from tests.sidecar.conftest import (
    RunningSidecar,
    Runtime,
    fake_runtime,
    free_port,
    json_runtime,
    runtime_server,
    sidecar_server,
    wait_for,
)

LONG = {"model": MODEL_NAME, "prompt": "Return a new list of the", "max_tokens": 200, "min_tokens": 200}


def test_a_runtime_that_is_down_gets_503_and_is_counted(json_records: Any):
    with sidecar_server(f"http://127.0.0.1:{free_port()}") as sidecar:
        ready = sidecar.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "runtime not ready"
        reply = sidecar.client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x"})
        assert reply.status_code == 503
        assert reply.headers["retry-after"] == "5"
        assert "is not answering" in reply.json()["error"]["message"]
        labels = sidecar.labels(endpoint="/v1/completions")
        assert sidecar.metric("slm_request_errors_total", {**labels, "error": "not_ready"}) == 1
        line = wait_for(lambda: [r for r in json_records("request") if r["http.route"] == "/v1/completions"], 10)[0]
        assert line["http.response.status_code"] == 503
        assert line["error.type"] == "not_ready"
        assert line["level"] == "error"


def test_a_slow_runtime_gets_504_and_its_generation_stops(runtime_engine: Any, tiny_model_dir: Path):
    with (
        runtime_server(runtime_engine, tiny_model_dir, fault_injection=True, fault_latency_seconds=30) as slow,
        sidecar_server(slow.url, request_timeout_seconds=1) as sidecar,
    ):
        reply = sidecar.client.post("/v1/completions", json={**LONG, "max_tokens": 4, "min_tokens": 0})
        assert reply.status_code == 504
        assert reply.json()["error"]["type"] == "timeout_error"
        labels = sidecar.labels(endpoint="/v1/completions")
        assert sidecar.metric("slm_request_errors_total", {**labels, "error": "timeout"}) == 1
        assert sidecar.metric("slm_request_finish_total", {**labels, "finish_reason": "timeout"}) == 1
        # The runtime learnt it: its generation ended as aborted, not after its 30 s.
        wait_for(lambda: slow.metric("slm_request_finish_total", {**labels, "finish_reason": "abort"}) == 1, 20)


def test_a_client_that_goes_away_stops_the_runtimes_generation(runtime_engine: Any, tiny_model_dir: Path):
    """Unstreamed: the client gives up while the runtime works (its injected latency); the runtime's
    generation is aborted at once, which it can only learn from the sidecar closing its connection."""
    with (
        runtime_server(runtime_engine, tiny_model_dir, fault_injection=True, fault_latency_seconds=30) as slow,
        sidecar_server(slow.url) as sidecar,
    ):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{sidecar.url}/v1/completions", json={**LONG, "max_tokens": 4, "min_tokens": 0}, timeout=1)
        labels = sidecar.labels(endpoint="/v1/completions")
        wait_for(lambda: slow.metric("slm_request_finish_total", {**labels, "finish_reason": "abort"}) == 1, 20)
        wait_for(lambda: sidecar.metric("slm_request_finish_total", {**labels, "finish_reason": "abort"}) == 1, 10)
        assert sidecar.metric("api_requests_total", {"endpoint": "/v1/completions", "status": "499"}) == 1


def test_a_stream_the_client_leaves_stops_the_runtime(runtime: Runtime, sidecar: RunningSidecar):
    labels = sidecar.labels(endpoint="/v1/completions")
    with httpx.stream("POST", f"{sidecar.url}/v1/completions", json={**LONG, "stream": True}, timeout=60) as reply:
        lines = reply.iter_lines()
        first = [next(lines) for _ in range(4)]
    assert any(line.startswith("data: ") for line in first)
    wait_for(lambda: runtime.metric("slm_request_finish_total", {**labels, "finish_reason": "abort"}) >= 1, 30)
    wait_for(lambda: sidecar.metric("slm_request_finish_total", {**labels, "finish_reason": "abort"}) == 1, 10)
    assert runtime.metric("slm_request_finish_total", {**labels, "finish_reason": "length"}) == 0


# --- runtimes that misbehave, played by an httpx transport ----------------------------------------------------------
def _completion(text: str, logprobs: Any = None, finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": MODEL_NAME,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }


def test_a_runtime_without_logprobs_leaves_perplexity_absent_and_says_why_once(json_records: Any):
    seen: list[dict[str, Any]] = []

    def handler(body: dict[str, Any]) -> tuple[int, Any]:
        seen.append(body)
        return 200, _completion("one two three four five")  # logprobs ignored

    with fake_runtime(json_runtime(handler)) as url, sidecar_server(url) as sidecar:
        for _ in range(3):
            reply = sidecar.client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x"})
            assert reply.status_code == 200
            assert reply.json() == _completion("one two three four five")
        assert seen[0]["logprobs"] == 1  # asked for
        labels = sidecar.labels(endpoint="/v1/completions")
        assert sidecar.metric("slm_request_perplexity_count", labels) == 0
        assert sidecar.metric("slm_request_output_tokens_sum", labels) == 15  # from the runtime's usage
        assert sidecar.metric("slm_request_finish_total", {**labels, "finish_reason": "stop"}) == 3
        events = wait_for(lambda: json_records("perplexity_unavailable"), 10)
        lines = wait_for(lambda: len(json_records("request")) >= 3 and json_records("request"), 10)
    assert len(events) == 1
    assert "no logprobs" in events[0]["reason"]
    assert all(line["slm.perplexity"] is None for line in lines)
    assert all(line["gen_ai.usage.output_tokens"] == 5 for line in lines)


def test_a_runtime_that_refuses_logprobs_is_asked_again_without(json_records: Any):
    bodies: list[dict[str, Any]] = []

    def handler(body: dict[str, Any]) -> tuple[int, Any]:
        bodies.append(body)
        if "logprobs" in body:
            return 400, {"error": {"message": "logprobs is not supported", "code": 400}}
        return 200, _completion("fine")

    with fake_runtime(json_runtime(handler)) as url, sidecar_server(url) as sidecar:
        for _ in range(2):
            reply = sidecar.client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x"})
            assert reply.status_code == 200, reply.text
            assert reply.json() == _completion("fine")
        # Once refused, not asked again.
        assert ["logprobs" in body for body in bodies] == [True, False, False]
        errors = sidecar.labels(endpoint="/v1/completions", error="invalid_input")
        assert sidecar.metric("slm_request_errors_total", errors) == 0
        events = wait_for(lambda: json_records("perplexity_unavailable"), 10)
    assert "logprobs is not supported" in events[0]["reason"]


def test_a_stream_the_runtime_breaks_off_ends_in_an_error_event():
    async def breaking(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        doc = {"id": "c", "object": "text_completion", "model": MODEL_NAME,
               "choices": [{"index": 0, "text": "a", "logprobs": {"tokens": ["a"], "token_logprobs": [-1.0]},
                            "finish_reason": None}]}  # fmt: skip
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send(
            {"type": "http.response.body", "body": b"data: " + json.dumps(doc).encode() + b"\n\n", "more_body": True}
        )
        raise RuntimeError("the runtime crashed")  # uvicorn drops the connection mid-response

    with fake_runtime(breaking) as url, sidecar_server(url) as sidecar:
        body = {"model": MODEL_NAME, "prompt": "x", "stream": True}
        with sidecar.client.stream("POST", "/v1/completions", json=body) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert events[0]["choices"][0]["text"] == "a"
        assert events[0]["choices"][0]["logprobs"] is None  # what the sidecar added, taken out
        assert events[-1]["error"]["code"] == 502
        labels = sidecar.labels(endpoint="/v1/completions")
        assert sidecar.metric("slm_request_errors_total", {**labels, "error": "model_error"}) == 1
        assert sidecar.metric("slm_request_finish_total", {**labels, "finish_reason": "error"}) == 1


def test_idle_connections_to_the_runtime_are_reused(runtime: Runtime, sidecar: RunningSidecar):
    body = {"model": MODEL_NAME, "prompt": "The module", "max_tokens": 2}
    for _ in range(5):
        assert sidecar.client.post("/v1/completions", json=body).status_code == 200
    assert sidecar.app.upstream.opened == 1
