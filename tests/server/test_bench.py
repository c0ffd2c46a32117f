"""`make bench`'s server benchmark runs and measures what it says it does. A small run: the
figures are checked for shape, never for speed (speed goals are the benchmark's to report)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench_module(name: str) -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def bench_server():
    sys.path.insert(0, str(BENCH))  # the spawned workers inherit it and import the module by name
    try:
        import bench_server

        yield bench_server
    finally:
        sys.path.remove(str(BENCH))


def test_the_server_benchmark_measures_every_variant_and_the_metrics_endpoint(bench_server):
    result = bench_server.run(requests=40, rounds=2, processes=1)
    assert set(result["us_per_request"]) == set(bench_server.VARIANTS)
    assert all(us > 0 for us in result["us_per_request"].values())
    assert all(len(rounds) == 2 for rounds in result["per_request_us_by_round"].values())
    # /metrics measured at the default series count, on the instrumented variant's registry.
    assert 500 <= result["metrics_series"] <= 900
    assert result["metrics_bytes"] > 20_000
    assert result["full_gc_ms"] >= 0 and result["full_gc_unfrozen_ms"] > 0


def test_the_server_benchmark_measures_a_tiny_model_request_to_compare_the_monitoring_with(bench_server):
    """The monitoring's goal is a share of a real request: the tiny model's, 8 tokens, measured in the run."""
    assert bench_server.tiny_model_request_ms(3) > 1.0  # a forward pass per token: milliseconds, not µs


def test_the_baseline_serves_like_the_instrumented_app_without_its_monitoring(bench_server):
    """The ratio is only fair if the two apps differ by their monitoring alone."""
    baseline, no_registry = bench_server.build_variant("uninstrumented")
    instrumented, registry = bench_server.build_variant("instrumented")
    assert no_registry is None and registry is not None
    assert not baseline.state.metrics.enabled and not baseline.state.settings.log_requests
    assert instrumented.state.metrics.enabled and instrumented.state.settings.log_requests
    for app in (baseline, instrumented):  # request ids and the body cap are in both
        assert [m.cls.__name__ for m in app.user_middleware] == ["RequestMiddleware"]
    assert baseline.state.settings.max_body_bytes == instrumented.state.settings.max_body_bytes


def test_the_detokenization_benchmark_streams_the_same_text_both_ways():
    """bench_detokenize checks that both ways give the tokens' text; here on a short run, for shape."""
    bench_detokenize = _bench_module("bench_detokenize")
    result = bench_detokenize.run([16, 64], repeats=1)
    assert set(result) == {"16", "64"}
    assert all(r["incremental"] > 0 and r["whole_output"] > 0 and r["ratio"] > 0 for r in result.values())


def test_the_batching_benchmark_runs_every_engine_to_the_same_tokens():
    """bench_batching checks that the three engines generate the same tokens; here on a short run, for shape."""
    bench_batching = _bench_module("bench_batching")
    result = bench_batching.run([1, 3], tokens=8, rounds=1)
    assert set(result) == {"1", "3"}
    for r in result.values():
        assert set(r["tokens_per_second"]) == {"continuous", "one per pass", "thread each"}
        assert all(rate > 0 for rate in r["tokens_per_second"].values())
    assert result["1"]["mean_batch_size"] == 1.0
    assert 1.0 <= result["3"]["mean_batch_size"] <= 3.0


def test_the_prefill_benchmark_measures_each_engine_while_streams_run():
    """bench_prefill on a short run, for shape: every engine's stall, usual gap and time to first token."""
    bench_prefill = _bench_module("bench_prefill")
    result = bench_prefill.run([0, 32], prompt_tokens=200, streams=2, rounds=1, stream_tokens=48)
    assert result["prompt_tokens"] == 200 and set(result["engines"]) == {"0", "32"}
    for r in result["engines"].values():
        assert r["longest_gap_ms"] > 0 and r["usual_gap_ms"] > 0 and r["time_to_first_token_ms"] > 0


def test_the_prefix_cache_benchmark_measures_both_engines_and_the_hit_share():
    """bench_prefix_cache on a short run, for shape."""
    bench_prefix_cache = _bench_module("bench_prefix_cache")
    result = bench_prefix_cache.run(system_tokens=100, requests=2, rounds=1)
    assert set(result["time_to_first_token_ms"]) == {"on", "off"}
    assert all(ms > 0 for ms in result["time_to_first_token_ms"].values())
    assert 0.5 < result["hit_share"] < 1.0  # the system prompt's whole blocks, not the questions


def test_the_structured_output_benchmark_compares_equal_generations_with_and_without_the_grammar():
    bench_structured = _bench_module("bench_structured")
    result = bench_structured.run(tokens=8, stream_counts=[1, 2], rounds=1, vocab=3000, corpus_bytes=1_000_000)
    assert result["vocab"] == 3000 and result["device"] == "cpu"  # the device the engine picked (no GPU here)
    for figures in result["inter_token"].values():  # it refuses to compare generations of unequal lengths
        assert figures["free_ms"] > 0 and figures["json_schema_ms"] > 0
    assert result["compile_ms"]["cold"] > result["compile_ms"]["cached"] > 0
