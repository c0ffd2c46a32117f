"""`python -m slm_devtools up|demo`: the local control plane for a developer to look at.

`up` starts the control plane with fake GPU nodes, installs the Prometheus Operator CRDs (with
--monitoring: runs kube-prometheus-stack's monitoring too, slm_devtools.promstack), prints what is there
and how to reach it, then stops (or, with --keep-running, waits for Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import threading
from pathlib import Path

from .cluster import ClusterStartError, LocalCluster
from .promstack import PrometheusStack
from .tools import ToolMissing


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def up(keep_running: bool, monitoring: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="slm-demo-"))
    step(f"starting the local control plane (data in {workdir})")
    try:
        with LocalCluster.start(workdir, keep=keep_running) as cluster:
            step(f"control plane ready in {cluster.boot_seconds:.1f}s at {cluster.server}")
            step("installing the Prometheus Operator CRDs")
            crds = cluster.install_prometheus_operator_crds()
            print(cluster.kubectl("get", "nodes", "-L", "nvidia.com/gpu.product",
                                  "-o", "custom-columns=NODE:.metadata.name,GPUS:.status.allocatable.nvidia\\.com/gpu,"
                                  "PRODUCT:.metadata.labels.nvidia\\.com/gpu\\.product").stdout)
            print(f"{len(crds)} Prometheus Operator CRDs established.")
            print(f"kubeconfig: {cluster.kubeconfig}")
            with contextlib.ExitStack() as running:
                if monitoring:
                    step("starting the Prometheus Operator, Prometheus and Alertmanager (kube-prometheus-stack's "
                         "shape)")
                    stack = running.enter_context(PrometheusStack(cluster, workdir / "stack").running())
                    print(f"Prometheus: {stack.prometheus.url}\nAlertmanager: {stack.alertmanager.url}")
                if keep_running:
                    step("running; press Ctrl-C to stop")
                    stop = threading.Event()
                    signal.signal(signal.SIGTERM, lambda *_: stop.set())
                    with contextlib.suppress(KeyboardInterrupt):
                        stop.wait()
                step("stopping")
    except (ClusterStartError, ToolMissing, RuntimeError, TimeoutError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    step("done: no process left behind")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slm_devtools")
    parser.add_argument("command", choices=["up", "demo"], help="up: only the control plane; demo: everything")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as demo

        return demo(rest)
    return up("--keep-running" in rest, monitoring="--monitoring" in rest)


if __name__ == "__main__":
    sys.exit(main())
