"""docs/logging.md: the processor snippet is the chart's, and every command in it works as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import urllib.error
import uuid
from pathlib import Path

import pytest
import yaml

from slm_devtools import tools
from slm_devtools.cluster import ClusterBase
from slm_devtools.dataplane import wait_until
from slm_devtools.logplane import VictoriaLogs, collector_config, render_chart, store_objects

DOC = tools.REPO_ROOT / "docs" / "logging.md"


def _snippet() -> dict:
    text = DOC.read_text()
    match = re.search(r"<!-- processor-snippet:[^>]*-->\n```yaml\n(.*?)```", text, re.S)
    assert match, "docs/logging.md has no processor snippet"
    snippet: dict = yaml.safe_load(match.group(1))
    return snippet


def test_processor_snippet_parses_the_lines_as_the_chart_does() -> None:
    chart = collector_config(render_chart())
    snippet = _snippet()
    assert snippet["receivers"]["filelog"]["operators"] == chart["receivers"]["filelog"]["operators"]
    assert snippet["processors"]["filter/slm-pods"] == chart["processors"]["filter/slm-pods"]
    for key, value in snippet["processors"]["k8s_attributes"].items():
        assert chart["processors"]["k8s_attributes"][key] == value, key
    assert set(snippet["receivers"]["filelog"]["include"]) <= set(chart["receivers"]["filelog"]["include"])


def _sh_blocks() -> list[list[str]]:
    """The commands of every ```sh block of docs/logging.md, continuation lines joined, comments dropped."""
    found = []
    for body in re.findall(r"^```sh\n(.*?)^```", DOC.read_text(), re.S | re.M):
        commands, current = [], ""
        for line in body.splitlines():
            if line.lstrip().startswith("#") and not current:
                continue
            current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
            if not line.endswith("\\"):
                commands.append(current)
                current = ""
        found.append([c for c in commands if c])
    return found


def test_every_logsql_query_in_the_docs_is_accepted_by_victorialogs(tmp_path: Path) -> None:
    """The queries of the "query the bundled store" commands, run against the chart's VictoriaLogs."""
    store = VictoriaLogs(store_objects(render_chart())["StatefulSet"], tmp_path).start()
    try:
        queries = [shlex.split(c)[-1].removeprefix("query=") for block in _sh_blocks() for c in block
                   if c.startswith("curl ") and "/select/logsql/query" in c]  # fmt: skip
        assert len(queries) == 3
        for query in queries:
            assert store.query(query) == []  # parsed and run (an empty store); a syntax error raises
        with pytest.raises(urllib.error.HTTPError):
            store.query("_time:1h slm.deployment:=")
    finally:
        store.stop()


@pytest.mark.e2e
def test_install_and_credential_commands_work_as_written(cluster: ClusterBase, tmp_path: Path) -> None:
    """The install commands (a privileged namespace, `logs.enabled=true`) and the bring-your-own-store
    ones, run as written against the real API server, in a namespace and release of this test's own:
    the collector's pods are admitted on every node, and then ship to the store of values-logs.yaml."""
    install, _queries, credentials = _sh_blocks()
    namespace, release = f"logs-{uuid.uuid4().hex[:6]}", f"logs-{uuid.uuid4().hex[:6]}"
    values = re.search(r"```yaml\n# values-logs.yaml\n(.*?)```", DOC.read_text(), re.S)
    assert values
    (tmp_path / "values-logs.yaml").write_text(values.group(1))
    (tmp_path / "charts").symlink_to(tools.REPO_ROOT / "charts")
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PATH": f"{tools.bin_dir()}:{os.environ['PATH']}"}

    def run(command: str) -> None:
        command = command.replace("slm-system", namespace)
        for verb in ("install", "upgrade"):
            command = command.replace(f"helm {verb} slm-monitoring", f"helm {verb} {release}")
        result = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,  # noqa: S602
                                timeout=300, check=False)  # fmt: skip
        assert result.returncode == 0, f"`{command}` failed:\n{result.stdout}\n{result.stderr}"

    nodes = len(cluster.kubectl_json("get", "nodes")["items"])
    collector = f"{release}-slm-monitoring-log-collector"

    def collector_pods() -> int:
        selector = "app.kubernetes.io/component=log-collector"
        return len(cluster.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"])

    try:
        for command in install:
            run(command)
        wait_until(lambda: collector_pods() == nodes, timeout=60, what="a collector pod on every node")
        assert cluster.kubectl_json("get", "statefulset", f"{release}-slm-monitoring-victorialogs", "-n", namespace)
        for command in credentials:
            run(command)
        config = cluster.kubectl_json("get", "configmap", collector, "-n", namespace)["data"]["config.yaml"]
        assert 'endpoint: "http://loki-gateway.loki.svc/otlp"' in config
        assert "Authorization: ${file:/secrets/exporter/authorization}" in config
        assert cluster.kubectl("get", "statefulset", f"{release}-slm-monitoring-victorialogs", "-n", namespace,
                               check=False).returncode != 0  # fmt: skip
        wait_until(lambda: collector_pods() == nodes, timeout=60, what="the collector pods after the upgrade")
    finally:
        subprocess.run(f"helm uninstall {release} --namespace {namespace} --wait", shell=True, env=env,  # noqa: S602
                       capture_output=True, check=False, timeout=120)  # fmt: skip
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", "--ignore-not-found")
