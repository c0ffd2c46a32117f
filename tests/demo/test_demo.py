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
    assert 'SLMHighErrorRate: slm:error_ratio:rate30s{namespace="llm",job="tiny-demo"} > 0.2' in output
    assert re.search(r"Prometheus evaluates the new threshold [\d.]+s after the edit \(reloaded by the Prometheus "
                     r"Operator's config reloader\)", output), output
    assert re.search(r"target http://127\.\d+\.\d+\.\d+:8000/metrics \(instance 10\.\d+\.\d+\.\d+:8000\) is up",
                     output), output
    assert re.search(r"\| tiny-demo scrape targets up\s+\| 1/1", output), output
    assert re.search(r"\| Prometheus UI\s+\| http://127\.\d+\.\d+\.\d+:9090", output), output
    assert "every process stopped" in output

    assert processes_mentioning(str(workdir)) == []
