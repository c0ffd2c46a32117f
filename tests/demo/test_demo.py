"""`make demo` is part of `make test`: it runs end to end through the real Prometheus Operator, shows what
an SRE would look for, exits by itself and leaves no process behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slm_devtools.tools import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.dataplane, pytest.mark.slow]


def processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def test_demo_runs_end_to_end_and_cleans_up(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "slm_devtools", "demo", "--workdir", str(workdir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    output = result.stdout
    assert result.returncode == 0, f"{output[-4000:]}\n{result.stderr[-4000:]}"

    steps = re.findall(r"^\[\s*(\d+)/(\d+)\]", output, flags=re.MULTILINE)
    assert len(steps) == int(steps[0][1]), output
    assert re.search(r"tiny-demo\s+tiny-gpt2\s+1\s+1\s+Ready", output), output
    assert re.search(r"firing after [\d.]+s; Slack after [\d.]+s, webhook after [\d.]+s, e-mail '\[FIRING:1\] "
                     r"SLMHighErrorRate llm/tiny-demo'", output), output
    assert re.search(r"resolved notification after [\d.]+s", output), output
    # The alert reads what the chart's shared recording rules record, which Prometheus evaluates.
    assert re.search(r"Prometheus evaluates the chart's \d+ shared recording rules \(PrometheusRule "
                     r"slm-system/slm-monitoring-recording-rules\)", output), output
    window = r'\{namespace="llm",job="tiny-demo"\}\[30s\]\)\)'
    assert re.search(rf"SLMHighErrorRate: \( sum by \(namespace, job\) \(rate\(slm:request_errors:pod_total{window} "
                     rf"/ sum by \(namespace, job\) \(rate\(slm:requests:pod_total{window} \) > 0\.2$",
                     output, flags=re.MULTILINE), output
    assert re.search(r"Prometheus evaluates the new threshold [\d.]+s after the edit \(reloaded by the Prometheus "
                     r"Operator's config reloader\)", output), output
    assert re.search(r"target http://127\.\d+\.\d+\.\d+:8000/metrics \(instance 10\.\d+\.\d+\.\d+:8000\) is up",
                     output), output
    assert re.search(r"\| tiny-demo scrape targets up\s+\| 1/1", output), output
    assert re.search(r"\| Prometheus UI\s+\| http://127\.\d+\.\d+\.\d+:9090", output), output
    # The second model, served by the real llama-server behind the monitoring sidecar: its tokens come from
    # llama.cpp's own metrics through the shared recording rules, on the same dashboards as the built-in one.
    tokens = re.search(r"\| qwen-llamacpp \(llama\.cpp\) generated tokens/s\s+\| ([\d.]+)", output)
    assert tokens and float(tokens[1]) > 0, output
    assert re.search(r"\| deployments on the fleet dashboard\s+\| qwen-llamacpp, tiny-demo\s", output), output
    assert "every process stopped" in output

    # Beside the alert: a log query of the faulted deployment a user can run, and the store's answer.
    command = re.search(r"^\s+(curl -s http://127\.0\.0\.1:\d+/select/logsql/query --data-urlencode "
                        r"'query=(.+)')$", output, flags=re.MULTILINE)
    assert command, output
    assert command[2] == ('_time:15m k8s.namespace.name:="llm" slm.deployment:="tiny-demo" '
                          "http.response.status_code:>=500 | sort by (_time desc) | limit 20"), command[2]
    shown = re.search(r"^\s+(\d+) lines, the newest:\n(\s+_time=.*\n)", output[command.end():], flags=re.MULTILINE)
    assert shown and int(shown[1]) >= 1, output
    first = shown[2]
    assert re.search(r"k8s\.pod\.name=tiny-demo-[a-z0-9]+-[a-z0-9]+ ", first), first
    assert re.search(r"http\.response\.status_code=5\d\d ", first) and "http.route=/v1/completions" in first, first

    assert processes_mentioning(str(workdir)) == []
