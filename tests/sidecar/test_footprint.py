"""The sidecar's memory: the drift detector's KS test runs without scipy (whose stats module alone is ~80 MiB
resident, more than the rest of the sidecar), with scipy's p-values, so the sidecar stays within its
100 MiB goal after drift is detected."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from scipy import stats

from slm_server.drift import DistributionDetector, DriftSettings
from tests.server.conftest import MODEL_NAME, REPO_ROOT
from tests.sidecar.conftest import Runtime, free_port, wait_for

RSS_GOAL_MIB = 100


def evidence(reference: np.ndarray, window: np.ndarray) -> dict:
    settings = DriftSettings(warmup_requests=0, reference_requests=reference.size, window_requests=window.size,
                             min_samples=5, enter_checks=1)  # fmt: skip
    detector = DistributionDetector("perplexity", settings)
    detector.set_reference(reference.tolist())
    for value in window:
        detector.add(float(value))
    ev = detector.check()
    assert ev.alarm, ev
    return ev.details


@pytest.mark.parametrize(("n", "m"), [(40, 30), (100, 100), (1000, 300), (200, 1000)])
@pytest.mark.parametrize("shift", [0.7, 1.5, 4.0])
def test_the_ks_p_value_of_an_alarm_is_scipys(n: int, m: int, shift: float):
    """Where the test alarms (p below ks_pvalue, 1e-6), the p-value is scipy.stats.ks_2samp's (asymptotic)."""
    rng = np.random.default_rng(n * m)
    reference = rng.lognormal(1.0, 0.4, n)
    window = rng.lognormal(1.0 + shift, 0.4, m)
    details = evidence(reference, window)
    expected = stats.ks_2samp(reference, window, method="asymp")
    assert details["ks_statistic"] == pytest.approx(expected.statistic, abs=1e-5)
    assert details["p_value"] == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize(("n", "m"), [(40, 30), (100, 100), (120, 60), (1000, 300)])
@pytest.mark.parametrize("shift", [0.05, 0.15, 0.3])
def test_the_ks_p_value_of_a_weaker_shift_is_scipys_too(n: int, m: int, shift: float):
    """Where the p-value is far above the alarm level (the evidence of a check that changed the state: a
    mean shift, or a drift clearing), it still is scipy's, to 1e-5 (scipy approximates some large samples
    where this computes exactly)."""
    rng = np.random.default_rng(n + m)
    reference = rng.normal(10, 1, n)
    window = np.concatenate([rng.normal(10 + shift, 1, m - m // 5), rng.normal(30, 1, m // 5)])  # a minority strange
    details = evidence(reference, window)
    expected = stats.ks_2samp(reference, window, method="asymp")
    assert details["p_value"] == pytest.approx(expected.pvalue, abs=1e-5)


def test_the_sidecar_stays_under_100_mib_once_it_detected_drift(runtime: Runtime, tmp_path: Path):
    """`python -m slm_sidecar` as the image runs it, with a small drift reference: degraded outputs make it
    detect drift (its KS test ran), and its resident memory stays within the goal."""
    port, admin_port = free_port(), free_port()
    log = tmp_path / "sidecar.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / p) for p in ("sidecar", "server", ".")),
        "SLM_HOST": "127.0.0.1", "SLM_PORT": str(port), "SLM_UPSTREAM_URL": runtime.url,
        "SLM_UPSTREAM_HEALTH_PATH": "/readyz", "SLM_SERVED_MODEL_NAME": MODEL_NAME, "SLM_RUNTIME": "builtin",
        "SLM_FAULTS_ADMIN": "true", "SLM_ADMIN_PORT": str(admin_port), "SLM_GPU_METRICS": "false",
        "SLM_DRIFT_WARMUP_REQUESTS": "0", "SLM_DRIFT_REFERENCE_REQUESTS": "30", "SLM_DRIFT_WINDOW_REQUESTS": "20",
        "SLM_DRIFT_MIN_SAMPLES": "15", "SLM_DRIFT_CHECK_EVERY_REQUESTS": "5",
        "SLM_DRIFT_MIN_CHECK_INTERVAL_SECONDS": "0", "SLM_DRIFT_ENTER_CHECKS": "2",
        "SLM_LOG_FLUSH_INTERVAL_SECONDS": "0",
    }  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "slm_sidecar"], env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: process.poll() is not None or _ready(f"{base}/readyz"), 60, "sidecar process")
        assert process.poll() is None, log.read_text()
        prompts = ["The module provides", "Return a new list of the", "This function", "The value of"]
        with httpx.Client(base_url=base, timeout=60) as client:
            for i in range(30):
                body = {"model": MODEL_NAME, "prompt": prompts[i % 4], "max_tokens": 12, "seed": i}
                assert client.post("/v1/completions", json=body).status_code == 200
            faults = f"http://127.0.0.1:{admin_port}/admin/faults"
            assert httpx.post(faults, json={"degradedOutput": True}, timeout=10).status_code == 200
            for i in range(60):
                body = {"model": MODEL_NAME, "prompt": prompts[i % 4], "max_tokens": 12, "seed": 1000 + i}
                assert client.post("/v1/completions", json=body).status_code == 200
                if _events(log, "drift_detected"):
                    break
        (detected,) = [e["slm.drift"] for e in _events(log, "drift_detected") if e["slm.drift.signal"] == "perplexity"]
        assert detected["p_value"] < 1e-6 or "mean" in detected["tests_alarming"]  # the KS test ran
        rss_mib = _status_kib(process.pid, "VmRSS") / 1024
        assert rss_mib <= RSS_GOAL_MIB, f"resident {rss_mib:.0f} MiB"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _events(log: Path, event: str) -> list[dict]:
    found = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            if doc.get("event") == event:
                found.append(doc)
    return found


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")
