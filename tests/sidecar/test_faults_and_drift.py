"""Fault injection moves to the sidecar behind the built-in server's gate (its admin listener, opt-in,
token), and the drift detector sees garbage outputs through the sidecar."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from slm_server.drift import DriftSettings
from slm_sidecar.settings import SidecarSettings
from tests.server.conftest import MODEL_NAME, REPO_ROOT
from tests.sidecar.conftest import RunningSidecar, Runtime, free_port, sidecar_server, wait_for

PROMPT = "The module provides"
GREEDY = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 12, "min_tokens": 12, "temperature": 0}


def test_fault_settings_need_the_servers_opt_in():
    with pytest.raises(ValueError, match="fault_injection"):
        SidecarSettings(fault_error_rate=0.5)
    with pytest.raises(ValueError, match="SLM_ADMIN_TOKEN"):
        SidecarSettings(fault_admin_api=True, admin_host="0.0.0.0")  # noqa: S104
    with pytest.raises(ValueError, match="SLM_UPSTREAM_URL"):
        SidecarSettings(upstream_url="127.0.0.1:8080")


def test_faults_are_changed_on_the_admin_listener_only_with_the_token(runtime: Runtime):
    admin_port = free_port()
    with sidecar_server(runtime.url, fault_admin_api=True, admin_port=admin_port, admin_token="s3cret") as sidecar:
        admin = f"http://127.0.0.1:{admin_port}/admin/faults"
        wait_for(lambda: _answers(admin), 30, "admin listener")
        assert sidecar.metric("slm_fault_injection_enabled", {"model": MODEL_NAME}) == 1
        assert httpx.post(admin, json={"errorRate": 1.0}, timeout=10).status_code == 401
        assert sidecar.client.post("/admin/faults", json={"errorRate": 1.0}).status_code == 404  # not on the API port
        token = {"authorization": "Bearer s3cret"}
        assert httpx.post(admin, json={"errorRate": 1.0}, headers=token, timeout=10).status_code == 200

        reply = sidecar.client.post("/v1/completions", json=GREEDY)
        assert reply.status_code == 500
        assert reply.json()["error"]["message"] == "generation failed: injected fault (fault_error_rate)"
        labels = sidecar.labels(endpoint="/v1/completions")
        assert sidecar.metric("slm_request_errors_total", {**labels, "error": "model_error"}) == 1

        assert httpx.post(admin, json={"degradedOutput": True}, headers=token, timeout=10).status_code == 200
        degraded = _perplexity(sidecar)
        assert httpx.post(admin, json={}, headers=token, timeout=10).status_code == 200
        normal = _perplexity(sidecar)
        assert degraded > 3 * normal  # the model's own log-probabilities of what was sampled far from it


def test_garbage_outputs_are_detected_as_drift_through_the_sidecar(runtime: Runtime, json_records: Any):
    drift = DriftSettings(
        warmup_requests=0, reference_requests=40, window_requests=30, min_samples=20, check_every_requests=5,
        min_check_interval_seconds=0, enter_checks=2,
    )  # fmt: skip
    admin_port = free_port()
    with sidecar_server(runtime.url, drift=drift, fault_admin_api=True, admin_port=admin_port) as sidecar:
        prompts = ["The module provides", "Return a new list of the", "This function", "The value of"]
        for i in range(40):  # the reference: the model's own sampling
            body = {"model": MODEL_NAME, "prompt": prompts[i % 4], "max_tokens": 12, "seed": i}
            assert sidecar.client.post("/v1/completions", json=body).status_code == 200
        detected = {"model": MODEL_NAME, "signal": "perplexity"}
        assert sidecar.metric("slm_drift_detected", detected) == 0
        admin = f"http://127.0.0.1:{admin_port}/admin/faults"
        assert httpx.post(admin, json={"degradedOutput": True}, timeout=10).status_code == 200
        for i in range(60):
            body = {"model": MODEL_NAME, "prompt": prompts[i % 4], "max_tokens": 12, "seed": 1000 + i}
            assert sidecar.client.post("/v1/completions", json=body).status_code == 200
            if sidecar.metric("slm_drift_detected", detected) == 1:
                break
        assert sidecar.metric("slm_drift_detected", detected) == 1
        event = wait_for(lambda: json_records("drift_detected"), 10)[0]
        assert event["slm.drift.signal"] == "perplexity"


def test_the_entry_point_serves_and_writes_json_lines(runtime: Runtime, tmp_path: Path):
    """`python -m slm_sidecar` as the image runs it: settings from the environment, JSON lines on stdout."""
    port = free_port()
    log = tmp_path / "sidecar.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / p) for p in ("sidecar", "server", ".")),
        "SLM_HOST": "127.0.0.1",
        "SLM_PORT": str(port),
        "SLM_UPSTREAM_URL": runtime.url,
        "SLM_UPSTREAM_HEALTH_PATH": "/readyz",
        "SLM_SERVED_MODEL_NAME": MODEL_NAME,
        "SLM_RUNTIME": "builtin",
    }
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "slm_sidecar"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: process.poll() is not None or _answers(f"{base}/readyz"), 60, "sidecar process")
        assert process.poll() is None, log.read_text()
        assert httpx.post(f"{base}/v1/completions", json=GREEDY, timeout=60).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    startup = [r for r in records if r.get("event") == "startup"]
    assert startup[0]["slm.runtime"] == "builtin"
    assert startup[0]["slm.upstream"] == runtime.url
    request = [r for r in records if r.get("event") == "request" and r["http.route"] == "/v1/completions"]
    assert len(request) == 1
    assert request[0]["gen_ai.usage.output_tokens"] == 12
    assert request[0]["slm.perplexity"] > 1


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.TransportError:
        time.sleep(0.05)
        return False


def _perplexity(sidecar: RunningSidecar) -> float:
    labels = sidecar.labels(endpoint="/v1/completions")
    before_sum = sidecar.metric("slm_request_perplexity_sum", labels)
    before_count = sidecar.metric("slm_request_perplexity_count", labels)
    for seed in range(5):
        assert sidecar.client.post("/v1/completions", json={**GREEDY, "seed": seed}).status_code == 200
    added = sidecar.metric("slm_request_perplexity_count", labels) - before_count
    assert added == 5
    return (sidecar.metric("slm_request_perplexity_sum", labels) - before_sum) / added
