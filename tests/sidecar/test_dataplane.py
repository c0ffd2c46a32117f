"""The sidecar on the data plane, in front of the real `llama-server` and of the built-in server
(slm_devtools.sidecarplane): each its own process on 127.0.0.1, the sidecar with the environment the
operator renders for its container, the real Prometheus scraping it every second with the pod's target
labels and evaluating the chart's shared rules and the deployment's drift rules (short windows), the real
Alertmanager delivering to a loopback webhook. Nothing is mocked.

What a user sees: the request line of each request (trace ids, token counts, the output hashed under the
deployment's key), the request's perplexity equal to the one the runtime's own log-probabilities give, and
garbage outputs firing SLMPerplexityDrift, notified by Alertmanager.
"""

from __future__ import annotations

import hmac
import json
import math
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from slm_devtools.dataplane import wait_until
from slm_devtools.gguf import ensure_tiny_gguf
from slm_devtools.sidecarplane import SidecarPlane
from slm_devtools.tinymodel import ensure_tiny_model
from tests.server.test_logging import REQUEST_FIELDS, TRACE_ID, TRACEPARENT

pytestmark = [pytest.mark.dataplane, pytest.mark.slow]

NAME, NAMESPACE, MODEL = "phi", "llm", "tiny"
HASH_KEY = "sidecar-dataplane-key"
# A 10 s mean against 1 m of history (so the history guard is met after ~30 s), firing at once.
ALERTS = {"perplexityDrift": {"window": "10s", "baselineWindow": "1m", "for": "0s", "zScore": 3}}
PROMPT = "The module provides"
# Twelve tokens whatever the model would rather do (both runtimes take `ignore_eos`), each request computed
# as the first one was: llama.cpp's reuse of an earlier prompt's KV cache (`cache_prompt`) changes the last
# digits of the log-probabilities (the built-in server ignores the field).
GREEDY = {
    "model": MODEL,
    "prompt": PROMPT,
    "max_tokens": 12,
    "temperature": 0,
    "ignore_eos": True,
    "cache_prompt": False,
}


@pytest.fixture(scope="module", params=["llamacpp", "builtin"])
def plane(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarPlane]:
    runtime = request.param
    model = ensure_tiny_gguf(log=lambda *_: None) if runtime == "llamacpp" else ensure_tiny_model(log=lambda *_: None)
    running = SidecarPlane(runtime, model, tmp_path_factory.mktemp(f"sidecar-{runtime}"), name=NAME,
                           namespace=NAMESPACE, served_model_name=MODEL, alerts=ALERTS,
                           secrets={"SLM_OUTPUT_HASH_KEY": HASH_KEY}).start()  # fmt: skip
    try:
        yield running
    finally:
        running.stop()


def sidecar_url(plane: SidecarPlane) -> str:
    assert plane.sidecar is not None
    return plane.sidecar.url


def request_line(plane: SidecarPlane, request_id: str) -> dict[str, Any]:
    assert plane.sidecar is not None
    sidecar = plane.sidecar

    def found() -> list[dict[str, Any]]:
        return [r for r in sidecar.records() if r.get("event") == "request" and r.get("request_id") == request_id]

    (line,) = wait_until(found, timeout=10, interval=0.05, what=f"the request line of {request_id}")
    return line


def histogram(plane: SidecarPlane, name: str, endpoint: str) -> tuple[float, float]:
    """(sum, count) of one of the sidecar's histograms, from its /metrics as Prometheus reads it."""
    assert plane.sidecar is not None
    values = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(plane.sidecar.metrics_text()):
        for sample in family.samples:
            if sample.labels.get("endpoint") != endpoint:
                continue
            for suffix in values:
                if sample.name == f"{name}_{suffix}":
                    values[suffix] += sample.value
    return values["sum"], values["count"]


def runtime_logprobs(choice: dict[str, Any]) -> list[float]:
    """The sampled tokens' log-probabilities in a runtime's completion choice: OpenAI's legacy shape
    (the built-in server) or the chat shape (llama.cpp answers /v1/completions with it)."""
    logprobs = choice["logprobs"]
    if "content" in logprobs:
        return [entry["logprob"] for entry in logprobs["content"]]
    return list(logprobs["token_logprobs"])


# What the sidecar cannot time in an unstreamed reply (it sees the whole reply at once): left out.
STREAM_ONLY = {"gen_ai.server.time_to_first_token", "gen_ai.server.time_per_output_token"}


@pytest.mark.parametrize("stream", [False, True], ids=["unstreamed", "streamed"])
def test_each_request_writes_its_json_line(plane: SidecarPlane, stream: bool) -> None:
    request_id = f"req-{uuid.uuid4().hex[:12]}"
    headers = {"traceparent": TRACEPARENT, "x-request-id": request_id}
    body = {**GREEDY, "stream": True, "stream_options": {"include_usage": True}} if stream else GREEDY
    with httpx.stream("POST", f"{sidecar_url(plane)}/v1/completions", json=body, headers=headers, timeout=60) as reply:
        assert reply.status_code == 200, reply.read()
        assert reply.headers["x-request-id"] == request_id
        raw = reply.read().decode()
    if stream:
        chunks = [json.loads(e.removeprefix("data: ")) for e in raw.split("\n\n") if e.startswith("data: {")]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        usage = next(c["usage"] for c in chunks if c.get("usage"))
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    else:
        doc = json.loads(raw)
        text, usage, finish = doc["choices"][0]["text"], doc["usage"], [doc["choices"][0]["finish_reason"]]
    line = request_line(plane, request_id)
    expected_fields = REQUEST_FIELDS if stream else REQUEST_FIELDS - STREAM_ONLY
    assert set(line) >= expected_fields, expected_fields - set(line)
    assert line["trace_id"] == TRACE_ID
    assert line["http.route"] == "/v1/completions" and line["http.response.status_code"] == 200
    assert line["slm.stream"] is stream
    assert line["gen_ai.request.model"] == MODEL and line["gen_ai.request.max_tokens"] == 12
    assert line["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 12
    assert line["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert line["gen_ai.response.finish_reasons"] == finish == ["length"]
    # The output policy the operator renders by default: hashed under the deployment's key, never the text.
    assert line["gen_ai.output.hmac_sha256"] == hmac.new(HASH_KEY.encode(), text.encode(), "sha256").hexdigest()
    assert line["gen_ai.output.length"] == len(text)
    assert "gen_ai.output.text" not in line
    assert line["slm.perplexity"] > 1
    if stream:
        assert 0 < line["gen_ai.server.time_to_first_token"] <= line["latency_s"]


def test_perplexity_is_the_one_the_runtimes_own_logprobs_give(plane: SidecarPlane) -> None:
    """The same greedy request: to the runtime directly asking for log-probabilities, and through the
    sidecar without: the sidecar's perplexity (request line and histogram) is exp(-mean) of the runtime's."""
    direct = httpx.post(f"{plane.runtime_url}/v1/completions", json={**GREEDY, "logprobs": 1}, timeout=60).json()
    logprobs = runtime_logprobs(direct["choices"][0])
    assert len(logprobs) == 12
    expected = math.exp(-sum(logprobs) / len(logprobs))

    before = histogram(plane, "slm_request_perplexity", "/v1/completions")
    request_id = f"req-{uuid.uuid4().hex[:12]}"
    reply = httpx.post(f"{sidecar_url(plane)}/v1/completions", json=GREEDY, headers={"x-request-id": request_id},
                       timeout=60)  # fmt: skip
    through = reply.json()
    assert through["choices"][0]["text"] == direct["choices"][0]["text"]
    assert through["choices"][0].get("logprobs") is None  # the client did not ask for them
    assert request_line(plane, request_id)["slm.perplexity"] == pytest.approx(expected, rel=1e-6)
    after = histogram(plane, "slm_request_perplexity", "/v1/completions")
    assert after[1] - before[1] == 1
    assert after[0] - before[0] == pytest.approx(expected, rel=1e-6)


def test_garbage_outputs_fire_the_perplexity_drift_alert_and_alertmanager_notifies(plane: SidecarPlane) -> None:
    """Last: loads the plane. The model's own sampling sets the baseline; the sidecar's degraded-output
    fault (its admin listener) makes the outputs garbage; the project's drift rules fire on the sidecar's
    series and Alertmanager's webhook receives the alert with the pod's labels."""
    assert plane.prometheus is not None and plane.sink is not None and plane.sidecar is not None
    prometheus, sink, sidecar = plane.prometheus.api, plane.sink, plane.sidecar
    sel = plane.selector()
    plane.start_load({"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "ignore_eos": True}, rate=4)
    try:
        wait_until(
            lambda: prometheus.query(f"slm:request_perplexity_sum:pod_total{{{sel}}}"),
            timeout=60,
            interval=0.5,
            what="the shared rules recording the sidecar's perplexity "
            f"(slm:request_perplexity_sum:pod_total of container {plane.target_labels()['container']!r})",
        )
        zscore = f"abs(slm:request_perplexity:zscore10s{{{sel}}})"
        # A settled baseline first (the history guard met, no drift now).
        wait_until(lambda: prometheus.query(f"{zscore} < 2"), timeout=150, interval=0.5, what="a settled z-score")
        before = float(prometheus.query(f"slm:request_perplexity:mean10s{{{sel}}}")[0]["value"][1])
        sidecar.set_faults(degradedOutput=True)
        firing = f'ALERTS{{alertname="SLMPerplexityDrift",alertstate="firing",{sel}}}'
        (fired,) = wait_until(lambda: prometheus.query(firing), timeout=90, interval=0.5,
                              what="SLMPerplexityDrift firing")  # fmt: skip

        def degraded_mean() -> float | None:
            # The 10 s mean at the moment the alert fires can still hold outputs from before the fault.
            result = prometheus.query(f"slm:request_perplexity:mean10s{{{sel}}}")
            value = float(result[0]["value"][1]) if result else 0.0
            return value if value > 2 * before else None

        after = wait_until(degraded_mean, timeout=60, interval=0.5,
                           what="the mean perplexity of the garbage outputs at twice the baseline's")  # fmt: skip

        def notified(received: Any) -> bool:
            return received.path == "/hook" and any(
                alert["labels"].get("alertname") == "SLMPerplexityDrift" and alert["status"] == "firing"
                for alert in received.body.get("alerts", [])
            )

        hook = sink.wait_for(notified, timeout=60, what="the SLMPerplexityDrift notification")
    finally:
        sidecar.set_faults()
        load = plane.load
        plane.stop_load()
    assert after > 2 * before
    assert fired["metric"]["model"] == MODEL
    (alert,) = [a for a in hook.body["alerts"] if a["labels"]["alertname"] == "SLMPerplexityDrift"]
    assert alert["labels"]["namespace"] == NAMESPACE and alert["labels"]["job"] == NAME
    assert alert["labels"]["model"] == MODEL
    assert f"{NAMESPACE}/{NAME}" in alert["annotations"]["summary"]
    assert load is not None and load.sent > 0 and load.failed == 0
