"""Every metric of the contract is exposed after real requests, correct by Prometheus' own lint."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from slm_server.engine import EchoEngine

from .conftest import MODEL_NAME, serve, settings_for

# (sample name, labels that must be on it) — the metric contract (docs/reference/metrics.md).
GEN = {"model": MODEL_NAME, "endpoint": "/generate"}
CONTRACT = [
    ("api_requests_total", {"endpoint": "/generate", "status": "200"}),
    ("api_request_duration_seconds_bucket", {"endpoint": "/generate"}),
    ("model_output_tokens_bucket", {"endpoint": "/generate"}),
    ("slm_time_to_first_token_seconds_bucket", GEN),
    ("slm_inter_token_latency_seconds_bucket", GEN),
    ("slm_queue_time_seconds_bucket", GEN),
    ("slm_request_tokens_per_second_bucket", GEN),
    ("slm_request_perplexity_bucket", GEN),
    ("slm_request_output_tokens_bucket", GEN),
    ("slm_prompt_tokens_total", GEN),
    ("slm_generation_tokens_total", GEN),
    ("slm_request_finish_total", {**GEN, "finish_reason": "length"}),
    ("slm_request_errors_total", {**GEN, "error": "invalid_input"}),
    ("slm_requests_in_flight", {"model": MODEL_NAME}),
    ("slm_requests_queued", {"model": MODEL_NAME}),
    ("slm_max_concurrent_requests", {"model": MODEL_NAME}),
    ("slm_max_queue", {"model": MODEL_NAME}),
    ("slm_empty_outputs_total", GEN),
    ("slm_repetitive_outputs_total", GEN),
    ("slm_filesystem_avail_bytes", {"mountpoint": "/"}),
    ("slm_filesystem_size_bytes", {"mountpoint": "/"}),
    ("slm_model_info", {"model": MODEL_NAME, "device": "cpu", "dtype": "float32", "max_context": "256"}),
    ("slm_model_load_seconds", {"model": MODEL_NAME}),
    ("slm_fault_injection_enabled", {"model": MODEL_NAME}),
    ("slm_batch_size", {"model": MODEL_NAME}),
    ("slm_forward_passes_total", {"model": MODEL_NAME}),
    ("slm_forward_pass_generations_total", {"model": MODEL_NAME}),
    ("slm_kv_cache_bytes", {"model": MODEL_NAME}),
    ("slm_kv_cache_positions", {"model": MODEL_NAME, "kind": "token"}),
    ("slm_kv_cache_positions", {"model": MODEL_NAME, "kind": "padding"}),
    ("slm_prefix_cache_queries_total", {"model": MODEL_NAME}),
    ("slm_prefix_cache_hits_total", {"model": MODEL_NAME}),
    ("slm_prefix_cache_bytes", {"model": MODEL_NAME}),
    ("slm_prefix_cache_capacity_bytes", {"model": MODEL_NAME}),
    ("slm_structured_outputs_total", {"model": MODEL_NAME, "format": "json_schema", "result": "incomplete"}),
    ("slm_drift_score", {"model": MODEL_NAME, "signal": "perplexity"}),
    ("slm_drift_score", {"model": MODEL_NAME, "signal": "output_length"}),
    ("slm_drift_detected", {"model": MODEL_NAME, "signal": "perplexity"}),
    ("slm_drift_detected", {"model": MODEL_NAME, "signal": "output_length"}),
    ("process_resident_memory_bytes", {}),
]


def _samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _exercise(client) -> list[str]:
    """One real request to every route; returns the request ids seen."""
    ids = []
    calls = [
        ("POST", "/generate", {"prompt": "Return the", "max_tokens": 6, "temperature": 0}),
        ("POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "The file", "max_tokens": 4}),
        (
            "POST",
            "/v1/chat/completions",
            {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True},
        ),
        ("POST", "/generate", {"prompt": 1}),  # 422
        ("GET", "/v1/models", None),
        ("GET", "/healthz", None),
        ("GET", "/readyz", None),
        ("GET", "/no/such/path/12345", None),  # 404, endpoint "other"
    ]
    for method, path, body in calls:
        r = client.request(method, path, json=body)
        ids.append(r.headers["x-request-id"])
    return ids


@pytest.fixture
def exercised(tiny_engine, tiny_model_dir):
    with serve(tiny_engine, settings_for(tiny_model_dir, disk_paths="/")) as server:
        ids = _exercise(server.client)
        yield server, server.client.get("/metrics").text, ids


def test_every_contract_metric_is_present_after_real_requests(exercised):
    _, text, _ = exercised
    samples = _samples(text)
    for name, labels in CONTRACT:
        assert any(s.name == name and all(s.labels.get(k) == v for k, v in labels.items()) for s in samples), (
            f"{name}{labels} missing"
        )


def test_values_follow_the_requests(exercised):
    server, _, _ = exercised
    assert server.metric("api_requests_total", {"endpoint": "/generate", "status": "200"}) == 1
    assert server.metric("api_requests_total", {"endpoint": "/generate", "status": "422"}) == 1
    assert server.metric("api_requests_total", {"endpoint": "other", "status": "404"}) == 1
    assert server.metric("slm_request_errors_total", {**GEN, "error": "invalid_input"}) == 1
    assert server.metric("slm_request_finish_total", {**GEN, "finish_reason": "length"}) == 1
    assert server.metric("slm_generation_tokens_total", GEN) == 6
    assert server.metric("model_output_tokens_count", {"endpoint": "/generate"}) == 1
    assert server.metric("slm_inter_token_latency_seconds_count", GEN) == 5  # between 6 tokens
    chat = {"model": MODEL_NAME, "endpoint": "/v1/chat/completions"}
    assert server.metric("slm_time_to_first_token_seconds_count", chat) == 1
    assert server.metric("slm_requests_in_flight", {"model": MODEL_NAME}) == 0
    assert server.metric("slm_drift_detected", {"model": MODEL_NAME, "signal": "perplexity"}) == 0


def test_no_request_id_or_raw_path_becomes_a_label(exercised):
    _, text, ids = exercised
    values = {v for s in _samples(text) for v in s.labels.values()}
    assert not values & set(ids)
    assert "/no/such/path/12345" not in values
    endpoints = {s.labels["endpoint"] for s in _samples(text) if "endpoint" in s.labels}
    assert endpoints <= {
        "/generate",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/healthz",
        "/readyz",
        "/metrics",
        "/admin/faults",
        "other",
    }


def test_series_count_is_bounded(exercised):
    server, _, _ = exercised
    _exercise(server.client)  # a second round adds no series
    text = server.client.get("/metrics").text
    count = len(_samples(text))
    print(f"series after every route: {count}, /metrics size {len(text)} bytes")
    assert count < 900


def test_promtool_accepts_the_exposition(exercised):
    from slm_devtools.tools import ToolMissing, tool

    try:
        promtool = tool("promtool")
    except ToolMissing as exc:
        pytest.skip(f"promtool not built yet ({exc})")
    _, text, _ = exercised
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""  # not even a lint warning


def test_without_a_gpu_no_gpu_series_and_one_log_event(tiny_engine, tiny_model_dir, json_records):
    with serve(tiny_engine, settings_for(tiny_model_dir)) as srv:
        srv.client.post("/generate", json={"prompt": "x", "max_tokens": 1})
        text = srv.client.get("/metrics").text
    assert "nvidia_gpu" not in text
    missing = json_records("gpu_missing")
    assert len(missing) == 1
    assert missing[0]["level"] == "info" and missing[0]["reason"]


class FakeNvml:
    """A stand-in NVML (there is no GPU here; scripts/gpu-check.sh compares the real one with nvidia-smi).
    Memory as an H200 reported it: v1's `used` counts the driver's reserved memory, v2's does not."""

    NVML_TEMPERATURE_GPU = 0
    nvmlMemory_v2 = 0x02000028
    RESERVED = 645 * 2**20

    class NVMLError(Exception):
        pass

    class NVMLError_FunctionNotFound(NVMLError):  # pynvml names it so
        pass

    class NVMLError_ArgumentVersionMismatch(NVMLError):
        pass

    def __init__(self, has_v2: bool = True):
        self.has_v2 = has_v2

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=87)

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        if version is None:
            return SimpleNamespace(used=3 * 2**30 + self.RESERVED, total=80 * 2**30)
        if not self.has_v2 or version != self.nvmlMemory_v2:
            raise self.NVMLError_FunctionNotFound("no nvmlDeviceGetMemoryInfo_v2")
        return SimpleNamespace(used=3 * 2**30, reserved=self.RESERVED, total=80 * 2**30)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 61

    def nvmlDeviceGetPowerUsage(self, h):
        raise self.NVMLError("not supported")  # a reading the GPU lacks is left out, not fatal


def test_gpu_collector_reads_every_gpu_through_nvml():
    from prometheus_client import CollectorRegistry, generate_latest

    from slm_server.metrics import GpuCollector

    registry = CollectorRegistry()
    registry.register(GpuCollector(FakeNvml(), [("0", "GPU-abc", "NVIDIA H100", object())]))
    labels = {"index": "0", "uuid": "GPU-abc", "name": "NVIDIA H100"}
    assert registry.get_sample_value("nvidia_gpu_utilization", labels) == 87
    assert registry.get_sample_value("nvidia_gpu_memory_used_bytes", labels) == 3 * 2**30  # as nvidia-smi says
    assert registry.get_sample_value("nvidia_gpu_memory_total_bytes", labels) == 80 * 2**30
    assert registry.get_sample_value("nvidia_gpu_temperature_celsius", labels) == 61
    assert registry.get_sample_value("nvidia_gpu_power_watts", labels) is None
    assert b"nvidia_gpu_utilization{" in generate_latest(registry)


def test_gpu_memory_falls_back_to_the_v1_reading_on_a_driver_without_v2():
    from prometheus_client import CollectorRegistry

    from slm_server.metrics import GpuCollector

    registry = CollectorRegistry()
    registry.register(GpuCollector(FakeNvml(has_v2=False), [("0", "GPU-abc", "NVIDIA A10", object())]))
    labels = {"index": "0", "uuid": "GPU-abc", "name": "NVIDIA A10"}
    assert registry.get_sample_value("nvidia_gpu_memory_used_bytes", labels) == 3 * 2**30 + FakeNvml.RESERVED
    assert registry.get_sample_value("nvidia_gpu_memory_total_bytes", labels) == 80 * 2**30


def test_without_monitoring_the_server_serves_the_same_without_metrics_or_request_lines(tiny_model_dir, json_records):
    """The benchmark's baseline (metrics and request lines off) must differ from the instrumented
    server by its monitoring only: request ids and the body cap are serving. Plumbing only: the
    no-op engine is enough."""
    settings = settings_for(tiny_model_dir, metrics_enabled=False, log_requests=False, max_body_bytes=2048)
    with serve(EchoEngine(), settings) as srv:
        r = srv.client.post("/generate", json={"prompt": "a b c", "max_tokens": 2}, headers={"x-request-id": "req-7"})
        assert r.status_code == 200
        assert r.headers["x-request-id"] == r.json()["id"] == "req-7"
        made = srv.client.post("/generate", json={"prompt": "a b c", "max_tokens": 2})
        assert len(made.headers["x-request-id"]) == 24 and made.headers["x-request-id"] == made.json()["id"]
        r = srv.client.post("/generate", json={"prompt": "x" * 4000})
        assert r.status_code == 413 and "2048 bytes" in r.json()["error"]["message"]
        assert srv.client.get("/metrics").status_code == 404
    assert json_records("request") == []


def test_filesystem_gauges_default_to_the_model_directory(server, tiny_model_dir):
    labels = {"mountpoint": str(tiny_model_dir)}
    size = server.metric("slm_filesystem_size_bytes", labels)
    avail = server.metric("slm_filesystem_avail_bytes", labels)
    assert size and size > 0
    assert avail is not None and 0 <= avail <= size


def test_a_scrape_counts_every_request_that_ended_before_it(tiny_model_dir):
    """The request path queues its metric updates (slm_server.fastmetrics.Observations); 300
    requests queue more than one batch, and /metrics must still show each of them, no fewer.
    The no-op engine: this is about bookkeeping, not the model."""
    with serve(EchoEngine(), settings_for(tiny_model_dir)) as srv:
        for _ in range(300):
            assert srv.client.post("/generate", json={"prompt": "a b c", "max_tokens": 3}).status_code == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value for s in _samples(srv.client.get("/metrics").text)
        }
    gen = tuple(sorted({"endpoint": "/generate", "model": MODEL_NAME}.items()))
    assert samples["api_requests_total", (("endpoint", "/generate"), ("status", "200"))] == 300
    assert samples["api_request_duration_seconds_count", (("endpoint", "/generate"),)] == 300
    assert samples["slm_generation_tokens_total", gen] == 900
    assert samples["slm_inter_token_latency_seconds_count", gen] == 600
