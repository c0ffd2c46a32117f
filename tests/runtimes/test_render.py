"""The serving container rendered for each runtime: literal command lines, probes, metrics, and the
flags the operator owns (slm_operator.runtimes). That the runtimes themselves accept these command
lines is proven in test_vllm_parser.py, test_sglang_parser.py, test_tgi_flags.py and test_llamacpp.py."""

from __future__ import annotations

import pytest

from slm_operator.runtimes import RuntimeArgsError, render_runtime, validate_runtime_args

ANY = "0.0.0.0"  # noqa: S104 - the address the runtimes are told to listen on inside the pod
HUB = {"model": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "7ae557604adf67be50417f59c2c2f167def9a775"}


def test_vllm_serves_a_hub_model_with_tensor_parallelism_over_the_pods_gpus():
    c = render_runtime("vllm", **HUB, served_model_name="qwen", port=8000, dtype="bfloat16", max_context=4096, gpus=2)
    assert c["image"] == "docker.io/vllm/vllm-openai:v0.34.0"
    assert c["command"] == ["vllm", "serve"]
    assert c["args"] == [
        "Qwen/Qwen2.5-0.5B-Instruct", "--host", ANY, "--port", "8000", "--served-model-name", "qwen",
        "--revision", "7ae557604adf67be50417f59c2c2f167def9a775", "--dtype", "bfloat16",
        "--max-model-len", "4096", "--tensor-parallel-size", "2",
    ]
    assert c["probes"]["readiness"] == {"httpGet": {"path": "/health", "port": 8000}}
    assert c["probes"]["liveness"] == {"httpGet": {"path": "/health", "port": 8000}}
    assert c["metrics"] == {"path": "/metrics", "port": 8000}
    assert c["needsShm"] is True
    assert c["hfTokenEnv"] == "HF_TOKEN"


def test_vllm_reads_a_local_directory_without_revision_and_keeps_extra_flags_last():
    c = render_runtime("vllm", model="/data/phi-3", revision="main", served_model_name="phi", port=8000,
                       gpus=1, extra_args=["--gpu-memory-utilization", "0.85", "--enable-prefix-caching"])
    assert c["args"] == [
        "/data/phi-3", "--host", ANY, "--port", "8000", "--served-model-name", "phi", "--dtype", "auto",
        "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.85", "--enable-prefix-caching",
    ]


def test_sglang_switches_its_metrics_on():
    c = render_runtime("sglang", **HUB, served_model_name="qwen", port=30000, dtype="float16", max_context=8192, gpus=4)
    assert c["image"] == "docker.io/lmsysorg/sglang:v0.5.23"
    assert c["command"] == ["python3", "-m", "sglang.launch_server"]
    assert c["args"] == [
        "--model-path", "Qwen/Qwen2.5-0.5B-Instruct", "--host", ANY, "--port", "30000",
        "--served-model-name", "qwen", "--revision", "7ae557604adf67be50417f59c2c2f167def9a775",
        "--dtype", "float16", "--context-length", "8192", "--tp-size", "4", "--enable-metrics",
    ]
    assert c["metrics"] == {"path": "/metrics", "port": 30000}
    assert c["needsShm"] is True


def test_tgi_shards_over_the_gpus_and_answers_to_the_model_id():
    c = render_runtime("tgi", **HUB, served_model_name="qwen", port=8080, dtype="bfloat16", max_context=4096, gpus=2)
    assert c["image"] == "ghcr.io/huggingface/text-generation-inference:3.3.7"
    assert c["command"] == ["/tgi-entrypoint.sh"]
    assert c["args"] == [
        "--model-id", "Qwen/Qwen2.5-0.5B-Instruct", "--revision", "7ae557604adf67be50417f59c2c2f167def9a775",
        "--dtype", "bfloat16", "--max-total-tokens", "4096", "--num-shard", "2", "--hostname", ANY,
        "--port", "8080", "--prometheus-port", "9000", "--huggingface-hub-cache", "/cache/huggingface/hub",
    ]
    assert c["ports"] == {"http": 8080, "prometheus": 9000}
    assert c["servedModelName"] == "Qwen/Qwen2.5-0.5B-Instruct"


def test_tgi_refuses_float32_naming_the_dtype():
    with pytest.raises(RuntimeArgsError, match="dtype float32 is not supported by TGI"):
        render_runtime("tgi", **HUB, served_model_name="q", port=8080, dtype="float32")


def test_llamacpp_serves_a_gguf_file_with_metrics_and_an_alias():
    c = render_runtime(
        "llamacpp", model="/data/tiny.gguf", served_model_name="tiny", port=8080, max_context=256, gpus=0
    )
    assert c["image"] == "ghcr.io/ggml-org/llama.cpp:server-b11312"
    assert c["command"] == ["/app/llama-server"]
    assert c["args"] == [
        "--model", "/data/tiny.gguf", "--host", ANY, "--port", "8080", "--alias", "tiny",
        "--ctx-size", "256", "--metrics",
    ]
    assert c["needsShm"] is False
    assert c["probes"]["startup"] == {"httpGet": {"path": "/health", "port": 8080}}


def test_llamacpp_on_gpus_uses_the_cuda_image_and_downloads_from_the_hub():
    c = render_runtime("llamacpp", model="ggml-org/Qwen3-0.6B-GGUF:Q8_0", served_model_name="q", port=8080, gpus=1)
    assert c["image"] == "ghcr.io/ggml-org/llama.cpp:server-cuda-b11312"
    assert c["args"][:2] == ["--hf-repo", "ggml-org/Qwen3-0.6B-GGUF:Q8_0"]


@pytest.mark.parametrize(("dtype", "revision", "message"), [
    ("bfloat16", None, "a GGUF file fixes its tensor types"),
    ("auto", "v1.0", "cannot be pinned for a hub model"),
])
def test_llamacpp_refuses_what_it_cannot_honour(dtype, revision, message):
    with pytest.raises(RuntimeArgsError, match=message):
        render_runtime("llamacpp", model="org/m-GGUF", revision=revision, served_model_name="m", port=8080, dtype=dtype)


@pytest.mark.parametrize(("runtime", "args", "flag"), [
    ("vllm", ["--port", "9000"], "--port"),
    ("vllm", ["--max_model_len=2048"], "--max-model-len"),
    ("vllm", ["-tp", "2"], "-tp"),
    ("vllm", ["--config", "/etc/vllm.yaml"], "--config"),
    ("sglang", ["--enable-metrics"], "--enable-metrics"),
    ("sglang", ["--tensor-parallel-size", "2"], "--tensor-parallel-size"),
    ("tgi", ["--num-shard=4"], "--num-shard"),
    ("tgi", ["-p", "80"], "-p"),
    ("llamacpp", ["-c", "4096"], "-c"),
    ("llamacpp", ["-hf", "org/other"], "-hf"),
])
def test_an_owned_flag_in_runtime_args_is_refused_by_name(runtime, args, flag):
    with pytest.raises(RuntimeArgsError, match=f"may not set {flag}:"):
        validate_runtime_args(runtime, args)


def test_an_abbreviation_of_an_owned_flag_is_refused_for_argparse_runtimes():
    with pytest.raises(RuntimeArgsError, match="--max-model abbreviates --max-model-len"):
        validate_runtime_args("vllm", ["--max-model", "1024"])
    with pytest.raises(RuntimeArgsError, match="--context abbreviates --context-length"):
        validate_runtime_args("sglang", ["--context=1024"])
    with pytest.raises(RuntimeArgsError, match="--tp abbreviates --tp-size"):
        validate_runtime_args("sglang", ["--tp", "2"])


def test_flags_the_operator_does_not_own_pass_with_their_values():
    validate_runtime_args("vllm", ["--gpu-memory-utilization", "0.9", "--max-num-seqs", "64", "--seed", "-1"])
    validate_runtime_args("sglang", ["--mem-fraction-static", "0.8", "--chunked-prefill-size", "4096"])
    validate_runtime_args("tgi", ["--max-concurrent-requests", "64", "--quantize", "awq"])
    validate_runtime_args("llamacpp", ["--parallel", "4", "--threads", "2", "-ngl", "99"])


def test_unknown_runtime_and_bad_parameters_get_clear_errors():
    with pytest.raises(RuntimeArgsError, match="unknown runtime 'triton'"):
        render_runtime("triton", model="m", served_model_name="m", port=8000)
    with pytest.raises(RuntimeArgsError, match="dtype 'fp8' is not one of"):
        render_runtime("vllm", model="m", served_model_name="m", port=8000, dtype="fp8")
    with pytest.raises(RuntimeArgsError, match="port 0 is out of range"):
        render_runtime("vllm", model="m", served_model_name="m", port=0)
    with pytest.raises(RuntimeArgsError, match="runtimeArgs items must be non-empty strings"):
        validate_runtime_args("vllm", ["--seed", ""])
