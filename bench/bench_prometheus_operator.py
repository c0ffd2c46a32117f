"""What the path through the real Prometheus Operator costs: threshold edit → evaluated, ServiceMonitor → target up.

    .venv/bin/python bench/bench_prometheus_operator.py [--edits 20] [--monitors 10] [--json OUT]

One run starts a local control plane, kube-prometheus-stack's monitoring (slm_devtools.promstack: the
Prometheus Operator, and the Prometheus and Alertmanager it generates, run at their pods' addresses) and
one SLMDeployment whose server runs here (slm_devtools.dataplane.MonitoringPlane), then measures side by side:

1. A threshold edited in the SLMDeployment → Prometheus evaluates the new threshold (its /api/v1/rules),
   `--edits` times, each split into who spends the time:
   - operator (this project): edit → the PrometheusRule carries the threshold;
   - Prometheus Operator: PrometheusRule → its rule ConfigMap carries it;
   - volume update: ConfigMap → the file in the Prometheus pod's volume (here a watch of the kubelet
     stand-in; a real kubelet takes up to its sync period plus its cache TTL, about a minute by default);
   - config reloader + reload: file → Prometheus serves the new rule (the reloader's 1 s delay, then
     Prometheus' reload);
   - evaluation: → Prometheus' first evaluation of the new rule (the evaluation interval).
2. A ServiceMonitor (a copy of the operator's) created → its target up, split into
   - Prometheus Operator: created → the generated configuration Secret has the scrape job;
   - volume update, config reloader + reload: as above, up to Prometheus' reload;
   - discovery + first scrape: → the target is up;
   twice: `--monitors` times as the first configuration change after the config reloader started (its
   container restarted before each), and `--later-monitors` times as any later change. The reloader
   watches the configuration file itself; the kubelet replaces that file on every update, so its watch
   sees the first change only and later ones wait for its periodic check, every 3 minutes
   (prometheus-operator#7366, open for v0.85). Rule files are in a watched directory: edits are not affected.
Polling runs in parallel threads every 20 ms, so each stage boundary is known to within ~20 ms.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import math
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slm_devtools import dataplane as dp  # noqa: E402
from slm_devtools.cluster import LocalCluster  # noqa: E402
from slm_devtools.localpods import LocalPod  # noqa: E402
from slm_devtools.promstack import PrometheusStack, StackSettings, wait_reloader_watching  # noqa: E402

ALERT = "SLMHighErrorRate"
POLL_S = 0.02


class FirstTime:
    """A thread polling `predicate` until it holds; `.at` is then time.time() of the first check that held."""

    def __init__(self, predicate: Callable[[], Any], timeout: float = 120) -> None:
        self.at: float | None = None
        self.value: Any = None
        self._predicate, self._timeout = predicate, timeout
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            try:
                value = self._predicate()
            except Exception:  # not there yet
                value = None
            if value:
                self.at, self.value = time.time(), value
                return
            time.sleep(POLL_S)

    def wait(self, what: str) -> float:
        self._thread.join(self._timeout + 5)
        if self.at is None:
            raise TimeoutError(f"{what} not seen within {self._timeout:.0f}s")
        return self.at


def projected_after(pod: LocalPod, volume: str, since: float) -> float | None:
    return next((at for at, name in list(pod.projections) if name == volume and at >= since), None)


def reload_time(prometheus_url: str) -> float:
    """prometheus_config_last_reload_success_timestamp_seconds, read from Prometheus' own /metrics."""
    with urllib.request.urlopen(f"{prometheus_url}/metrics", timeout=5) as response:  # noqa: S310
        for line in response.read().decode().splitlines():
            if line.startswith("prometheus_config_last_reload_success_timestamp_seconds "):
                return float(line.split()[1])
    raise RuntimeError("no prometheus_config_last_reload_success_timestamp_seconds")


def rfc3339(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def edit_cycle(plane: dp.MonitoringPlane, stack: PrometheusStack, value: float, api: Any) -> dict[str, float]:
    from kubernetes import client

    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    namespace, name = plane.namespace, plane.name
    marker = f"> {value:g}"
    rule_map = f"prometheus-{stack.prometheus_name}-rulefiles-0"
    pod = stack.prometheus_pod
    assert pod is not None

    def rule_has() -> bool:
        rule = custom.get_namespaced_custom_object("monitoring.coreos.com", "v1", namespace, "prometheusrules", name)
        return any(marker in str(r.get("expr")) for g in rule["spec"]["groups"] for r in g["rules"]
                   if r.get("alert") == ALERT)

    def config_map_has() -> bool:
        data = core.read_namespaced_config_map(rule_map, stack.namespace).data or {}
        return any(f"{namespace}-{name}-" in key and marker in text for key, text in data.items())

    def loaded() -> dict[str, Any] | None:
        for group in stack.loaded_rule_groups(namespace, name):
            for rule in group["rules"]:
                if rule.get("name") == ALERT and marker in rule.get("query", ""):
                    return dict(rule)
        return None

    edited = time.time()
    pollers = {"rule": FirstTime(rule_has), "config_map": FirstTime(config_map_has), "loaded": FirstTime(loaded)}
    custom.patch_namespaced_custom_object("slm.dev", "v1alpha1", namespace, "slmdeployments", name,
                                         {"spec": {"monitoring": {"alerts": {"errorRate": {"threshold": value}}}}})
    t_rule = pollers["rule"].wait("the PrometheusRule")
    t_map = pollers["config_map"].wait("the rule ConfigMap")
    t_loaded = pollers["loaded"].wait("the rule in /api/v1/rules")
    t_file = projected_after(pod, rule_map, edited) or t_loaded
    t_eval = FirstTime(lambda: (rule := loaded()) and rfc3339(rule["lastEvaluation"]) >= t_loaded).wait(
        "an evaluation of the new rule")
    return {
        "operator_s": t_rule - edited,
        "prometheus_operator_s": max(0.0, t_map - t_rule),
        "volume_update_s": max(0.0, t_file - t_map),
        "reloader_and_reload_s": max(0.0, t_loaded - t_file),
        "evaluation_s": max(0.0, t_eval - t_loaded),
        "total_s": t_eval - edited,
    }


def monitor_cycle(plane: dp.MonitoringPlane, stack: PrometheusStack, index: int, api: Any, *,
                  fresh_reloader: bool) -> dict[str, float]:
    from kubernetes import client

    if fresh_reloader:
        assert stack.prometheus_pod is not None
        stack.prometheus_pod.restart_container("config-reloader")
        wait_reloader_watching(stack.prometheus_pod)
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    namespace = plane.namespace
    original = custom.get_namespaced_custom_object("monitoring.coreos.com", "v1", namespace, "servicemonitors",
                                                   plane.name)
    name = f"bench-{index}"
    # Only the label kube-prometheus-stack's Prometheus selects by: the operator prunes what carries its own.
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
               "metadata": {"name": name, "namespace": namespace, "labels": {"release": stack.settings.release}},
               "spec": original["spec"]}
    pool = f"serviceMonitor/{namespace}/{name}/0"
    pod = stack.prometheus_pod
    assert pod is not None

    def secret_has() -> bool:
        data = core.read_namespaced_secret(f"prometheus-{stack.prometheus_name}", stack.namespace).data
        return f"job_name: {pool}" in gzip.decompress(base64.b64decode(data["prometheus.yaml.gz"])).decode()

    created = time.time()
    pollers = {"secret": FirstTime(secret_has),
               "up": FirstTime(lambda: stack.prometheus.targets_up(pool), timeout=120 if fresh_reloader else 240)}
    custom.create_namespaced_custom_object("monitoring.coreos.com", "v1", namespace, "servicemonitors", monitor)
    try:
        t_secret = pollers["secret"].wait("the generated configuration")
        try:
            t_up = pollers["up"].wait("the target up")
        except TimeoutError as error:
            raise TimeoutError(f"{error}: {'; '.join(stack.explain_service_monitor(namespace, name))}") from None
        t_file = projected_after(pod, "config", created) or t_up
        t_reload = reload_time(stack.prometheus.url)
    finally:
        # Its removal reaches Prometheus with the next reload; each cycle's monitor has a name of its own. The
        # next cycle restarts the reloader only once the removal is in the pod's volume, else that change
        # would be the one its fresh watch sees.
        custom.delete_namespaced_custom_object("monitoring.coreos.com", "v1", namespace, "servicemonitors", name)
        dp.wait_until(lambda: f"job_name: {pool}" not in gzip.decompress(
            (pod.volume_dir("config") / "prometheus.yaml.gz").read_bytes()).decode(), timeout=60,
            what="the removal in the pod's volume")
    return {
        "prometheus_operator_s": t_secret - created,
        "volume_update_s": max(0.0, t_file - t_secret),
        "reloader_and_reload_s": max(0.0, t_reload - t_file),
        "discovery_and_scrape_s": max(0.0, t_up - max(t_reload, t_file)),
        "total_s": t_up - created,
    }


def summarize(cycles: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {key: {"p50": round(statistics.median(c[key] for c in cycles), 3),
                  "p95": round(percentile([c[key] for c in cycles], 95), 3)} for key in cycles[0]}


def print_table(title: str, summary: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"  {'stage':<26} {'p50 s':>8} {'p95 s':>8}")
    for key, values in summary.items():
        print(f"  {key.removesuffix('_s'):<26} {values['p50']:>8.2f} {values['p95']:>8.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--monitors", type=int, default=10,
                        help="ServiceMonitors created as the first change after a reloader start")
    parser.add_argument("--later-monitors", type=int, default=3, help="ServiceMonitors as later changes (slow: ~3 min)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from slm_devtools.tinymodel import ensure_tiny_model

    model = ensure_tiny_model()
    with tempfile.TemporaryDirectory(prefix="bench-promop-") as tmp, \
            LocalCluster.start(Path(tmp) / "cluster") as cluster:
        stack = PrometheusStack(cluster, Path(tmp) / "stack", settings=StackSettings())
        with stack.running():
            plane = dp.MonitoringPlane(cluster, stack, Path(tmp) / "plane", name="bench", load_rate=2.0)
            plane.start(model)
            try:
                api = cluster.api_client()
                edits = [edit_cycle(plane, stack, round(0.11 + 0.01 * i, 2), api) for i in range(args.edits)]
                monitors = [monitor_cycle(plane, stack, i, api, fresh_reloader=True) for i in range(args.monitors)]
                later = [monitor_cycle(plane, stack, 100 + i, api, fresh_reloader=False)
                         for i in range(args.later_monitors)]
            finally:
                plane.stop()
        setup = {"control_plane_s": round(cluster.boot_seconds, 1),
                 **{f"{k.replace(' ', '_')}_s": round(v, 1) for k, v in stack.timings.items()}}
    result = {"edits": summarize(edits), "monitors": summarize(monitors),
              "later_monitors": summarize(later) if later else {}, "setup": setup,
              "scrape_interval": stack.settings.scrape_interval,
              "evaluation_interval": stack.settings.evaluation_interval,
              "raw": {"edits": edits, "monitors": monitors, "later_monitors": later}}
    print_table(f"threshold edit → evaluated by Prometheus ({args.edits} edits)", result["edits"])
    print_table(f"ServiceMonitor created → target up, first change after a reloader start ({args.monitors})",
                result["monitors"])
    if later:
        print_table(f"ServiceMonitor created → target up, a later change ({args.later_monitors})",
                    result["later_monitors"])
    print(f"\nset-up: {json.dumps(setup)}; scrape and evaluation interval "
          f"{stack.settings.scrape_interval}/{stack.settings.evaluation_interval}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
