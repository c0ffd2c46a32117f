"""The drift detector inside the real server: the tiny model generating, /metrics and the JSON log read back.

No mock: `create_app` with the project's tiny model (built once per machine, cached) wires
slm_server.drift in as its signal observer; requests go through the HTTP app, and the test reads what
an SRE would read — the `slm_drift_*` gauges on /metrics and the `drift_detected` log event. Windows
are shrunk through the `SLM_DRIFT_*` environment so the test stays well under a minute.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from slm_devtools.tinymodel import build_corpus, ensure_tiny_model
from slm_server.app import create_app
from slm_server.settings import Settings

pytestmark = pytest.mark.timeout(180)

REFERENCE = 30
WINDOW = 15
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    return ensure_tiny_model()


def _prompts(count: int, seed: int) -> tuple[list[str], list[str]]:
    """Openings of prose like the model's training text, and the same openings scrambled into noise."""
    rng = random.Random(seed)
    docs = rng.sample(build_corpus(), count)
    normal = [" ".join(d.split()[:10]) for d in docs]
    scrambled = []
    for text in normal:
        chars = list(text)
        rng.shuffle(chars)
        scrambled.append("".join(chars))
    return normal, scrambled


def _gauge(client: TestClient, name: str, signal: str) -> float | None:
    body = client.get("/metrics").text
    match = re.search(rf'^{name}\{{[^}}]*signal="{signal}"[^}}]*\}} (\S+)$', body, re.MULTILINE)
    return float(match.group(1)) if match else None


@pytest.fixture()
def client(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    for key, value in {
        "WARMUP_REQUESTS": "0",
        "REFERENCE_REQUESTS": str(REFERENCE),
        "WINDOW_REQUESTS": str(WINDOW),
        "MIN_SAMPLES": str(WINDOW),
        "CHECK_EVERY_REQUESTS": "2",
        "MIN_CHECK_INTERVAL_SECONDS": "0",  # the test sends many requests a second
        "KS_PVALUE": "1e-3",
        "MEAN_Z": "4",
        "ENTER_CHECKS": "1",
    }.items():
        monkeypatch.setenv(f"SLM_DRIFT_{key}", value)
    settings = Settings.model_validate({"model": str(tiny_model), "gpu_metrics": False})
    app = create_app(settings, registry=CollectorRegistry())
    with TestClient(app) as test_client:
        deadline = time.monotonic() + 60
        while test_client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the tiny model did not load within 60 s"
            time.sleep(0.2)
        yield test_client


def test_drift_gauges_move_when_the_prompt_distribution_shifts(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="slm_server.drift")
    normal, scrambled = _prompts(REFERENCE + WINDOW + 40, seed=3)

    def generate(prompt: str, seed: int, temperature: float = 1.0) -> None:
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "seed": seed, "temperature": temperature}
        response = client.post("/generate", json=body)
        assert response.status_code == 200, response.text

    for i, prompt in enumerate(normal[: REFERENCE + WINDOW]):
        generate(prompt, i)
    assert _gauge(client, "slm_drift_detected", "perplexity") == 0.0
    quiet_score = _gauge(client, "slm_drift_score", "perplexity")
    assert quiet_score is not None and quiet_score < 1

    detected_after = None
    # A new client: text the model has never seen, sampled hotter (as in bench/bench_drift.py).
    for i, prompt in enumerate(scrambled[:40]):
        generate(prompt, 1000 + i, temperature=1.3)
        if _gauge(client, "slm_drift_detected", "perplexity") == 1.0:
            detected_after = i + 1
            break
    assert detected_after is not None, "perplexity drift not detected after 40 scrambled prompts"
    assert (_gauge(client, "slm_drift_score", "perplexity") or 0) >= 1.0
    fields = [getattr(r, "fields", None) or {} for r in caplog.records]  # the JSON log line's fields
    events = [f for f in fields if f.get("event") == "drift_detected"]
    assert any(e["slm.drift.signal"] == "perplexity" for e in events)
    evidence = next(e["slm.drift"] for e in events if e["slm.drift.signal"] == "perplexity")
    assert evidence["current"]["mean"] > evidence["reference"]["mean"]
