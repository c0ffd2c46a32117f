"""The stand-ins of vLLM, SGLang and TGI (slm_devtools.standin) listen where the rendered flags say and
answer the runtime's health path, so local pods of those runtimes can pass their readiness probes."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

from slm_devtools.standin import listen_address
from slm_operator.runtimes import render_runtime


@pytest.mark.parametrize(("runtime", "served"), [("vllm", "qwen"), ("sglang", "qwen"), ("tgi", "Qwen/Qwen2.5-0.5B")])
def test_the_address_and_name_come_from_the_rendered_flags(runtime: str, served: str) -> None:
    args = render_runtime(runtime, model="Qwen/Qwen2.5-0.5B", served_model_name="qwen", port=8080,
                          host="127.0.0.9", max_context=512)["args"]
    assert listen_address(runtime, args) == ("127.0.0.9", 8080, served)  # TGI serves under the model id


def test_it_answers_the_health_path_and_says_it_is_not_the_runtime() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = render_runtime("vllm", model="org/m", served_model_name="m", port=port, host="127.0.0.1")["args"]
    process = subprocess.Popen([sys.executable, "-m", "slm_devtools.standin", "vllm", *args])
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"{base}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None, "the stand-in did not listen"
                time.sleep(0.1)
        assert health.status_code == 200
        assert [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=2).json()["data"]] == ["m"]
        completion = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "x"}, timeout=2)
        assert completion.status_code == 501 and "stand-in" in completion.json()["error"]["message"]
    finally:
        process.terminate()
        process.wait(10)
