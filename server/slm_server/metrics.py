"""Prometheus metrics of the server — the metric contract (docs/reference/metrics.md).

Every series is registered on a `CollectorRegistry` given to `ServerMetrics` (a fresh one per app,
so tests inject their own; nothing touches prometheus_client's global registry). Label children
are bound once, when the app is built (or on the first request of a new status code), never with
`.labels()` on the request path. The request-path metrics are slm_server.fastmetrics' lock-free
families, exposed through prometheus_client like any other; the request path only queues its
observations (`ServerMetrics.observations`), applied in batches and before every collection, so a
scrape always sees every request that ended before it.

Metrics (labels; `model` is the served model name, one value per process):

  seed's, names and labels kept exactly
  api_requests_total{endpoint,status}              counter    every HTTP request
  api_request_duration_seconds{endpoint}           histogram  until the last byte (streams included)
  model_output_tokens{endpoint}                    histogram  generated tokens per request

  slm_ (generation endpoints: /generate, /v1/completions, /v1/chat/completions). They count
  generations: a request for n choices (OpenAI's `n`) is n generations, and one request in
  api_requests_total.
  slm_time_to_first_token_seconds{model,endpoint}  histogram  arrival → first token (queue included)
  slm_inter_token_latency_seconds{model,endpoint}  histogram  between consecutive tokens
  slm_queue_time_seconds{model,endpoint}           histogram  waiting for a generation slot
  slm_request_tokens_per_second{model,endpoint}    histogram  output tokens / generation time
  slm_request_perplexity{model,endpoint}           histogram  exp(mean NLL) of the generated tokens
  slm_request_output_tokens{model,endpoint}        histogram  output length (drift detection)
                                                              (these two: free text only, not output
                                                              held to a JSON schema or tool calls)
  slm_prompt_tokens_total{model,endpoint}          counter
  slm_generation_tokens_total{model,endpoint}      counter
  slm_request_finish_total{model,endpoint,finish_reason}  counter  stop|length|abort|timeout|error
  slm_empty_outputs_total{model,endpoint}          counter    generations with no visible text
  slm_repetitive_outputs_total{model,endpoint}     counter    generations stuck in a loop (signals.is_repetitive)
  slm_request_errors_total{model,endpoint,error}   counter    invalid_input|overloaded|timeout|
                                                              model_error|not_ready|internal
  slm_requests_in_flight{model}                    gauge      generations running
  slm_requests_queued{model}                       gauge      waiting for a slot
  slm_max_concurrent_requests{model}               gauge      the limits, for saturation ratios
  slm_max_queue{model}                             gauge
  slm_model_info{model,source,dtype,device,max_context}  gauge = 1
  slm_model_load_seconds{model}                    gauge
  slm_fault_injection_enabled{model}               gauge      1 while faults may be injected
  slm_batch_size{model}                            gauge      generations sharing each forward pass now
  slm_forward_passes_total{model}                  counter    generation passes (prefills, decode steps)
  slm_forward_pass_generations_total{model}        counter    generations fed in them; the ratio of
                                                              their rates is the mean batch size
  slm_kv_cache_bytes{model}                        gauge      KV cache of the running generations
  slm_kv_cache_positions{model,kind}               gauge      kind: token|padding (left-padded batches)
  slm_prefix_cache_queries_total{model}            counter    prompt tokens looked up in the prefix cache
  slm_prefix_cache_hits_total{model}               counter    of them, found (rate ratio: the hit rate)
  slm_prefix_cache_bytes{model}                    gauge      KV cache bytes it holds
  slm_prefix_cache_capacity_bytes{model}           gauge      its budget; 0 = prefix caching off
  slm_structured_outputs_total{model,format,result}  counter  generations held to a response_format or
                                                              to tool calls: format json_object|json_schema|
                                                              tool_call|regex|choice|grammar, result
                                                              complete|incomplete (cut short)
  slm_drift_score{model,signal}                    gauge      signal: perplexity|output_length|
  slm_drift_detected{model,signal}                 gauge      finish_length|empty_output|repetition|
                                                              error; set by slm_server.drift

  GPU, from pynvml, per GPU (labels index, uuid, name); absent on a machine without one
  nvidia_gpu_utilization (percent), nvidia_gpu_memory_used_bytes, nvidia_gpu_memory_total_bytes,
  nvidia_gpu_temperature_celsius, nvidia_gpu_power_watts

  slm_filesystem_avail_bytes{mountpoint}           gauge      per path of SLM_DISK_PATHS (default: the
  slm_filesystem_size_bytes{mountpoint}            gauge      model's directory), read at scrape time

  plus process_* and python_* from prometheus_client's own collectors.

Series count: no prompt, user or request id is ever a label; `endpoint` is a closed set (the
routes, plus `other` for any unknown path) and `status` the codes actually returned. With the
default buckets the server exposes about 680 series after a request to every route (see
`tests/server/test_metrics.py::test_series_count_is_bounded`, which fails if this grows past 900).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from slm_server.fastmetrics import Counter, Gauge, GaugeChild, Histogram, Observations

log = logging.getLogger("slm_server.metrics")

# `*_created` samples double the series of every counter and histogram and no rule or panel reads
# them (Prometheus ignores them without the created-timestamps feature). Process-wide switch.
disable_created_metrics()

GENERATION_ENDPOINTS = ("/generate", "/v1/completions", "/v1/chat/completions")
OTHER_ENDPOINTS = ("/v1/models", "/tokenize", "/detokenize", "/healthz", "/readyz", "/metrics", "/admin/faults")
UNKNOWN_ENDPOINT = "other"
FINISH_REASONS = ("stop", "length", "abort", "timeout", "error")
ERROR_KINDS = ("invalid_input", "overloaded", "timeout", "model_error", "not_ready", "internal")
# What held an output to a grammar (slm_server.structured): a response_format, tool calls, or
# structured_outputs' regex, choice or grammar.
STRUCTURED_FORMATS = ("json_object", "json_schema", "tool_call", "regex", "choice", "grammar")
# The drift detector's signals (slm_server.drift): two distributions, four rates.
DRIFT_SIGNALS = ("perplexity", "output_length", "finish_length", "empty_output", "repetition", "error")

REQUEST_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 2.5, 5, 10, 20, 30, 60, 120)
TOKEN_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKENS_PER_SECOND_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
PERPLEXITY_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 100000)


class RouteMetrics:
    """The seed's request counter and latency histogram, bound for one endpoint."""

    __slots__ = ("_by_status", "_counter", "_observations", "endpoint", "latency")

    def __init__(self, counter: Counter, latency: Histogram, endpoint: str, observations: Observations):
        self.endpoint = endpoint
        self._counter = counter
        self._observations = observations
        self.latency = latency.labels(endpoint=endpoint)
        self._by_status: dict[int, Any] = {}

    def observe(self, status: int, seconds: float) -> None:
        """Count one response once it has gone (queued: applied in a batch, or before the next
        collection)."""
        self._observations.add_final(self._apply, status, seconds)

    def _apply(self, status: int, seconds: float) -> None:
        child = self._by_status.get(status)
        if child is None:  # first response with this code: bind once
            child = self._by_status[status] = self._counter.labels(endpoint=self.endpoint, status=str(status))
        child.inc()
        self.latency.observe(seconds)


# What one generation gives its metrics, kept in the queue until applied (nothing in it may
# change). A plain tuple: built on the request path with no Python-level __init__ to run.
# (queue seconds or None, perf_counter() at the request's arrival, perf_counter() when each token
#  was ready, prompt tokens, output tokens, perplexity or None, finish reason, no visible text,
#  stuck in a loop, held to a grammar)
Generation = tuple[float | None, float, list[float], int, int, float | None, str, bool, bool, bool]


class GenerationMetrics:
    """The per-generation series, bound for one endpoint."""

    def __init__(self, m: ServerMetrics, endpoint: str):
        labels = {"model": m.model, "endpoint": endpoint}
        self._observations = m.observations
        self.output_tokens_seed = m.model_output_tokens.labels(endpoint=endpoint)
        self.ttft = m.ttft.labels(**labels)
        self.itl = m.itl.labels(**labels)
        self.queue = m.queue_time.labels(**labels)
        self.tps = m.tokens_per_second.labels(**labels)
        self.perplexity = m.perplexity.labels(**labels)
        self.output_tokens = m.output_tokens.labels(**labels)
        self.prompt_tokens_total = m.prompt_tokens.labels(**labels)
        self.generation_tokens_total = m.generation_tokens.labels(**labels)
        self.finish = {r: m.finish.labels(finish_reason=r, **labels) for r in FINISH_REASONS}
        self.empty = m.empty_outputs.labels(**labels)
        self.repetitive = m.repetitive_outputs.labels(**labels)
        self.errors = {e: m.errors.labels(error=e, **labels) for e in ERROR_KINDS}

    def observe(self, generation: Generation) -> None:
        """Record one generation (queued: applied in a batch, or before the next collection)."""
        self._observations.add(self._apply, generation)

    def _apply(self, g: Generation) -> None:
        (
            queue_seconds,
            start,
            token_times,
            prompt_tokens,
            output_tokens,
            perplexity,
            finish_reason,
            empty,
            repetitive,
            structured,
        ) = g
        if queue_seconds is not None:
            self.queue.observe(queue_seconds)
        self.prompt_tokens_total.inc(prompt_tokens)
        self.generation_tokens_total.inc(output_tokens)
        self.output_tokens_seed.observe(output_tokens)
        if not structured:  # the model-behaviour histograms: free text only (slm_server.drift says why)
            self.output_tokens.observe(output_tokens)
            if perplexity is not None:
                self.perplexity.observe(perplexity)
        self.finish[finish_reason].inc()
        if empty:
            self.empty.inc()
        if repetitive:
            self.repetitive.inc()
        if token_times:
            self.ttft.observe(token_times[0] - start)
            self.itl.observe_gaps(token_times)
            if len(token_times) > 1:
                elapsed = token_times[-1] - token_times[0]
                if elapsed > 0:
                    self.tps.observe((len(token_times) - 1) / elapsed)

    def error(self, kind: str) -> None:
        self.errors[kind].inc()


class ServerMetrics:
    """All of the server's series on one registry."""

    enabled = True

    def __init__(self, registry: CollectorRegistry, model: str):
        self.registry = registry
        self.model = model
        # The request path's updates, applied in batches and before every collection (fastmetrics).
        self.observations = o = Observations()
        on: dict[str, Any] = {"registry": registry, "observations": o}  # every family, as keywords
        self.api_requests = Counter(
            "api_requests_total", "Total count of requests by endpoint and status", ["endpoint", "status"], **on
        )
        self.api_latency = Histogram(
            "api_request_duration_seconds",
            "Request duration in seconds by endpoint",
            ["endpoint"],
            buckets=REQUEST_DURATION_BUCKETS,
            **on,
        )
        self.model_output_tokens = Histogram(
            "model_output_tokens",
            "Distribution of output token counts",
            ["endpoint"],
            buckets=TOKEN_COUNT_BUCKETS,
            **on,
        )
        ml = ["model", "endpoint"]
        self.ttft = Histogram(
            "slm_time_to_first_token_seconds",
            "Time from request arrival to the first generated token (queue time included)",
            ml,
            buckets=TTFT_BUCKETS,
            **on,
        )
        self.itl = Histogram(
            "slm_inter_token_latency_seconds",
            "Time between two consecutive generated tokens",
            ml,
            buckets=ITL_BUCKETS,
            **on,
        )
        self.queue_time = Histogram(
            "slm_queue_time_seconds",
            "Time a request waited for a generation slot",
            ml,
            buckets=QUEUE_BUCKETS,
            **on,
        )
        self.tokens_per_second = Histogram(
            "slm_request_tokens_per_second",
            "Decoding speed of a request: output tokens per second after the first",
            ml,
            buckets=TOKENS_PER_SECOND_BUCKETS,
            **on,
        )
        self.perplexity = Histogram(
            "slm_request_perplexity",
            "Perplexity of each request's generated tokens under the model (exp of mean negative log-likelihood); "
            "free text only, not output held to a JSON schema or tool calls",
            ml,
            buckets=PERPLEXITY_BUCKETS,
            **on,
        )
        self.output_tokens = Histogram(
            "slm_request_output_tokens",
            "Generated tokens per generation; free text only, not output held to a JSON schema or tool calls",
            ml,
            buckets=TOKEN_COUNT_BUCKETS,
            **on,
        )
        self.prompt_tokens = Counter("slm_prompt_tokens_total", "Prompt tokens processed", ml, **on)
        self.generation_tokens = Counter("slm_generation_tokens_total", "Tokens generated", ml, **on)
        self.finish = Counter("slm_request_finish_total", "Generations by finish reason", [*ml, "finish_reason"], **on)
        self.empty_outputs = Counter("slm_empty_outputs_total", "Generations that produced no visible text", ml, **on)
        self.repetitive_outputs = Counter(
            "slm_repetitive_outputs_total",
            "Generations whose output repeats itself (a model stuck in a loop)",
            ml,
            **on,
        )
        self.errors = Counter(
            "slm_request_errors_total", "Failed generation requests by error kind", [*ml, "error"], **on
        )

        def model_gauge(name: str, documentation: str) -> GaugeChild:
            """A gauge with the one `model` label, bound to the served model."""
            return Gauge(name, documentation, ["model"], **on).labels(model=model)

        self.in_flight = model_gauge("slm_requests_in_flight", "Generations running now")
        self.queued = model_gauge("slm_requests_queued", "Requests waiting for a generation slot")
        self.max_concurrent = model_gauge("slm_max_concurrent_requests", "Generations allowed at once")
        self.max_queued = model_gauge(
            "slm_max_queue", "Requests allowed to wait for a slot; more are rejected with 429"
        )
        self.model_info = Gauge(
            "slm_model_info",
            "The served model (value 1)",
            ["model", "source", "dtype", "device", "max_context"],
            **on,
        )
        self.model_load_seconds = model_gauge("slm_model_load_seconds", "Time taken to load the model")
        self.fault_injection = model_gauge("slm_fault_injection_enabled", "1 when fault injection is configured on")
        structured = Counter(
            "slm_structured_outputs_total",
            "Generations held to a response_format or to tool calls, by whether their JSON was complete when they "
            "ended",
            ["model", "format", "result"],
            **on,
        )
        self.structured_outputs = {
            (f, r): structured.labels(model=model, format=f, result=r)
            for f in STRUCTURED_FORMATS
            for r in ("complete", "incomplete")
        }
        drift_score = Gauge(
            "slm_drift_score",
            "Drift score of a model-behaviour signal (set by the drift detector)",
            ["model", "signal"],
            **on,
        )
        drift_detected = Gauge(
            "slm_drift_detected",
            "1 while drift is detected on a signal (set by the drift detector)",
            ["model", "signal"],
            **on,
        )
        self.drift_score = {s: drift_score.labels(model=model, signal=s) for s in DRIFT_SIGNALS}
        self.drift_detected = {s: drift_detected.labels(model=model, signal=s) for s in DRIFT_SIGNALS}

        self.routes = {
            ep: RouteMetrics(self.api_requests, self.api_latency, ep, o)
            for ep in GENERATION_ENDPOINTS + OTHER_ENDPOINTS
        }
        self.unknown_route = RouteMetrics(self.api_requests, self.api_latency, UNKNOWN_ENDPOINT, o)
        self.generation = {ep: GenerationMetrics(self, ep) for ep in GENERATION_ENDPOINTS}

    def route(self, path: str) -> RouteMetrics:
        return self.routes.get(path) or self.unknown_route

    def structured_output(self, format: str, complete: bool) -> None:
        """Count a generation held to a response_format (queued, as the request path's updates are)."""
        self.observations.add(self.structured_outputs[format, "complete" if complete else "incomplete"].inc)

    def set_model(self, *, source: str, dtype: str, device: str, max_context: int, load_seconds: float) -> None:
        self.model_info.labels(
            model=self.model, source=source, dtype=dtype, device=device, max_context=str(max_context)
        ).set(1)
        self.model_load_seconds.set(load_seconds)

    def watch_load(self, in_flight: Callable[[], int], queued: Callable[[], int]) -> None:
        """The in-flight and queued gauges read the admission's counts when scraped (no update
        on the request path, and never stale)."""
        self.in_flight.set_function(in_flight)
        self.queued.set_function(queued)


class _NullChild:
    def __getattr__(self, name: str) -> Any:
        return _noop


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class NullMetrics:
    """Same surface, records nothing: the uninstrumented baseline (`metrics_enabled=false`)."""

    enabled = False

    def __init__(self, model: str):
        self.model = model
        null = self._null = _NullChild()
        self.routes = {ep: null for ep in GENERATION_ENDPOINTS + OTHER_ENDPOINTS}  # request lines' route names
        self.generation = {ep: null for ep in GENERATION_ENDPOINTS}
        self.drift_score = {s: null for s in DRIFT_SIGNALS}
        self.drift_detected = {s: null for s in DRIFT_SIGNALS}
        self.fault_injection = null
        self.max_concurrent = null
        self.max_queued = null

    def route(self, path: str) -> Any:
        return self._null

    def set_model(self, **_: Any) -> None:
        return None

    def watch_load(self, in_flight: Callable[[], int], queued: Callable[[], int]) -> None:
        return None

    def structured_output(self, format: str, complete: bool) -> None:
        return None


class GpuCollector(Collector):
    """Reads every GPU through NVML at scrape time (no background thread, always fresh)."""

    def __init__(self, nvml: Any, devices: list[tuple[str, str, str, Any]]):
        self._nvml = nvml
        self._devices = devices  # (index, uuid, name, handle)
        self._memory_v2 = True  # until the driver refuses NVML's v2 memory reading

    def collect(self) -> Iterable[GaugeMetricFamily]:
        nvml = self._nvml
        labels = ["index", "uuid", "name"]
        util = GaugeMetricFamily("nvidia_gpu_utilization", "GPU utilization in percent (NVML)", labels=labels)
        used = GaugeMetricFamily(
            "nvidia_gpu_memory_used_bytes", "GPU memory used in bytes, as nvidia-smi counts it (NVML)", labels=labels
        )
        total = GaugeMetricFamily("nvidia_gpu_memory_total_bytes", "GPU memory in bytes (NVML)", labels=labels)
        temp = GaugeMetricFamily(
            "nvidia_gpu_temperature_celsius", "GPU temperature in degrees Celsius (NVML)", labels=labels
        )
        power = GaugeMetricFamily("nvidia_gpu_power_watts", "GPU power draw in watts (NVML)", labels=labels)
        for index, uuid, name, handle in self._devices:
            values = [index, uuid, name]
            for families, read in (
                ((util,), lambda h: (nvml.nvmlDeviceGetUtilizationRates(h).gpu,)),
                ((used, total), self._memory),  # one reading for both
                ((temp,), lambda h: (nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),)),
                ((power,), lambda h: (nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,)),
            ):
                try:
                    readings = read(handle)
                except nvml.NVMLError:  # a reading this GPU does not support: leave the series out
                    continue
                for family, value in zip(families, readings, strict=True):
                    family.add_metric(values, float(value))
        yield from (util, used, total, temp, power)

    def _memory(self, handle: Any) -> tuple[int, int]:
        """(used, total) bytes as nvidia-smi and DCGM count them: NVML's v2 reading, whose `used` leaves
        out what the driver reserves. The v1 reading counts it as used (645 MiB more than nvidia-smi on
        an H200, seen by scripts/gpu-check.sh); it is the fallback for a driver without v2, which is
        then not asked again."""
        nvml = self._nvml
        if self._memory_v2:
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
                return memory.used, memory.total
            except (nvml.NVMLError_FunctionNotFound, nvml.NVMLError_ArgumentVersionMismatch):
                self._memory_v2 = False
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return memory.used, memory.total


class BatchCollector(Collector):
    """How generations share the model's forward passes (continuous batching, slm_server.batching),
    read from the engine's counters at scrape time; no series before the model is loaded."""

    def __init__(self, model: str, stats: Callable[[], tuple[int, int, int] | None]):
        self._model = model
        self._stats = stats  # (generations in the running batch, passes, generations fed in them)

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._stats()
        if stats is None:
            return
        running, passes, fed = stats
        labels = ["model"]
        size = GaugeMetricFamily("slm_batch_size", "Generations sharing each forward pass now", labels=labels)
        size.add_metric([self._model], float(running))
        yield size
        passes_total = CounterMetricFamily(
            "slm_forward_passes", "Forward passes of generation (prefills and decode steps)", labels=labels
        )
        passes_total.add_metric([self._model], float(passes))
        yield passes_total
        fed_total = CounterMetricFamily(
            "slm_forward_pass_generations",
            "Generations fed in the forward passes (per pass: the batch size)",
            labels=labels,
        )
        fed_total.add_metric([self._model], float(fed))
        yield fed_total


class KVCacheCollector(Collector):
    """The KV cache of the generations running now (slm_server.batching), read from the engine at
    scrape time: its bytes (on the model's device: GPU memory on a GPU) and the positions its
    left-padded batches span, padding included; no series before the model is loaded."""

    def __init__(self, model: str, stats: Callable[[], tuple[int, int, int] | None]):
        self._model = model
        self._stats = stats  # (bytes, positions, of which padding)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        stats = self._stats()
        if stats is None:
            return
        held, positions, padding = stats
        size = GaugeMetricFamily("slm_kv_cache_bytes", "Bytes of the running generations' KV cache", labels=["model"])
        size.add_metric([self._model], float(held))
        yield size
        spans = GaugeMetricFamily(
            "slm_kv_cache_positions",
            "Positions the running generations' KV cache spans: their tokens, and the padding of shorter ones",
            labels=["model", "kind"],
        )
        spans.add_metric([self._model, "token"], float(positions - padding))
        spans.add_metric([self._model, "padding"], float(padding))
        yield spans


class PrefixCacheCollector(Collector):
    """The prompt-prefix KV cache (slm_server.prefix_cache), read from the engine at scrape time:
    zeros while it is off (`slm_prefix_cache_capacity_bytes` 0), no series before the model is loaded."""

    def __init__(self, model: str, stats: Callable[[], tuple[int, int, int, int] | None]):
        self._model = model
        self._stats = stats  # (prompt tokens looked up, found, bytes held, capacity)

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._stats()
        if stats is None:
            return
        queried, hits, held, capacity = stats
        labels = ["model"]
        for family, name, doc, value in (
            (CounterMetricFamily, "slm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", queried),
            (CounterMetricFamily, "slm_prefix_cache_hits", "Prompt tokens found in the prefix cache", hits),
            (GaugeMetricFamily, "slm_prefix_cache_bytes", "Bytes of KV cache the prefix cache holds", held),
            (GaugeMetricFamily, "slm_prefix_cache_capacity_bytes", "The prefix cache's budget; 0 = off", capacity),
        ):
            metric = family(name, doc, labels=labels)
            metric.add_metric([self._model], float(value))
            yield metric


class FilesystemCollector(Collector):
    """Free and total bytes of the filesystems holding the given paths (statvfs at scrape time).

    For the disk-space alert where no node exporter sees the pod's volume; a path that cannot be
    read is left out of the scrape (and logged once), never an error.
    """

    def __init__(self, paths: Callable[[], list[str]]):
        self._paths = paths  # asked at every scrape (the model's directory is known once it loaded)
        self._warned: set[str] = set()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        avail = GaugeMetricFamily(
            "slm_filesystem_avail_bytes", "Bytes available to the server on the filesystem", labels=["mountpoint"]
        )
        size = GaugeMetricFamily("slm_filesystem_size_bytes", "Size of the filesystem in bytes", labels=["mountpoint"])
        for path in self._paths():
            try:
                st = os.statvfs(path)
            except OSError as exc:
                if path not in self._warned:
                    self._warned.add(path)
                    log.warning(f"cannot read the filesystem of {path}: {exc}", extra={"fields": {"event": "error"}})
                continue
            avail.add_metric([path], float(st.f_bavail * st.f_frsize))
            size.add_metric([path], float(st.f_blocks * st.f_frsize))
        yield avail
        yield size


def gpu_collector() -> GpuCollector | None:
    """A collector over the machine's NVIDIA GPUs, or None (logged once) when there are none."""
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception as exc:  # no driver library, no device, no permission: a CPU machine
        log.info(
            "no NVIDIA GPU found: GPU metrics are off",
            extra={"fields": {"event": "gpu_missing", "reason": f"{type(exc).__name__}: {exc}"}},
        )
        return None
    if count == 0:
        log.info(
            "no NVIDIA GPU found: GPU metrics are off",
            extra={"fields": {"event": "gpu_missing", "reason": "0 devices"}},
        )
        return None
    devices = []
    for i in range(count):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        uuid, name = pynvml.nvmlDeviceGetUUID(handle), pynvml.nvmlDeviceGetName(handle)
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        name = name.decode() if isinstance(name, bytes) else name
        devices.append((str(i), uuid, name, handle))
    log.info(
        "NVIDIA GPUs found",
        extra={"fields": {"event": "gpu_found", "gpu.count": count, "gpu.names": [d[2] for d in devices]}},
    )
    return GpuCollector(pynvml, devices)
