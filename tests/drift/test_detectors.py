"""Unit tests of the in-server drift detectors (slm_server.drift), fed synthetic request signals.

The detectors are pure computations over numbers, so these tests feed them numbers directly (seeded
NumPy draws) instead of a model; tests/drift/test_server_drift.py runs the same code in the real server.
Gauges are real prometheus_client gauges in a fresh registry; the log event is read from the logger.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Gauge

from slm_server.drift import SIGNALS, DriftMonitor, DriftSettings, for_server, load_reference

MODEL = "tiny"


@dataclass
class Req:
    """A stand-in for slm_server.signals.RequestSignals with the fields the detectors read."""

    perplexity: float | None = 100.0
    output_tokens: int = 50
    finish_reason: str = "stop"
    empty: bool = False
    repetitive: bool = False
    error: bool = False
    model: str = MODEL
    structured: bool = False


def drift_events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The drift state changes logged, as the JSON log line's fields (event + evidence)."""
    return [
        {"event": r.fields["event"], **r.fields["slm.drift"]}  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "slm_server.drift" and "slm.drift" in getattr(r, "fields", {})
    ]


class Clock:
    """Simulated time: each request advances it by one second."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def settings(**overrides: object) -> DriftSettings:
    base: dict[str, object] = {
        "warmup_requests": 0,
        "reference_requests": 500,
        "window_requests": 200,
        "min_samples": 100,
        "check_every_requests": 20,
    }
    base.update(overrides)
    return DriftSettings.model_validate(base)


class Harness:
    def __init__(self, cfg: DriftSettings | None = None, seed: int = 7) -> None:
        self.registry = CollectorRegistry()
        self.score = Gauge("slm_drift_score", "score", ["model", "signal"], registry=self.registry)
        self.detected = Gauge("slm_drift_detected", "detected", ["model", "signal"], registry=self.registry)
        self.clock = Clock()
        self.monitor = DriftMonitor(
            cfg or settings(), score_gauge=self.score, detected_gauge=self.detected, clock=self.clock
        )
        self.rng = np.random.default_rng(seed)

    def feed(
        self,
        n: int,
        *,
        ppl_mean: float = 100.0,
        ppl_sd: float = 15.0,
        length_mean: float = 50.0,
        length_sd: float = 10.0,
        error_rate: float = 0.0,
        length_share: float = 0.05,
    ) -> None:
        for _ in range(n):
            self.clock.now += 1.0
            self.monitor.observe(
                Req(
                    perplexity=float(self.rng.normal(ppl_mean, ppl_sd)),
                    output_tokens=max(0, round(self.rng.normal(length_mean, length_sd))),
                    finish_reason="length" if self.rng.random() < length_share else "stop",
                    error=bool(self.rng.random() < error_rate),
                )
            )

    def gauge(self, name: str, signal: str) -> float | None:
        return self.registry.get_sample_value(name, {"model": MODEL, "signal": signal})

    def detected_signals(self) -> set[str]:
        return {s for s, v in self.monitor.state()[MODEL].items() if v["detected"]}


def test_detects_a_3_sigma_perplexity_shift_and_says_so_in_gauges_and_log(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    h.feed(500 + 300)
    assert h.detected_signals() == set()
    assert h.gauge("slm_drift_detected", "perplexity") == 0.0
    caplog.set_level(logging.INFO, logger="slm_server.drift")
    h.feed(200, ppl_mean=100 + 3 * 15)
    assert h.detected_signals() == {"perplexity"}
    assert h.gauge("slm_drift_detected", "perplexity") == 1.0
    assert (h.gauge("slm_drift_score", "perplexity") or 0) >= 1.0
    assert h.gauge("slm_drift_detected", "output_length") == 0.0
    events = drift_events(caplog)
    assert [(e["event"], e["signal"]) for e in events] == [("drift_detected", "perplexity")]
    evidence = events[0]
    assert evidence["p_value"] < 1e-6 and evidence["psi"] >= 0.1
    assert evidence["reference"]["n"] == 500 and evidence["current"]["n"] == 200
    assert evidence["current"]["mean"] > evidence["reference"]["mean"] + 10  # caught before the window is all new
    assert caplog.records[0].levelno == logging.WARNING


def test_structured_outputs_feed_the_error_and_empty_signals_but_not_the_output_shape_ones() -> None:
    """JSON held to a schema has the schema's shape: a shift of traffic from text to JSON (perplexity
    x10, a tenth of the length, every call repeating the last) is no drift of the model; its errors are."""
    h = Harness()
    h.feed(800)

    def structured(n: int, error_rate: float) -> None:
        for _ in range(n):
            h.clock.now += 1.0
            failed = bool(h.rng.random() < error_rate)
            reason = "error" if failed else "length"
            ppl = float(h.rng.normal(1000, 50))
            h.monitor.observe(
                Req(
                    perplexity=ppl,
                    output_tokens=5,
                    finish_reason=reason,
                    repetitive=True,
                    error=failed,
                    structured=True,
                )
            )

    structured(400, error_rate=0.0)
    assert h.detected_signals() == set()
    structured(400, error_rate=0.3)
    assert h.detected_signals() == {"error"}


def test_detects_collapsing_output_length() -> None:
    h = Harness()
    h.feed(800)
    h.feed(200, length_mean=20, length_sd=5)
    assert "output_length" in h.detected_signals()


def test_silent_on_a_long_stable_run() -> None:
    h = Harness(settings(reference_requests=1000, window_requests=300), seed=11)
    h.feed(30_000, error_rate=0.01)
    assert h.detected_signals() == set()
    assert all(h.gauge("slm_drift_detected", s) == 0.0 for s in SIGNALS)


def test_constant_traffic_and_changes_under_the_floor_never_alarm() -> None:
    h = Harness()
    for i in range(3000):
        h.clock.now += 1
        # 100 -> 100.5 perplexity and 64 -> 63 tokens: real but below the shift floor.
        h.monitor.observe(Req(perplexity=100.0 if i < 1500 else 100.5, output_tokens=64 if i < 1500 else 63))
    assert h.detected_signals() == set()
    assert (h.gauge("slm_drift_score", "perplexity") or 0) < 0.5


def test_min_sample_guard_holds_back_a_huge_shift_until_the_window_is_full_enough() -> None:
    h = Harness(settings(min_samples=150, check_every_requests=10))
    h.feed(500)  # reference complete, window empty
    h.feed(140, ppl_mean=1000)
    evidence = h.monitor.check_now()[MODEL]["perplexity"]
    assert evidence.details["guard"] == "min_samples"
    assert h.detected_signals() == set()
    h.feed(30, ppl_mean=1000)
    assert "perplexity" in h.detected_signals()


def test_no_detection_before_the_reference_is_learned() -> None:
    h = Harness(settings(warmup_requests=50, reference_requests=500))
    h.feed(400, ppl_mean=1000, error_rate=0.5)
    assert h.detected_signals() == set()
    assert not any(v["reference_ready"] for v in h.monitor.state()[MODEL].values())


def test_hysteresis_one_alarming_check_is_not_enough_and_recovery_takes_several_quiet_ones() -> None:
    h = Harness(
        settings(
            enter_checks=2,
            clear_checks=3,
            window_requests=100,
            min_samples=100,
            check_every_requests=100,
            check_interval_seconds=1e9,
        )
    )
    h.feed(500 + 100)
    h.feed(100, ppl_mean=200)  # one full window shifted: one alarming check
    assert h.monitor.state()[MODEL]["perplexity"]["score"] >= 1
    assert "perplexity" not in h.detected_signals()
    h.feed(100, ppl_mean=200)  # second consecutive alarming check
    assert "perplexity" in h.detected_signals()
    h.feed(200)  # two quiet checks: still in the drift state
    assert "perplexity" in h.detected_signals()
    h.feed(100)  # the third quiet check clears it
    assert "perplexity" not in h.detected_signals()


def test_borderline_traffic_does_not_flap(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(settings(window_requests=200, check_every_requests=20), seed=3)
    h.feed(700)
    caplog.set_level(logging.INFO, logger="slm_server.drift")
    for _ in range(20):  # alternate shifted and normal stretches of about one window
        h.feed(150, ppl_mean=125)
        h.feed(150)
    changes = [e["event"] for e in drift_events(caplog) if e["signal"] == "perplexity"]
    assert len(changes) <= 6, changes


def test_error_rate_step_is_caught_by_the_cusum_and_clears_after_recovery(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(settings(reference_requests=1000))
    h.feed(1000 + 2000, error_rate=0.01)
    assert "error" not in h.detected_signals()
    caplog.set_level(logging.INFO, logger="slm_server.drift")
    h.feed(150, error_rate=0.3)
    assert "error" in h.detected_signals()
    assert h.gauge("slm_drift_detected", "error") == 1.0
    h.feed(3000, error_rate=0.01)
    assert "error" not in h.detected_signals()
    events = [e for e in drift_events(caplog) if e["signal"] == "error"]
    assert [e["event"] for e in events] == ["drift_detected", "drift_cleared"]
    assert events[0]["cusum"] >= events[0]["thresholds"]["cusum"]
    assert events[0]["current"]["rate"] > events[0]["reference"]["rate"]


def test_a_reference_without_errors_does_not_make_a_few_errors_an_anomaly() -> None:
    h = Harness()
    h.feed(500)
    h.feed(2000, error_rate=0.004)
    assert h.detected_signals() == set()


def test_truncation_raises_the_finish_length_share() -> None:
    h = Harness(settings(reference_requests=1000))
    h.feed(1200, length_share=0.05)
    h.feed(200, length_share=0.6)
    assert "finish_length" in h.detected_signals()


def test_pinned_reference_file_detects_from_the_first_window(tmp_path: Path) -> None:
    learned = Harness()
    learned.feed(600)
    ref = learned.monitor.export_reference(MODEL)
    assert set(ref["signals"]) == set(SIGNALS)
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(ref))
    pinned = Harness(settings(reference_file=path, reference_requests=10_000))
    pinned.feed(200, ppl_mean=160)
    assert "perplexity" in pinned.detected_signals()


def test_a_broken_reference_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "reference.json"
    path.write_text(json.dumps({"version": 1, "signals": {"latency": {"values": [1, 2]}}}))
    with pytest.raises(ValueError, match="unknown signal 'latency'"):
        load_reference(path)


def test_settings_come_from_slm_drift_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLM_DRIFT_WINDOW_REQUESTS", "123")
    monkeypatch.setenv("SLM_DRIFT_ENABLED", "false")
    cfg = DriftSettings()
    assert cfg.window_requests == 123 and cfg.enabled is False


def test_concurrent_observers_lose_no_request() -> None:
    h = Harness(settings(reference_requests=4000, check_every_requests=50))

    def worker() -> None:
        for _ in range(1000):
            h.monitor.observe(Req(error=False))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert h.monitor.export_reference(MODEL)["signals"]["error"] == {"rate": 0.0, "n": 4000}


def test_a_minority_of_strange_requests_moving_the_mean_is_caught_by_the_mean_test(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """10 % of requests at 10x perplexity: +2 sd on the mean, too small a CDF change for KS at this window."""
    h = Harness(settings(reference_requests=1000, window_requests=300), seed=5)
    h.feed(1300)
    caplog.set_level(logging.INFO, logger="slm_server.drift")
    for _ in range(30):
        h.feed(9)
        h.feed(1, ppl_mean=400, ppl_sd=15)
    assert "perplexity" in h.detected_signals()
    evidence = drift_events(caplog)[0]
    assert evidence["tests_alarming"] == ["mean"]
    assert evidence["mean_z"] >= 6


def test_the_server_adapter_is_off_when_disabled_and_writes_the_servers_gauge_children() -> None:
    """for_server publishes through the server's per-signal children (ServerMetrics.drift_score/detected)."""
    registry = CollectorRegistry()
    score = Gauge("slm_drift_score", "score", ["model", "signal"], registry=registry)
    detected = Gauge("slm_drift_detected", "detected", ["model", "signal"], registry=registry)

    class Metrics:
        drift_score = {s: score.labels(model=MODEL, signal=s) for s in SIGNALS}
        drift_detected = {s: detected.labels(model=MODEL, signal=s) for s in SIGNALS}

    assert for_server(Metrics(), DriftSettings(enabled=False)) is None
    cfg = settings(reference_requests=100, check_every_requests=10, min_check_interval_seconds=0)  # fast loop
    monitor = for_server(Metrics(), cfg)
    assert monitor is not None
    for _ in range(100):
        monitor.observe(Req())
    for _ in range(60):
        monitor.observe(Req(error=True, finish_reason="error", perplexity=None, output_tokens=0))
    assert registry.get_sample_value("slm_drift_detected", {"model": MODEL, "signal": "error"}) == 1.0
    assert registry.get_sample_value("slm_drift_detected", {"model": MODEL, "signal": "perplexity"}) == 0.0


@pytest.mark.parametrize(("min_interval", "at_most"), [(1.0, 11), (0.0, 50)])
def test_under_heavy_load_the_tests_run_at_most_once_per_min_check_interval(
    monkeypatch: pytest.MonkeyPatch, min_interval: float, at_most: int
) -> None:
    """1,000 requests in 10 simulated seconds (100/s): every 20 requests would be 50 checks."""
    checks: list[float] = []
    original = DriftMonitor._check

    def counting(self: DriftMonitor, md: Any, now: float) -> Any:
        checks.append(now)
        return original(self, md, now)

    monkeypatch.setattr(DriftMonitor, "_check", counting)
    clock = Clock()
    monitor = DriftMonitor(settings(check_every_requests=20, min_check_interval_seconds=min_interval), clock=clock)
    for _ in range(1000):
        clock.now += 0.01
        monitor.observe(Req())
    assert at_most - 2 <= len(checks) <= at_most
    assert all(b - a >= min_interval - 1e-9 for a, b in itertools.pairwise(checks))
