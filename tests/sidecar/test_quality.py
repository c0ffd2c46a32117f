"""What the sidecar measures from the runtime's replies: the request line, slm_request_perplexity (compared
with the runtime's own log-probabilities), output length, finish reasons, and the seed's /generate."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest

from tests.server.conftest import MODEL_NAME
from tests.sidecar.conftest import RunningSidecar, Runtime, wait_for

PROMPT = "The module provides"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def runtime_logprobs(runtime: Runtime, path: str, body: dict[str, Any]) -> tuple[list[float], dict[str, Any]]:
    """The runtime's own log-probabilities of the tokens it generates for `body` (greedy)."""
    if path == "/v1/chat/completions":
        reply = httpx.post(f"{runtime.url}{path}", json={**body, "logprobs": True}, timeout=60).json()
        values = [entry["logprob"] for entry in reply["choices"][0]["logprobs"]["content"]]
    else:
        reply = httpx.post(f"{runtime.url}{path}", json={**body, "logprobs": 0}, timeout=60).json()
        values = reply["choices"][0]["logprobs"]["token_logprobs"]
    return values, reply


def request_lines(records: Any) -> list[dict[str, Any]]:
    return [r for r in records("request") if r.get("http.route") != "/readyz"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_perplexity_and_request_line_come_from_the_runtimes_logprobs(
    runtime: Runtime, sidecar: RunningSidecar, json_records: Any, path: str, stream: bool
):
    if path == "/v1/chat/completions":
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "Return a new list"}]}
    else:
        body = {"prompt": PROMPT}
    body = {**body, "model": MODEL_NAME, "max_tokens": 10, "min_tokens": 10, "temperature": 0}  # ends by length
    values, direct = runtime_logprobs(runtime, path, body)
    expected = math.exp(-sum(values) / len(values))
    headers = {"traceparent": TRACEPARENT, "x-request-id": "req-quality-1"}
    if stream:
        with sidecar.client.stream("POST", path, json={**body, "stream": True}, headers=headers) as reply:
            assert reply.status_code == 200
            assert reply.headers["x-request-id"] == "req-quality-1"
            text = "".join(reply.iter_text())
        assert text.rstrip().endswith("data: [DONE]")
    else:
        reply = sidecar.client.post(path, json=body, headers=headers)
        assert reply.status_code == 200
        assert reply.headers["x-request-id"] == "req-quality-1"
    labels = sidecar.labels(endpoint=path)
    assert sidecar.metric("slm_request_perplexity_count", labels) == 1
    assert sidecar.metric("slm_request_perplexity_sum", labels) == pytest.approx(expected, rel=1e-6)
    assert sidecar.metric("slm_request_output_tokens_sum", labels) == len(values)
    assert sidecar.metric("slm_generation_tokens_total", labels) == len(values)
    assert sidecar.metric("slm_request_finish_total", {**labels, "finish_reason": "length"}) == 1
    if stream:  # the tokens' arrival, as the client saw it
        assert sidecar.metric("slm_time_to_first_token_seconds_count", labels) == 1
        assert sidecar.metric("slm_inter_token_latency_seconds_count", labels) == len(values) - 1
    else:
        assert sidecar.metric("slm_prompt_tokens_total", labels) == direct["usage"]["prompt_tokens"]

    line = wait_for(lambda: [r for r in request_lines(json_records) if r.get("http.route") == path], 10, "line")[0]
    assert line["request_id"] == "req-quality-1"
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert line["span_id"] == "00f067aa0ba902b7"
    assert line["http.response.status_code"] == 200
    assert line["gen_ai.request.model"] == MODEL_NAME
    assert line["gen_ai.operation.name"] == ("chat" if "chat" in path else "text_completion")
    assert line["gen_ai.request.max_tokens"] == 10
    assert line["gen_ai.request.temperature"] == 0
    assert line["gen_ai.usage.output_tokens"] == len(values)
    assert line["gen_ai.response.finish_reasons"] == ["length"]
    assert line["slm.stream"] is stream
    assert line["slm.perplexity"] == pytest.approx(expected, rel=1e-6)
    # The default output policy: the text's length and its HMAC under the configured key, never the text.
    assert "gen_ai.output.text" not in line
    assert len(line["gen_ai.output.hmac_sha256"]) == 64


def test_the_output_policy_is_the_servers(runtime: Runtime, json_records: Any):
    from tests.sidecar.conftest import sidecar_server

    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    text = httpx.post(f"{runtime.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    for policy, expected in (("full", text), ("truncated", text[:5]), ("none", None)):
        with sidecar_server(runtime.url, log_outputs=policy, log_truncate_chars=5) as sidecar:
            assert sidecar.client.post("/v1/completions", json=body).status_code == 200
            line = wait_for(lambda: request_lines(json_records), 10, "line")[-1]
            assert line.get("gen_ai.output.text") == expected, policy
            if policy == "none":
                assert "gen_ai.output.length" not in line
            else:
                assert line["gen_ai.output.length"] == len(text)


def test_generate_is_translated_with_the_servers_response(runtime: Runtime, sidecar: RunningSidecar):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    direct = httpx.post(f"{runtime.url}/generate", json=body, timeout=60).json()
    got = sidecar.client.post("/generate", json=body)
    assert got.status_code == 200, got.text
    reply = got.json()
    assert reply["id"] == got.headers["x-request-id"]
    for key in ("model", "text", "finish_reason", "prompt_tokens", "output_tokens"):
        assert reply[key] == direct[key], key
    assert reply["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-5)
    labels = sidecar.labels(endpoint="/generate")
    assert sidecar.metric("slm_request_perplexity_sum", labels) == pytest.approx(direct["perplexity"], rel=1e-5)

    with sidecar.client.stream("POST", "/generate", json={**body, "stream": True}) as streamed:
        events = [line.removeprefix("data: ") for line in streamed.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json

    docs = [json.loads(e) for e in events[:-1]]
    assert "".join(d["text"] for d in docs[:-1]) == direct["text"]
    assert docs[-1]["text"] == direct["text"]
    assert docs[-1]["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-5)
    assert docs[-1]["time_to_first_token_seconds"] > 0

    # The server's own checks, the same 422 naming the field.
    bad = sidecar.client.post("/generate", json={"prompt": PROMPT, "max_tokens": "many"})
    assert bad.status_code == 422
    assert bad.json()["error"]["param"] == "max_tokens"
    errors = sidecar.labels(endpoint="/generate", error="invalid_input")
    assert sidecar.metric("slm_request_errors_total", errors) == 1


def test_unknown_routes_and_methods_are_refused(sidecar: RunningSidecar):
    assert sidecar.client.get("/v1/embeddings").status_code == 404
    assert sidecar.client.get("/v1/completions").status_code == 405
    assert sidecar.client.get("/healthz").json() == {"status": "ok"}
    assert sidecar.client.get("/readyz").json() == {"status": "ready", "model": MODEL_NAME}
    text = sidecar.client.get("/metrics").text
    assert 'api_requests_total{endpoint="other",status="404"} 1.0' in text
    assert (
        f'slm_model_info{{device="builtin",dtype="auto",max_context="256",model="{MODEL_NAME}",source=""}} 1.0' in text
    )


# Engine series the runtime's own metrics give for a third-party runtime (issue 24's mapping), not the sidecar.
ENGINE_ONLY = ("slm_batch_size", "slm_forward_pass", "slm_kv_cache", "slm_prefix_cache", "slm_filesystem", "nvidia_")


def test_the_sidecar_exposes_the_servers_slm_contract(runtime: Runtime, sidecar: RunningSidecar):
    """Every slm_* family of the built-in server (but the engine's own) is the sidecar's too, with the same
    type and label names: the panels and alerts read the same series from either."""
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4}
    assert sidecar.client.post("/v1/completions", json=body).status_code == 200  # reaches the runtime too

    def families(registry: Any) -> dict[str, tuple[str, frozenset[str]]]:
        found = {}
        for family in registry.collect():
            if family.name.startswith(("slm_", "api_", "model_")):
                labels = frozenset(k for sample in family.samples for k in sample.labels if k != "le")
                found[family.name] = (family.type, labels)
        return found

    server = families(runtime.registry)
    mine = families(sidecar.app.registry)
    expected = {name: shape for name, shape in server.items() if not name.startswith(ENGINE_ONLY)}
    assert len(expected) >= 25
    assert {name: mine.get(name) for name in expected} == expected
