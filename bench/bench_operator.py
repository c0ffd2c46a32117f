"""Operator benchmark (issue 3's figures) on a local control plane with KWOK GPU nodes.

    .venv/bin/python bench/bench_operator.py [--count 200] [--samples 20] [--kubeconfig PATH] [--json OUT]
    .venv/bin/python bench/bench_operator.py --churn 2000 [--kubeconfig PATH] [--json OUT]

Measures, with the operator running as a real process:
  1. apply -> all children exist (p50/p95), one SLMDeployment at a time;
  2. threshold edit -> PrometheusRule updated (p95);
  3. `count` SLMDeployments (1 GPU each) applied at once -> all Ready (seconds);
  4. API writes per no-op resync of all of them (the operator's own slm_operator_api_writes_total);
  5. operator RSS with `count` resources.
Goals (issue 3): p95 <= 1 s, p95 <= 2 s, <= 60 s, 0, <= 256 MiB.

With --churn N, only the churn benchmark (issue 23.3): N SLMDeployments created and deleted, in batches
of --batch at once, each waited for until the operator has reconciled it and then until it is gone;
the operator's RSS is sampled every 200 cycles. Goal: after the first 200 cycles RSS stays within 10 %
of its value there (what is kept per SLMDeployment is dropped when it is deleted).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slm_devtools.cluster import ClusterBase, ExistingCluster, LocalCluster, wait_for
from slm_devtools.operator_process import OperatorProcess, install_crd
from slm_operator.kube import Kube

CHILDREN = ("Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule", "ConfigMap")
GOALS = {"apply_to_children_p95_s": 1.0, "threshold_edit_p95_s": 2.0, "n_to_ready_s": 60.0,
         "writes_per_noop_resync": 0, "operator_rss_mib": 256, "churn_rss_growth_after_200_pct": 10.0}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def slmd(name: str, gpus: int = 1) -> dict[str, Any]:
    return {"apiVersion": "slm.dev/v1alpha1", "kind": "SLMDeployment", "metadata": {"name": name},
            "spec": {"model": {"name": "org/model"}, "resources": {"gpus": gpus}}}


def child_names(name: str) -> list[tuple[str, str]]:
    return [(k, f"{name}-dashboard" if k == "ConfigMap" else name) for k in CHILDREN]


def poll(what: str, check: Any, timeout: float, interval: float = 0.01) -> float:
    started = time.monotonic()
    wait_for(what, check, timeout=timeout, interval=interval)
    return time.monotonic() - started


@contextlib.contextmanager
def cluster_for(kubeconfig: str | None) -> Iterator[ClusterBase]:
    if kubeconfig:
        with ExistingCluster.attach(Path(kubeconfig)) as existing:
            yield existing
    else:
        with LocalCluster.start() as local:
            yield local


def churn(args: argparse.Namespace) -> dict[str, Any]:
    """Create and delete args.churn SLMDeployments and follow the operator's RSS."""
    results: dict[str, Any] = {}
    with cluster_for(args.kubeconfig) as cluster, tempfile.TemporaryDirectory() as tmp:
        install_crd(cluster)
        cluster.install_prometheus_operator_crds()
        kube = Kube(cluster.api_client())
        namespace = cluster.new_namespace("bench-churn")
        path = f"/apis/slm.dev/v1alpha1/namespaces/{namespace}/slmdeployments"
        operator = OperatorProcess(cluster.kubeconfig, Path(tmp), resync_seconds=args.resync)
        operator.start()
        samples: list[tuple[int, float]] = []
        started = time.monotonic()
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                for first in range(0, args.churn, args.batch):
                    names = [f"churn-{i:05d}" for i in range(first, min(first + args.batch, args.churn))]
                    bodies = []
                    for name in names:
                        body = slmd(name, gpus=0)
                        body["spec"]["replicas"] = 0  # the operator's work without 2,000 fake pods
                        bodies.append(body)
                    list(pool.map(lambda b: kube.request("POST", path, body=b), bodies))

                    wanted = frozenset(names)

                    def reconciled(wanted: frozenset[str] = wanted) -> bool:
                        return wanted <= {o["metadata"]["name"] for o in kube.list("SLMDeployment", namespace)
                                          if (o.get("status") or {}).get("observedGeneration")}

                    poll("the batch reconciled", reconciled, timeout=120, interval=0.1)
                    list(pool.map(lambda n: kube.request("DELETE", f"{path}/{n}"), names))
                    poll("the batch gone", lambda: not kube.list("SLMDeployment", namespace), timeout=120, interval=0.1)
                    done = first + len(names)
                    if done % 200 == 0 or done == args.churn:
                        samples.append((done, operator.rss_bytes() / 2**20))
                        print(f"churn: {done} cycles, operator RSS {samples[-1][1]:.1f} MiB", flush=True)
        finally:
            operator.stop()
    at_200 = next(rss for done, rss in samples if done >= min(200, args.churn))
    after = [rss for done, rss in samples if done > 200] or [at_200]
    results["churn_cycles"] = args.churn
    results["churn_seconds"] = round(time.monotonic() - started, 1)
    results["churn_rss_mib_at_200"] = round(at_200, 1)
    results["churn_rss_mib_at_end"] = round(samples[-1][1], 1)
    results["churn_rss_mib_max_after_200"] = round(max(after), 1)
    results["churn_rss_growth_after_200_pct"] = round((max(after) - at_200) / at_200 * 100, 1)
    results["churn_rss_samples_mib"] = [round(rss, 1) for _, rss in samples]
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with cluster_for(args.kubeconfig) as cluster, tempfile.TemporaryDirectory() as tmp:
        install_crd(cluster)
        cluster.install_prometheus_operator_crds()
        # Enough fake GPUs for `count` single-GPU deployments plus the latency samples.
        nodes: list[dict[str, Any]] = [{"name": f"bench-gpu-{i}", "gpus": 8, "product": "NVIDIA-L4"}
                 for i in range((args.count + args.samples) // 8 + 2)]
        cluster.create_fake_nodes(nodes)
        cluster.wait_nodes_ready([n["name"] for n in nodes], timeout=120)
        kube = Kube(cluster.api_client())
        operator = OperatorProcess(cluster.kubeconfig, Path(tmp), resync_seconds=args.resync,
                                   extra_env={"SLM_OPERATOR_DISCOVERY_TTL_SECONDS": "10"})  # the default
        operator.start()
        try:
            ns = cluster.new_namespace("bench-latency")
            apply_latency, edit_latency = [], []
            for i in range(args.samples):
                name = f"lat-{i}"
                body = slmd(name)
                body["metadata"]["namespace"] = ns
                started = time.monotonic()
                kube.request("POST", f"/apis/slm.dev/v1alpha1/namespaces/{ns}/slmdeployments", body=body)
                poll("children", lambda n=name: all(kube.get(k, ns, c) is not None for k, c in child_names(n)),
                     timeout=30)
                apply_latency.append(time.monotonic() - started)
            for i in range(args.samples):
                name = f"lat-{i}"
                threshold = round(0.1 + i / 1000, 4)
                started = time.monotonic()
                kube.request("PATCH", f"/apis/slm.dev/v1alpha1/namespaces/{ns}/slmdeployments/{name}",
                             body={"spec": {"monitoring": {"alerts": {"errorRate": {"threshold": threshold}}}}},
                             content_type="application/merge-patch+json")

                def updated(n: str = name, t: float = threshold) -> bool:
                    rule = kube.get("PrometheusRule", ns, n)
                    return rule is not None and str(t) in json.dumps(rule["spec"])

                poll("rule updated", updated, timeout=30)
                edit_latency.append(time.monotonic() - started)
            results["apply_to_children_p50_s"] = round(statistics.median(apply_latency), 3)
            results["apply_to_children_p95_s"] = round(quantile(apply_latency, 0.95), 3)
            results["threshold_edit_p50_s"] = round(statistics.median(edit_latency), 3)
            results["threshold_edit_p95_s"] = round(quantile(edit_latency, 0.95), 3)

            bulk = cluster.new_namespace("bench-bulk")
            # Created through the API by 8 clients at once: `kubectl apply` of 200 documents is itself
            # slower than the operator here (client-side apply reads, then writes, one object at a time).
            path = f"/apis/slm.dev/v1alpha1/namespaces/{bulk}/slmdeployments"
            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(lambda i: kube.request("POST", path, body=slmd(f"fleet-{i:03d}")), range(args.count)))
            results["n_create_s"] = round(time.monotonic() - started, 1)

            def all_deployed() -> bool:
                return len(kube.list("Deployment", bulk)) == args.count

            poll(f"{args.count} Deployments", all_deployed, timeout=600, interval=0.5)
            results["n_children_s"] = round(time.monotonic() - started, 1)  # the operator's share
            m = operator.metrics()
            for trigger in ("create", "status", "child", "resync"):
                count = sum(v for k, v in m.items() if k.startswith("slm_operator_reconcile_duration_seconds_count")
                            and f'trigger="{trigger}"' in k)
                total = sum(v for k, v in m.items() if k.startswith("slm_operator_reconcile_duration_seconds_sum")
                            and f'trigger="{trigger}"' in k)
                results[f"reconciles_{trigger}"] = int(count)
                results[f"reconcile_{trigger}_mean_s"] = round(total / count, 3) if count else 0

            def all_ready() -> bool:
                items = kube.list("SLMDeployment", bulk)
                ready = sum(1 for o in items if any(c["type"] == "Ready" and c["status"] == "True"
                                                    for c in o.get("status", {}).get("conditions", [])))
                return ready == args.count

            poll(f"{args.count} Ready", all_ready, timeout=600, interval=0.5)
            results["n"] = args.count
            results["n_to_ready_s"] = round(time.monotonic() - started, 1)

            # Quiet period, then count writes over whole resync rounds.
            total = args.count + args.samples

            def resyncs() -> float:
                return operator.sum_of("slm_operator_reconciles_total", trigger="resync")

            def settled() -> bool:
                writes, rounds = operator.writes(), resyncs()
                poll("a resync round", lambda: resyncs() >= rounds + total, timeout=120, interval=0.2)
                return operator.writes() == writes

            wait_for("the operator to settle", settled, timeout=300, interval=0)
            writes, rounds = operator.writes(), resyncs()
            poll("3 resync rounds", lambda: resyncs() >= rounds + 3 * total, timeout=300, interval=0.2)
            done_rounds = (resyncs() - rounds) / total
            results["writes_per_noop_resync"] = (operator.writes() - writes) / done_rounds
            results["operator_rss_mib"] = round(operator.rss_bytes() / 2**20, 1)
        finally:
            operator.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--resync", type=float, default=10.0, help="operator resync period (s)")
    parser.add_argument("--kubeconfig", help="an existing cluster (e.g. kind) instead of a local control plane")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--churn", type=int, default=0, help="run only the churn benchmark, with this many cycles")
    parser.add_argument("--batch", type=int, default=20, help="SLMDeployments created and deleted at once (churn)")
    args = parser.parse_args()
    results = churn(args) if args.churn else run(args)
    for key, value in results.items():
        goal = GOALS.get(key)
        verdict = "" if goal is None else ("  ok" if value <= goal else f"  MISSES goal {goal}")
        print(f"{key:32} {value}{verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(results.get(k, 0) <= g for k, g in GOALS.items()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
