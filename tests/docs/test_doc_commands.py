"""Every command in the README and docs/ is executed by a test or a check — no stale commands.

Fenced blocks tagged `sh` are run here, in order, against the local control plane with the pinned
kubectl/helm first on PATH (the operator running as a process under the chart's ServiceAccount, as in
a cluster where its pod would run). Blocks tagged `sh network` need the internet (public Helm repos),
and `sh docker` need a Docker engine: neither exists here, so their commands are checked instead —
the tool and subcommand must exist and accept the flags (`--help` parses them), and make targets must
exist (`make -n`). The README's two commands are run by CI (`.ci/run`) and by tests/demo.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from slm_devtools import tools
from slm_devtools.cluster import ClusterBase, wait_for
from slm_devtools.operator_process import OperatorProcess

ROOT = tools.REPO_ROOT
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)(?:[ \t]+(\S+))?[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(tag: str | None) -> list[tuple[Path, str]]:
    """(file, command) for every line of every ```sh block with that extra tag (None: untagged)."""
    found = []
    for path in DOCS:
        for language, extra, body in FENCE.findall(path.read_text()):
            if language != "sh" or (extra or None) != tag:
                continue
            for line in body.splitlines():
                command = line.split(" # ")[0].strip()
                if command and not command.startswith("#"):
                    found.append((path, command))
    return found


def test_the_docs_have_commands_to_check() -> None:
    assert len(blocks(None)) >= 8
    assert blocks("network")
    assert blocks("docker")


def test_readme_commands_are_what_ci_and_the_demo_test_run() -> None:
    readme = [c for p, c in blocks(None) if p.name == "README.md"]
    assert readme == ["make demo", "make test"]
    assert re.search(r"^\s*(time )?make test\s*$", (ROOT / ".ci" / "run").read_text(), re.MULTILINE)
    makefile = (ROOT / "Makefile").read_text()
    assert "-m slm_devtools demo" in makefile  # what tests/demo/test_demo.py runs


@pytest.mark.parametrize("command", [c for _, c in blocks("network")])
def test_network_commands_are_valid(command: str) -> None:
    """helm's own parser accepts the subcommand and every flag (`--help` exits 0 without acting)."""
    argv = shlex.split(command)
    assert argv[0] == "helm", f"only helm needs the network in the docs, got: {command}"
    result = subprocess.run([tools.tool("helm"), *argv[1:], "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", [c for _, c in blocks("docker")])
def test_docker_commands_are_make_targets(command: str) -> None:
    argv = shlex.split(command)
    assert argv[0] == "make", command
    result = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, check=False,
                            env={**os.environ, "HOME": os.environ.get("HOME", "/root")})
    assert result.returncode == 0, result.stderr


@pytest.mark.e2e
def test_install_guide_commands_work_as_written(cluster: ClusterBase, tmp_path: Path) -> None:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PATH": f"{tools.bin_dir()}:{os.environ['PATH']}"}
    commands = [c for p, c in blocks(None) if p.name == "install.md"]
    assert commands[0].startswith("helm install slm-monitoring charts/slm-monitoring")
    cluster.install_prometheus_operator_crds()
    operator: OperatorProcess | None = None
    try:
        for command in commands:
            result = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True,  # noqa: S602
                                    text=True, timeout=300, check=False)
            assert result.returncode == 0, f"`{command}` failed:\n{result.stdout}\n{result.stderr}"
            if command.startswith("helm install slm-monitoring"):
                # In a cluster the chart's pod would run the operator; here KWOK fakes that pod, so the
                # operator runs as a process holding only the chart's ServiceAccount token.
                kubeconfig = cluster.kubeconfig_for_service_account("slm-system", "slm-monitoring-operator")
                operator = OperatorProcess(kubeconfig, tmp_path / "operator", resync_seconds=3)
                operator.start()
            if command.startswith("kubectl patch slmdeployment"):
                wait_for("the PrometheusRule to follow the patch", lambda: "> 0.1" in cluster.kubectl(
                    "get", "prometheusrule", "phi-mini", "-n", "llm", "-o", "yaml").stdout, timeout=30)
    finally:
        if operator is not None:
            operator.stop()
        subprocess.run("helm uninstall slm-monitoring --namespace slm-system --wait", shell=True,  # noqa: S602
                       env=env, capture_output=True, check=False, timeout=120)
        cluster.kubectl("delete", "namespace", "llm", "slm-system", "--wait=false", "--ignore-not-found")
