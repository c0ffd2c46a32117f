"""Every vLLM and SGLang command line the operator renders is accepted by the runtime's own argument
parser at the pinned version, and means what the operator meant (model, revision, dtype, context, tensor
parallelism, address, served name, metrics).

The parsers are the runtimes' own code, from their PyPI packages in environments of their own
(scripts/deps/runtime-venv.sh: the package, what its parser imports, and the torch it pins; no GPU stack).
They run in one child process per runtime (runtime_parser_driver.py), which also says how vLLM is told
that there is no GPU. A flag renamed or removed upstream fails here when the pin is bumped.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from slm_operator.runtimes import OWNED_FLAGS, RuntimeArgsError, render_runtime, validate_runtime_args
from tests.runtimes.conftest import example_container

# Importing vLLM (torch, transformers) takes minutes on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
DRIVER = Path(__file__).with_name("runtime_parser_driver.py")
ANY = "0.0.0.0"  # noqa: S104 - the address the runtimes are told to listen on inside the pod
REVISION = "7ae557604adf67be50417f59c2c2f167def9a775"

CASES = {
    "hub-bf16-tp2-context": dict(model="Qwen/Qwen2.5-0.5B-Instruct", revision=REVISION, served_model_name="qwen",
                                 port=8000, dtype="bfloat16", max_context=4096, gpus=2),
    "local-path-defaults": dict(model="/data/phi-3", revision="main", served_model_name="phi", port=8000, gpus=1),
    "cpu-pod-float32": dict(model="org/m", served_model_name="m", port=9000, dtype="float32", gpus=0),
}
EXTRA = {
    "vllm": ["--gpu-memory-utilization", "0.85", "--max-num-seqs", "64", "--enable-prefix-caching"],
    "sglang": ["--mem-fraction-static", "0.8", "--chunked-prefill-size", "4096"],
}


def parse(python: Path, runtime: str, argvs: list[list[str]], tmp_path: Path) -> list[dict[str, Any]]:
    todo, results = tmp_path / "argvs.json", tmp_path / "results.json"
    todo.write_text(json.dumps(argvs))
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "PYTHONPATH": ""}
    done = subprocess.run([str(python), str(DRIVER), runtime, str(todo), str(results)], env=env,
                          capture_output=True, text=True, timeout=1500, check=False)
    if done.returncode != 0 or not results.is_file():
        pytest.fail(f"{runtime}'s parser did not run (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(results.read_text())


def rendered_argvs(runtime: str) -> list[list[str]]:
    argvs = [render_runtime(runtime, **params)["args"] for params in CASES.values()]
    argvs.append(render_runtime(runtime, **CASES["local-path-defaults"], extra_args=EXTRA[runtime])["args"])
    return argvs


def test_vllm_parser_accepts_every_rendered_command_line(vllm_python: Path, tmp_path: Path):
    results = parse(vllm_python, "vllm", [*rendered_argvs("vllm"), example_container("vllm")["args"],
                                          ["--list-options"], ["/data/phi-3", "--max-model-length", "8"]], tmp_path)
    options = results.pop(-2)["parsed"]["options"]
    # Every flag the operator keeps out of runtimeArgs is one vLLM has (else the guard guards nothing).
    assert sorted(OWNED_FLAGS["vllm"] - set(options)) == []
    assert [r["ok"] for r in results[:-1]] == [True, True, True, True, True], results
    hub, local, cpu, extra, example = (r["parsed"] for r in results[:-1])
    # examples/vllm.yaml, as `kubectl apply` of it renders it.
    assert example == {"model": "meta-llama/Llama-3.2-1B-Instruct", "revision": "main", "dtype": "bfloat16",
                       "max_model_len": 8192, "tensor_parallel_size": 1,
                       "served_model_name": ["meta-llama/Llama-3.2-1B-Instruct"], "host": ANY, "port": 8080}
    assert hub == {"model": "Qwen/Qwen2.5-0.5B-Instruct", "revision": REVISION, "dtype": "bfloat16",
                   "max_model_len": 4096, "tensor_parallel_size": 2, "served_model_name": ["qwen"],
                   "host": ANY, "port": 8000}
    assert local["model"] == "/data/phi-3" and local["revision"] is None and local["dtype"] == "auto"
    assert cpu["tensor_parallel_size"] == 1 and cpu["dtype"] == "float32" and cpu["port"] == 9000
    assert extra["served_model_name"] == ["phi"]
    # The same parser refuses a misspelt flag: it is the judge, not a rubber stamp.
    assert results[-1]["ok"] is False and "--max-model-length" in results[-1]["error"][0]


def test_sglang_parser_accepts_every_rendered_command_line(sglang_python: Path, tmp_path: Path):
    results = parse(sglang_python, "sglang",
                    [*rendered_argvs("sglang"), example_container("sglang")["args"], ["--list-options"],
                     ["--model-path", "/data/phi-3", "--context-size", "8"],
                     ["--model-path", "/data/phi-3", "--tensor-parallel", "2"]], tmp_path)
    options = results.pop(-3)["parsed"]["options"]
    assert sorted(OWNED_FLAGS["sglang"] - set(options)) == []
    assert [r["ok"] for r in results[:-2]] == [True, True, True, True, True], results
    hub, local, cpu, _extra, example = (r["parsed"] for r in results[:-2])
    # examples/sglang.yaml, as `kubectl apply` of it renders it.
    assert example == {"model_path": "Qwen/Qwen2.5-3B-Instruct", "revision": "main", "dtype": "bfloat16",
                       "context_length": 16384, "tp_size": 2, "served_model_name": "Qwen/Qwen2.5-3B-Instruct",
                       "host": ANY, "port": 8080, "enable_metrics": True}
    assert hub == {"model_path": "Qwen/Qwen2.5-0.5B-Instruct", "revision": REVISION, "dtype": "bfloat16",
                   "context_length": 4096, "tp_size": 2, "served_model_name": "qwen", "host": ANY,
                   "port": 8000, "enable_metrics": True}
    assert local["model_path"] == "/data/phi-3" and local["revision"] is None and local["enable_metrics"] is True
    assert cpu["tp_size"] == 1 and cpu["dtype"] == "float32" and cpu["port"] == 9000
    assert results[-2]["ok"] is False and "--context-size" in results[-2]["error"][0]
    # SGLang's parser takes an abbreviation of a flag for the flag: why runtimeArgs refuses abbreviations.
    assert results[-1]["ok"] is True and results[-1]["parsed"]["tp_size"] == 2
    with pytest.raises(RuntimeArgsError, match="--tensor-parallel abbreviates --tensor-parallel-size"):
        validate_runtime_args("sglang", ["--tensor-parallel", "2"])
