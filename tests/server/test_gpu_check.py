"""scripts/gpu-check.sh, rehearsed on CPU (`GPU_CHECK_ALLOW_CPU=1`), so that it still runs when a GPU
machine is lent: a session holding one gets a few minutes of it, and a script broken by a change
elsewhere in the server would waste them.

There is no GPU here, so the pynvml vs nvidia-smi comparison and the CUDA device check are not
exercised; everything else is (the tiny model, the server as a process, its /metrics, the
sampling, streaming and structured-output requests, the tokens/s runs with monitoring on and off).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dataplane, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check.sh"


def test_the_gpu_check_runs_every_step_on_cpu(tiny_model_dir):
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine: run scripts/gpu-check.sh itself")
    env = {**os.environ, "GPU_CHECK_ALLOW_CPU": "1", "GPU_CHECK_REQUESTS": "8", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=480, check=False)
    out = result.stdout + result.stderr
    assert "[ok] POST /generate on the GPU server: 200" in out, out
    assert "[ok] model loaded (device=cpu; a rehearsal on CPU)" in out, out
    assert "[ok] no GPU: no nvidia_gpu_* series" in out, out
    assert "[ok] a seeded top_p + top_k sample with penalties: 200, and the same text twice" in out, out
    assert re.search(r"\[ok\] a streamed chat completion: 200, [1-9][0-9]* events", out), out
    assert re.search(r"\[ok\] a prompt that begins like the one before finds its prefix: [0-9]+ prompt tokens", out), (
        out
    )
    assert "[ok] response_format json_schema: 4 sampled choices, each JSON that follows the schema" in out, out
    rates = dict(re.findall(r"^  (monitoring on|monitoring off)\s+([0-9.]+) tokens/s", out, re.MULTILINE))
    assert set(rates) == {"monitoring on", "monitoring off"}, out
    assert all(float(rate) > 0 for rate in rates.values()), out
    batch_line = r"^  (batched|one at a time)\s+[0-9.]+ tokens/s  mean batch\s+([0-9.]+)"
    batched = dict(re.findall(batch_line, out, re.MULTILINE))
    assert set(batched) == {"batched", "one at a time"}, out
    assert "[ok] concurrent generations share forward passes (mean batch > 1.5)" in out, out
    assert "[ok] SLM_MAX_BATCH_SIZE=1: one generation per pass" in out, out
    # On a shared 2-core machine the tokens/s ratio is noise; it is the GPU run's figure to judge.
    failures = re.findall(r"^  \[FAIL\] (.*)$", out, re.MULTILINE)
    assert all(f.startswith("monitoring keeps") for f in failures), out
    assert result.returncode == (1 if failures else 0), out
