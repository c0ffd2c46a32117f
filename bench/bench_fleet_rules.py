"""Rule evaluation of a fleet of SLMDeployments on the real pinned Prometheus: today's layout against the
shared one (issue 24, "Rules that scale to a fleet").

    .venv/bin/python bench/bench_fleet_rules.py                        # N = 100 and 1,000 (make bench)
    .venv/bin/python bench/bench_fleet_rules.py --deployments 20 --history 6h --intervals 2 --json out.json
    .venv/bin/python bench/bench_fleet_rules.py --capture               # re-take bench/data/server_metrics.txt

For each N, one fleet of N deployments (one serving pod each, `--replicas` to change) is written once and
measured under both layouts, one after the other, on the same data:
  before  every deployment's PrometheusRule carries its own recording rules and computes the long SLO
          windows from raw series (bench/data/rules_per_deployment_before.yaml, rendered by the operator
          before the rules were shared);
  shared  the chart's shared recording rules (charts/slm-monitoring/rules/recording-rules.yaml) plus every
          deployment's PrometheusRule as the operator renders it now (alerts and drift rules only).

The series are a real scrape of the built-in server (bench/data/server_metrics.txt: every series it exposes
after some traffic of each kind, errors included, ~700 per pod). Each pod is a scrape target of its own,
served by a small exporter process in this script whose counters grow steadily; the history (`--history`,
3 days by default) is written beforehand as TSDB blocks by bench/fleet_tsdb (Prometheus' own tsdb package
at the pinned version; `promtool tsdb create-blocks-from openmetrics` would need tens of gigabytes of
text for it): the series the long windows read (the requests counters, the per-pod counters the shared
rules record, the drift means) over the whole history, every series over the last 20 minutes. The
exporter serves the very same functions of time, so scraped samples continue the history.

Measured from Prometheus' own metrics once every rule group has been evaluated: the evaluation time of one
interval (sum of `prometheus_rule_group_last_duration_seconds` over the groups, sampled every interval,
averaged), the longest group, missed iterations (`prometheus_rule_group_iterations_missed_total`), the CPU
Prometheus used (cores, scraping included) and its resident memory. Goal at 1,000 deployments with
history: evaluation within 10 % of the interval and no missed evaluation. The machine's other load counts
in every figure: compare the two layouts of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import http.server
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slm_devtools.tools import tool, versions  # noqa: E402
from slm_operator.monitoring.rules import NON_TRAFFIC_ENDPOINTS, render_rule_groups  # noqa: E402

DATA = Path(__file__).with_name("data")
SERVER_METRICS = DATA / "server_metrics.txt"
RULES_BEFORE = DATA / "rules_per_deployment_before.yaml"
SHARED_RULES = REPO / "charts" / "slm-monitoring" / "rules" / "recording-rules.yaml"
GENERATOR_SOURCE = Path(__file__).with_name("fleet_tsdb") / "main.go"
SCRAPE_S = 15  # the SLMDeployment's default scrapeInterval
RECENT_S = 20 * 60  # every series gets this much history: the longest raw window a rule reads is 15m
DRIFT_MEAN_STEP_S = 60  # the drift groups' interval with the default 15m window
GOAL_SHARE = 0.10
MODEL = "tiny"
_TRAFFIC = re.compile(f"^(?!(?:{NON_TRAFFIC_ENDPOINTS})$)")


def say(*parts: Any) -> None:
    print(*parts, flush=True)


# ---- the series of one pod --------------------------------------------------------------------------------


@dataclasses.dataclass
class Series:
    """One series of a pod (or of a deployment), its value a function of time shared with fleet_tsdb."""

    name: str
    labels: dict[str, str]
    kind: str  # "float_counter" (grows at `rate` per second) or "gauge" (a sine around `base`)
    base: float
    rate: float = 0.0
    amp: float = 0.0
    period_s: float = 600.0
    phase: float = 0.0
    history: bool = False  # the long windows of the rules before read it over the whole history

    def value(self, scale: float, elapsed_s: float) -> float:
        """What bench/fleet_tsdb/main.go `value()` computes for the same series."""
        if self.kind == "float_counter":
            return self.base + self.rate * scale * elapsed_s
        return self.base + self.amp * math.sin(2 * math.pi * elapsed_s / self.period_s + self.phase)


def _parse_line(line: str) -> tuple[str, dict[str, str], float]:
    match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
    if not match:
        raise ValueError(f"not a sample line: {line!r}")
    name, body, value = match.groups()
    labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', body or ""))
    return name, labels, float(value)


def _request_rate(endpoint: str, status: str) -> float:
    """Requests per second of one api_requests_total series: steady traffic, probes, few errors."""
    if endpoint in ("/healthz", "/readyz"):
        return 0.1 if status.startswith("2") else 0.0  # a probe every 10s
    if endpoint == "/metrics":
        return 1 / SCRAPE_S
    if not _TRAFFIC.match(endpoint):
        return 0.0
    if status.startswith("5"):
        return 0.0002  # well below every burn-rate threshold: a healthy fleet, no alert firing
    if status.startswith("4"):
        return 0.005
    return {"/v1/chat/completions": 1.0, "/v1/completions": 0.5, "/generate": 0.2}.get(endpoint, 0.05)


def pod_series(text: str) -> list[Series]:
    """The series of one pod from a scrape of the real server, each given a steady behaviour over time."""
    types: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            types[family] = kind
        elif line and not line.startswith("#"):
            samples.append(_parse_line(line))

    def family_of(name: str) -> tuple[str, str]:
        for suffix in ("_bucket", "_count", "_sum", "_total", ""):
            base = name.removesuffix(suffix) if suffix else name
            if name.endswith(suffix) and base in types:
                return base, types[base]
        return name, "untyped"

    # A histogram's requests per second: that of its endpoint's traffic, split by the captured counts.
    counts = {
        (n, tuple(sorted((k, v) for k, v in lb.items() if k != "le"))): v
        for n, lb, v in samples
        if n.endswith("_count")
    }
    series: list[Series] = []
    for name, labels, value in samples:
        family, kind = family_of(name)
        if kind == "gauge" or (kind == "untyped" and not name.endswith("_total")):
            constant = name.endswith("_info") or "max_" in name or value == 0
            series.append(
                Series(name, labels, "gauge", value, amp=0.0 if constant else 0.1 * abs(value), phase=len(series) % 7)
            )
            continue
        endpoint, status = labels.get("endpoint", ""), labels.get("status", "")
        if name == "api_requests_total":
            rate = _request_rate(endpoint, status)
            history = bool(_TRAFFIC.match(endpoint))
        elif kind == "histogram":
            key = (family + "_count", tuple(sorted((k, v) for k, v in labels.items() if k != "le")))
            count = counts.get(key, 0.0)
            share = value / count if count else 0.0
            requests = _request_rate(endpoint, "200") if endpoint else 0.5
            rate = requests * (share if name.endswith("_bucket") else 1.0)
            if name.endswith("_sum"):
                rate = requests * (value / count if count else 0.0)
            history = False
        else:
            rate, history = 0.01 * max(value, 1.0), False
        series.append(Series(name, labels, "float_counter", base=1000 * value, rate=rate, history=history))
    return series


def recorded_history(template: list[Series]) -> tuple[list[Series], list[Series]]:
    """What the rules recorded before the run began: (per pod, per deployment).

    The shared layer's per-pod request counters are the sums of the pod's traffic counters (so the live
    recording continues them); the drift means, recorded per deployment in both layouts, are steady.
    """
    traffic = [s for s in template if s.name == "api_requests_total" and _TRAFFIC.match(s.labels["endpoint"])]
    errors = [s for s in traffic if s.labels["status"].startswith("5")]
    per_pod = [
        Series(
            "slm:requests:pod_total", {}, "float_counter", sum(s.base for s in traffic), sum(s.rate for s in traffic)
        ),
        Series(
            "slm:request_errors:pod_total",
            {},
            "float_counter",
            sum(s.base for s in errors),
            sum(s.rate for s in errors),
        ),
    ]
    per_deployment = [
        Series("slm:request_perplexity:mean15m", {"model": MODEL}, "gauge", 12.0, amp=0.5, period_s=3600),
        Series("slm:output_tokens:mean15m", {}, "gauge", 64.0, amp=2.0, period_s=5400),
    ]
    return per_pod, per_deployment


# ---- the fleet --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pod:
    index: int
    namespace: str
    deployment: str
    name: str
    instance: str
    scale: float

    def target_labels(self) -> dict[str, str]:
        """The labels the Prometheus Operator gives a serving pod's series (ServiceMonitor, port http)."""
        return {
            "namespace": self.namespace,
            "job": self.deployment,
            "service": self.deployment,
            "pod": self.name,
            "instance": self.instance,
            "container": "server",
        }


def _suffix(seed: str, length: int) -> str:
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    digest = hashlib.sha256(seed.encode()).digest()
    return "".join(alphabet[b % len(alphabet)] for b in digest[:length])


def fleet(deployments: int, replicas: int) -> list[Pod]:
    pods: list[Pod] = []
    for d in range(deployments):
        name = f"slm-{d:04d}"
        for r in range(replicas):
            index = len(pods)
            pods.append(
                Pod(
                    index,
                    f"team-{d % 20:02d}",
                    name,
                    f"{name}-{_suffix(name, 9)}-{_suffix(f'{name}/{r}', 5)}",
                    f"10.{index // 62500}.{index // 250 % 250}.{index % 250 + 1}:8000",
                    0.5 + (d % 10) / 10,
                )
            )
    return pods


def generator_spec(template: list[Series], pods: list[Pod], now_ms: int, history_s: int) -> dict[str, Any]:
    epoch_ms = now_ms - history_s * 1000
    recent_from = max(epoch_ms, now_ms - RECENT_S * 1000)
    per_pod, per_deployment = recorded_history(template)

    def entry(series: Series, scope: str, ranges: list[tuple[int, int, int]]) -> dict[str, Any]:
        return {
            "labels": {"__name__": series.name, **series.labels},
            "scope": scope,
            "kind": series.kind,
            "base": series.base,
            "rate": series.rate,
            "amp": series.amp,
            "period_s": series.period_s,
            "phase": series.phase,
            "ranges": [{"from_ms": a, "to_ms": b, "step_ms": s} for a, b, s in ranges],
        }

    scrape = SCRAPE_S * 1000
    entries = [entry(s, "pod", [(epoch_ms if s.history else recent_from, now_ms, scrape)]) for s in template]
    entries += [entry(s, "pod_recorded", [(epoch_ms, now_ms, 30_000)]) for s in per_pod]
    drift_from = max(epoch_ms, now_ms - 86400_000 - 3600_000)
    entries += [entry(s, "deployment", [(drift_from, now_ms, DRIFT_MEAN_STEP_S * 1000)]) for s in per_deployment]
    deployments: dict[str, dict[str, Any]] = {}
    for pod in pods:
        deployments.setdefault(
            pod.deployment, {"labels": {"namespace": pod.namespace, "job": pod.deployment}, "scale": pod.scale}
        )
    recorded = ("namespace", "job", "pod", "instance")  # what the shared rules' `sum by` keeps
    return {
        "epoch_ms": epoch_ms,
        "block_ms": 86400_000,
        "targets": {
            "pod": [{"labels": pod.target_labels(), "scale": pod.scale} for pod in pods],
            "pod_recorded": [
                {"labels": {k: pod.target_labels()[k] for k in recorded}, "scale": pod.scale} for pod in pods
            ],
            "deployment": list(deployments.values()),
        },
        "series": entries,
    }


def build_generator(cache: Path) -> Path:
    """bench/fleet_tsdb built against the pinned Prometheus module (cached by source and version)."""
    version = versions()["PROMETHEUS_VERSION"]
    digest = hashlib.sha256(GENERATOR_SOURCE.read_bytes()).hexdigest()[:12]
    binary = cache / f"fleet-tsdb-{version}-{digest}" / "fleet-tsdb"
    if binary.exists():
        return binary
    work = binary.parent / "src"
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(GENERATOR_SOURCE, work / "main.go")
    (work / "go.mod").write_text(
        f"module slm-monitoring.local/fleettsdb\n\ngo 1.25\n\nrequire github.com/prometheus/prometheus {version}\n"
    )
    deps_sum = cache.parent / "src" / f"prometheus-{version}" / "go.sum"  # from scripts/deps/build-tools.sh
    if deps_sum.exists():
        shutil.copy(deps_sum, work / "go.sum")
    say(f"building bench/fleet_tsdb against prometheus {version} (once; a few minutes on 2 cores)")
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod -buildvcs=false", "GOTOOLCHAIN": "local"}
    result = subprocess.run(
        ["go", "build", "-o", str(binary), "."], cwd=work, env=env, capture_output=True, text=True, timeout=1800
    )
    if result.returncode != 0:
        raise SystemExit(f"building bench/fleet_tsdb failed:\n{result.stderr[-4000:]}")
    return binary


# ---- the exporter: every pod's /metrics -------------------------------------------------------------------


class Exposition:
    """The text each pod serves at a given second (pods of one rate scale share it)."""

    def __init__(self, template: list[Series], epoch_s: float) -> None:
        self.template, self.epoch_s = template, epoch_s
        self.lines = []
        for series in template:
            labels = ",".join(f'{k}="{v}"' for k, v in series.labels.items())
            self.lines.append(f"{series.name}{{{labels}}} " if labels else f"{series.name} ")
        self.cache: dict[tuple[float, int], bytes] = {}
        self.lock = threading.Lock()

    def body(self, scale: float) -> bytes:
        second = int(time.time())
        key = (scale, second)
        with self.lock:
            cached = self.cache.get(key)
        if cached is not None:
            return cached
        elapsed = second - self.epoch_s
        text = "".join(
            f"{prefix}{series.value(scale, elapsed)!r}\n"
            for prefix, series in zip(self.lines, self.template, strict=True)
        )
        data = text.encode()
        with self.lock:
            if len(self.cache) > 64:
                self.cache.clear()
            self.cache[key] = data
        return data


def serve(spec_path: Path, port_file: Path) -> None:
    """The exporter process: GET /pods/<index>/metrics for every pod of the spec."""
    spec = json.loads(spec_path.read_text())
    template = [Series(**s) for s in spec["template"]]
    scales = spec["scales"]
    exposition = Exposition(template, spec["epoch_s"])

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            match = re.fullmatch(r"/pods/(\d+)/metrics", self.path)
            if not match or int(match.group(1)) >= len(scales):
                self.send_error(404)
                return
            body = exposition.body(scales[int(match.group(1))])
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port_file.write_text(str(server.server_address[1]))
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()


@dataclasses.dataclass
class Process:
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_exporter(workdir: Path, template: list[Series], pods: list[Pod], epoch_s: float) -> tuple[Process, int]:
    spec = workdir / "exporter.json"
    spec.write_text(
        json.dumps(
            {
                "template": [dataclasses.asdict(s) for s in template],
                "scales": [pod.scale for pod in pods],
                "epoch_s": epoch_s,
            }
        )
    )
    port_file = workdir / "exporter.port"
    log = workdir / "exporter.log"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(spec), str(port_file)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    process = Process(proc, log)
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            process.stop()
            raise SystemExit(f"the exporter did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return process, int(port_file.read_text())


# ---- Prometheus -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rules_before(deployments: list[tuple[str, str]]) -> dict[str, Any]:
    text = RULES_BEFORE.read_text()
    groups = []
    for namespace, name in deployments:
        groups += yaml.safe_load(text.replace("__NAMESPACE__", namespace).replace("__NAME__", name))["groups"]
    return {"groups": groups}


def rules_shared(deployments: list[tuple[str, str]]) -> dict[str, Any]:
    groups = []
    for namespace, name in deployments:
        groups += render_rule_groups(name=name, namespace=namespace, alerts=None)
    return {"groups": groups}


def write_config(run: Path, port: int, pods: list[Pod], rule_files: list[Path], interval_s: int) -> Path:
    targets = [
        {
            "targets": [f"127.0.0.1:{port}"],
            "labels": {**pod.target_labels(), "__metrics_path__": f"/pods/{pod.index}/metrics"},
        }
        for pod in pods
    ]
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": "10s", "evaluation_interval": f"{interval_s}s"},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [{"job_name": "slm-fleet", "honor_labels": True, "static_configs": targets}],
    }
    path = run / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def link_blocks(blocks: Path, data: Path) -> None:
    """A data directory holding the fleet's history: the blocks hard-linked (blocks are never rewritten)."""
    for block in blocks.iterdir():
        if not block.is_dir():
            continue
        for path in block.rglob("*"):
            target = data / path.relative_to(blocks)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, target)


class Prometheus:
    def __init__(self, run: Path, config: Path, data: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = run / "prometheus.log"
        # One block range (2h) only: the backfilled history is not compacted while it is measured.
        proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=30d",
                "--storage.tsdb.min-block-duration=2h",
                "--storage.tsdb.max-block-duration=2h",
                "--log.level=warn",
            ],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.process = Process(proc, log)

    def get(self, path: str, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:  # noqa: S310 (loopback)
            return bytes(response.read())

    def api(self, path: str) -> Any:
        return json.loads(self.get(path))["data"]

    def wait(self, what: str, check: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.proc.poll() is not None:
                raise SystemExit(f"Prometheus exited: {self.process.log.read_text()[-3000:]}")
            try:
                result = check()
            except (OSError, ValueError, KeyError):
                result = None
            if result:
                return result
            time.sleep(1)
        raise SystemExit(f"Prometheus: {what} not within {timeout:.0f}s; log: {self.process.log.read_text()[-3000:]}")

    def own_metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        metrics: dict[str, list[tuple[dict[str, str], float]]] = {}
        for line in self.get("/metrics").decode().splitlines():
            if line.startswith(
                (
                    "prometheus_rule_group_",
                    "process_",
                    "prometheus_tsdb_head_series ",
                    "prometheus_engine_query_samples_total ",
                )
            ):
                name, labels, value = _parse_line(line)
                metrics.setdefault(name, []).append((labels, value))
        return metrics


def measure(prometheus: Prometheus, groups: int, interval_s: int, intervals: int, timeout: float) -> dict[str, Any]:
    """Once every group has been evaluated since the targets came up: `intervals` samples, one per interval."""
    since = time.time()

    def all_evaluated() -> bool:
        stamps = prometheus.own_metrics().get("prometheus_rule_group_last_evaluation_timestamp_seconds", [])
        return len(stamps) == groups and all(value >= since for _, value in stamps)

    if groups:
        prometheus.wait(f"every one of the {groups} rule groups evaluated once", all_evaluated, timeout)
    samples = []
    start = prometheus.own_metrics()
    start_t = time.monotonic()
    for _ in range(intervals):
        time.sleep(interval_s)
        samples.append(prometheus.own_metrics())
    elapsed = time.monotonic() - start_t
    end = samples[-1]

    def total(metrics: dict[str, Any], name: str) -> float:
        return sum(value for _, value in metrics.get(name, []))

    def delta(name: str) -> float:
        return total(end, name) - total(start, name)

    per_interval = [total(m, "prometheus_rule_group_last_duration_seconds") for m in samples]
    longest = max((v for m in samples for _, v in m.get("prometheus_rule_group_last_duration_seconds", [])), default=0)
    rules = prometheus.api("/api/v1/rules")["groups"]
    errors = [
        f"{g['name']}/{r.get('name')}: {r.get('lastError')}"
        for g in rules
        for r in g["rules"]
        if r.get("health") == "err"
    ]
    evaluation = sum(per_interval) / len(per_interval)
    return {
        "groups": groups,
        "rules": sum(len(g["rules"]) for g in rules),
        "evaluation_s_per_interval": round(evaluation, 3),
        "share_of_interval": round(evaluation / interval_s, 4),
        "longest_group_s": round(longest, 3),
        "missed_iterations": int(delta("prometheus_rule_group_iterations_missed_total")),
        "missed_iterations_since_start": int(total(end, "prometheus_rule_group_iterations_missed_total")),
        # Samples the queries loaded (every sample of a range each time it is read): the work the rules do,
        # whatever else the machine runs.
        "samples_per_interval": round(delta("prometheus_engine_query_samples_total") * interval_s / elapsed),
        "cpu_cores": round(delta("process_cpu_seconds_total") / elapsed, 2),
        "rss_gib": round(max(total(m, "process_resident_memory_bytes") for m in samples) / 2**30, 2),
        "head_series": int(total(end, "prometheus_tsdb_head_series")),
        "load_average": round(os.getloadavg()[0], 1),
        "rule_errors": errors[:10],
    }


# ---- one N --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    history_s: int
    interval_s: int
    intervals: int
    replicas: int
    timeout_s: float


def run_fleet(n: int, template: list[Series], generator: Path, workdir: Path, opts: Options) -> dict[str, Any]:
    pods = fleet(n, opts.replicas)
    deployments = sorted({(pod.namespace, pod.deployment) for pod in pods})
    root = workdir / f"fleet-{n}"
    blocks = root / "blocks"
    blocks.mkdir(parents=True)
    now_ms = int(time.time() * 1000)
    spec = generator_spec(template, pods, now_ms, opts.history_s)
    say(f"N={n}: {len(pods)} pods x {len(template)} series; writing {opts.history_s / 86400:g} days of history")
    started = time.monotonic()
    result = subprocess.run(
        [str(generator), str(blocks)], input=json.dumps(spec).encode(), capture_output=True, timeout=3600
    )
    if result.returncode != 0:
        raise SystemExit(f"fleet_tsdb failed: {result.stderr.decode()[-4000:]}")
    history_samples = int(result.stdout.split()[0])
    block_bytes = sum(p.stat().st_size for p in blocks.rglob("*") if p.is_file())
    say(
        f"  {history_samples / 1e6:.0f}M samples, {block_bytes / 2**20:.0f} MiB of blocks "
        f"in {time.monotonic() - started:.0f}s"
    )
    exporter, port = start_exporter(root, template, pods, spec["epoch_ms"] / 1000)
    results: dict[str, Any] = {
        "deployments": n,
        "pods": len(pods),
        "series_per_pod": len(template) + 5,
        "history_samples": history_samples,
        "block_mib": round(block_bytes / 2**20),
    }
    try:
        for layout in ("scrape-only", "before", "shared"):
            results[layout] = measure_layout(layout, root, blocks, pods, deployments, port, opts)
        for layout in ("before", "shared"):
            # What the rules cost on top of scraping and storing the fleet's series.
            cores = results[layout]["cpu_cores"] - results["scrape-only"]["cpu_cores"]
            results[layout]["rules_cpu_cores"] = round(max(cores, 0.0), 2)
    finally:
        exporter.stop()
        shutil.rmtree(blocks, ignore_errors=True)
    return results


def measure_layout(
    layout: str,
    root: Path,
    blocks: Path,
    pods: list[Pod],
    deployments: list[tuple[str, str]],
    port: int,
    opts: Options,
) -> dict[str, Any]:
    """One Prometheus on a fresh copy of the history, with the rules of `layout`, measured."""
    run = root / layout
    run.mkdir()
    rule_files: list[Path] = []
    if layout == "before":
        rule_files = [run / "rules.yaml"]
        rule_files[0].write_text(yaml.safe_dump(rules_before(deployments), sort_keys=False))
    elif layout == "shared":
        rule_files = [SHARED_RULES, run / "rules.yaml"]
        rule_files[1].write_text(yaml.safe_dump(rules_shared(deployments), sort_keys=False))
    groups = sum(len(yaml.safe_load(p.read_text())["groups"]) for p in rule_files)
    data = run / "data"
    link_blocks(blocks, data)
    prometheus = Prometheus(run, write_config(run, port, pods, rule_files, opts.interval_s), data)

    def targets_up() -> bool:
        active = prometheus.api("/api/v1/targets?state=active")["activeTargets"]
        return len(active) == len(pods) and all(t["health"] == "up" for t in active)

    try:
        prometheus.wait("ready", lambda: prometheus.get("/-/ready"), 600)
        prometheus.wait(f"all {len(pods)} targets up", targets_up, opts.timeout_s)
        intervals = opts.intervals if groups else max(2, opts.intervals - 1)
        say(f"  {layout}: {groups} groups, measuring {intervals} intervals of {opts.interval_s}s")
        result = measure(prometheus, groups, opts.interval_s, intervals, opts.timeout_s)
        say(f"  {layout}: {json.dumps(result)}")
        return result
    finally:
        prometheus.process.stop()
        shutil.rmtree(data, ignore_errors=True)


def report(results: list[dict[str, Any]], interval_s: int) -> str:
    lines = [
        f"| deployments | layout | rules | evaluation per {interval_s}s interval (share) | longest group | missed "
        "| samples loaded per interval | Prometheus CPU (rules) | RSS | head series |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        for layout in ("scrape-only", "before", "shared"):
            r = result[layout]
            rules_cpu = f" ({r['rules_cpu_cores']:.2f})" if "rules_cpu_cores" in r else ""
            lines.append(
                f"| {result['deployments']:,} | {layout} | {r['rules']:,} "
                f"| {r['evaluation_s_per_interval']:.2f} s ({100 * r['share_of_interval']:.1f} %) "
                f"| {r['longest_group_s']:.2f} s | {r['missed_iterations']} | {r['samples_per_interval'] / 1e6:.1f} M "
                f"| {r['cpu_cores']:.2f}{rules_cpu} cores | {r['rss_gib']:.2f} GiB | {r['head_series']:,} |"
            )
    return "\n".join(lines)


# ---- capturing the series of a real server ---------------------------------------------------------------


def capture() -> None:
    """Scrape the real server (tiny model) after some traffic of every kind, into SERVER_METRICS."""
    from slm_devtools import dataplane as dp
    from slm_devtools.tinymodel import ensure_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="capture-"))
    server = dp.SlmServer(
        workdir, env={"SLM_MODEL": str(ensure_tiny_model()), "SLM_MODEL_NAME": MODEL, "SLM_FAULTS_ADMIN": "true"}
    )
    server.start()
    try:

        def call(path: str, body: dict[str, Any] | None = None) -> None:
            # Errors are traffic too: their series are what we want.
            with contextlib.suppress(urllib.error.HTTPError):
                dp.http_json(f"{server.url}{path}", method="POST" if body is not None else "GET", body=body)

        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        for _ in range(3):
            call("/v1/completions", {"model": MODEL, "prompt": "hello world", "max_tokens": 8})
            call("/v1/chat/completions", chat)
            call("/generate", {"prompt": "hello", "max_new_tokens": 8})
            call("/tokenize", {"model": MODEL, "prompt": "hello"})
            call("/detokenize", {"model": MODEL, "tokens": [1, 2]})
            call("/v1/models")
        call("/v1/completions", {"model": "no-such-model", "prompt": "x"})
        call("/v1/completions", {"prompt": 123})
        call("/v1/chat/completions", {**chat, "response_format": {"type": "json_object"}})
        server.set_faults(error_rate=1.0)
        call("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 4})
        call("/v1/chat/completions", chat)
        call("/generate", {"prompt": "x", "max_new_tokens": 4})
        server.set_faults()
        call("/healthz")
        server.metrics_text()  # so that /metrics itself has its series, as under Prometheus
        text = server.metrics_text()
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    header = (
        "# A scrape of the built-in server (tiny model) after traffic of every kind, errors included: the\n"
        "# series of one serving pod for bench/bench_fleet_rules.py. Made by: "
        "python bench/bench_fleet_rules.py --capture\n"
    )
    SERVER_METRICS.write_text(header + text)
    count = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    say(f"wrote {SERVER_METRICS.relative_to(REPO)}: {count} series")


# ---- main -----------------------------------------------------------------------------------------------------


def _duration(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+)([smhd])", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration like 3d or 6h: {text!r}")
    return int(match.group(1)) * units[match.group(2)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deployments", type=int, nargs="+", default=[100, 1000], help="fleet sizes N")
    parser.add_argument("--replicas", type=int, default=1, help="serving pods per deployment")
    parser.add_argument("--history", type=_duration, default=_duration("3d"), help="history written (3d)")
    parser.add_argument("--interval", type=int, default=30, help="rule evaluation interval, seconds (30)")
    parser.add_argument("--intervals", type=int, default=3, help="intervals measured per layout (3)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for targets and evaluations")
    parser.add_argument("--workdir", type=Path, help="where the blocks and data go (a temporary directory)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--capture", action="store_true", help="re-take bench/data/server_metrics.txt and exit")
    parser.add_argument("--serve", nargs=2, type=Path, help=argparse.SUPPRESS)  # the exporter process
    args = parser.parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return 0
    if args.capture:
        capture()
        return 0
    template = pod_series(SERVER_METRICS.read_text())
    cache = Path(os.environ.get("SLM_CACHE_DIR", Path.home() / ".cache" / "slm-monitoring")) / "tools"
    generator = build_generator(cache)
    opts = Options(args.history, args.interval, args.intervals, args.replicas, args.timeout)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-fleet-rules-"))
    results = []
    try:
        for n in args.deployments:
            results.append(run_fleet(n, template, generator, workdir, opts))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    say("")
    say(report(results, args.interval))
    for result in results:
        shared = result["shared"]
        met = shared["share_of_interval"] <= GOAL_SHARE and shared["missed_iterations"] == 0
        say(
            f"N={result['deployments']:,}, shared layout: {100 * shared['share_of_interval']:.1f} % of the interval, "
            f"{shared['missed_iterations']} missed (goal <= {100 * GOAL_SHARE:.0f} %, none missed): "
            f"{'met' if met else 'NOT met'}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"interval_s": args.interval, "history_s": args.history, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
