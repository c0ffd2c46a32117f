"""The real llama-server (built by `make deps` from the pinned llama.cpp sources) started with exactly the
arguments slm_operator.runtimes renders — only the executable's path differs from the image's
/app/llama-server — serving the tiny model the project converted to GGUF (slm_devtools.gguf), on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import math
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from slm_devtools.gguf import ensure_tiny_gguf
from slm_devtools.tinymodel import ensure_tiny_model
from slm_devtools.tools import REPO_ROOT, tool
from slm_operator.runtimes import render_runtime

pytestmark = pytest.mark.dataplane
PROMPT = "The module provides"
MAPPING = yaml.safe_load((REPO_ROOT / "operator/slm_operator/monitoring/data/runtime_metrics.yaml").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(args: list[str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("w") as out:
        process = subprocess.Popen([tool("llama-server"), *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_healthy(base: str, process: subprocess.Popen, log: Path, deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"llama-server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"llama-server not healthy within {deadline_s} s:\n{log.read_text()[-3000:]}")


def rendered(port: int, gguf: Path) -> dict:
    return render_runtime("llamacpp", model=str(gguf), served_model_name="tiny", port=port, max_context=256,
                          gpus=0, host="127.0.0.1", extra_args=["--threads", "1"])


@pytest.fixture(scope="module")
def gguf() -> Path:
    return ensure_tiny_gguf(log=lambda *_: None)


@pytest.fixture(scope="module")
def server(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    container = rendered(port, gguf)
    assert container["args"][-3:] == ["--metrics", "--threads", "1"]
    log = tmp_path_factory.mktemp("llama") / "llama-server.log"
    with llama_server(container["args"], log) as process:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, process, log)
        yield base


def test_completion_returns_the_log_probabilities_the_model_computes(server: str):
    """Per-token log-probabilities from the OpenAI route: what the sidecar turns into perplexity. They
    match the PyTorch tiny model's (so the GGUF conversion kept the weights and the tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reply = httpx.post(f"{server}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 1,
    })
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    tokens = choice["logprobs"]["content"]
    assert len(tokens) == 6
    assert all(t["logprob"] <= 0 and math.isfinite(t["logprob"]) for t in tokens)

    directory = ensure_tiny_model(log=lambda *_: None)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = tokenizer.encode(PROMPT) + [t["id"] for t in tokens]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits.double(), dim=-1)
    prompt_length = len(ids) - len(tokens)
    for i, token in enumerate(tokens):
        position = prompt_length + i - 1
        assert int(expected[position].argmax()) == token["id"]  # greedy: the model's own choice
        assert abs(float(expected[position, token["id"]]) - token["logprob"]) < 1e-3


def test_models_route_answers_to_the_served_name(server: str):
    ids = [m["id"] for m in httpx.get(f"{server}/v1/models", timeout=10).json()["data"]]
    assert ids == ["tiny"]


def test_metrics_expose_every_series_the_mapping_reads_and_count_the_work(server: str):
    httpx.post(f"{server}/v1/completions", timeout=60,
               json={"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "temperature": 0})
    text = httpx.get(f"{server}/metrics", timeout=10).text
    samples = {
        line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")
    }
    for signal, row in MAPPING["runtimes"]["llamacpp"]["metrics"].items():
        if "missing" not in row:
            assert row["name"] in samples, (signal, row["name"])
            assert f"# TYPE {row['name']} {row['type']}" in text, signal
    assert samples["llamacpp:tokens_predicted_total"] >= 5
    assert samples["llamacpp:prompt_tokens_total"] >= 3
    assert samples["llamacpp:requests_processing"] == 0  # nothing in flight once the replies are in


def test_without_the_metrics_flag_there_is_no_metrics_endpoint(gguf: Path, tmp_path: Path):
    """Why the operator owns --metrics: drop it and Prometheus would scrape an error."""
    port = free_port()
    args = [a for a in rendered(port, gguf)["args"] if a != "--metrics"]
    log = tmp_path / "llama-server.log"
    with llama_server(args, log) as process:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, process, log)
        assert httpx.get(f"{base}/metrics", timeout=10).status_code == 501


def test_every_flag_the_operator_owns_is_one_llama_server_knows():
    """The guard on runtimeArgs guards real flags: each owned flag (and alias) is in llama-server's --help."""
    from slm_operator.runtimes import OWNED_FLAGS

    done = subprocess.run([tool("llama-server"), "--help"], capture_output=True, text=True, timeout=60, check=False)
    known = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", done.stdout + done.stderr))
    assert len(known) > 100  # the help text was read
    assert sorted(OWNED_FLAGS["llamacpp"] - known) == []


def test_the_example_runs_on_the_real_llama_server(gguf: Path, tmp_path: Path):
    """examples/llamacpp.yaml's container, as `kubectl apply` of it renders it, run by llama-server itself:
    only the volume path (/data, the claim) and the pod's address differ, as a kubelet would map them."""
    from tests.runtimes.conftest import example_container

    args = example_container("llamacpp")["args"]
    assert args[:2] == ["--model", "/data/qwen2.5-0.5b-instruct-q4_k_m.gguf"]
    claim = tmp_path / "claim"
    claim.mkdir()
    (claim / "qwen2.5-0.5b-instruct-q4_k_m.gguf").symlink_to(gguf)
    port = free_port()
    local = [str(claim / a.removeprefix("/data/")) if a.startswith("/data/") else a for a in args]
    local[local.index("--host") + 1] = "127.0.0.1"
    local[local.index("--port") + 1] = str(port)
    log = tmp_path / "llama-server.log"
    with llama_server(local, log) as process:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, process, log)
        assert [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=10).json()["data"]] == ["qwen2.5-0.5b"]
        props = httpx.get(f"{base}/props", timeout=10).json()
        assert props["total_slots"] == 2  # the example's --parallel 2 reached the server
        assert httpx.get(f"{base}/metrics", timeout=10).status_code == 200  # --metrics
