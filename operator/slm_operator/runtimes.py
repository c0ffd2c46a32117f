"""The serving container of each third-party runtime: pure functions, plain types in, plain dicts out.

For vLLM, SGLang, TGI and llama.cpp at their pinned versions (`PINS`), `render_runtime` turns the
parameters the operator derives from an SLMDeployment (model id or local path, revision, dtype, max
context, number of GPUs, port, served model name, extra flags) into what the container needs: image,
command and arguments, static environment, the name of the Hugging Face token variable, probe and
metrics endpoints, whether /dev/shm must be a memory volume, and the flags the operator owns.
`validate_runtime_args` rejects an extra flag the operator owns, with a message naming it.

Nothing here calls the API server. Every command line rendered here is checked in tests by the
runtime itself: vLLM's and SGLang's own argument parsers (their pinned Python packages), the real
`llama-server` binary, and TGI's launcher flags at its pinned tag (tests/runtimes/).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

RUNTIMES = ("vllm", "sglang", "tgi", "llamacpp")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# The name of the variable (not a secret): read by huggingface_hub (vLLM, SGLang), TGI's launcher, llama.cpp.
HF_TOKEN_ENV = "HF_TOKEN"  # noqa: S105
DEFAULT_CACHE_DIR = "/cache"  # a writable emptyDir: the root filesystem stays read-only


class RuntimeArgsError(ValueError):
    """Parameters or extra flags a runtime cannot take; the message names the culprit."""


@dataclasses.dataclass(frozen=True)
class Pin:
    """One runtime at its pinned version: where its code comes from and its default image."""

    runtime: str
    version: str
    image: str
    # Where the tests get the runtime's own code at this version (parser, metric definitions).
    source: str
    # Image for GPU pods when it differs from `image` (llama.cpp ships CPU and CUDA builds apart).
    gpu_image: str | None = None


# The images are upstream's release tags for these versions. No digest: none could be verified from
# public sources for these tags; pin one with `spec.image` (or the chart's values) where required.
PINS: dict[str, Pin] = {
    "vllm": Pin("vllm", "0.34.0", "docker.io/vllm/vllm-openai:v0.34.0", "PyPI vllm==0.34.0"),
    "sglang": Pin("sglang", "0.5.23", "docker.io/lmsysorg/sglang:v0.5.23", "PyPI sglang==0.5.23"),
    "tgi": Pin(
        "tgi",
        "3.3.7",
        "ghcr.io/huggingface/text-generation-inference:3.3.7",
        "github.com/huggingface/text-generation-inference tag v3.3.7 (commit dfb3fbe7)",
    ),
    "llamacpp": Pin(
        "llamacpp",
        "b11312",
        "ghcr.io/ggml-org/llama.cpp:server-b11312",
        "llama.cpp commit 0c1e57098 (b11312), vendored in the PyPI sdist llama-cpp-python==0.3.36",
        gpu_image="ghcr.io/ggml-org/llama.cpp:server-cuda-b11312",
    ),
}

# Flags the operator renders or must keep control of, per runtime, with every alias the runtime
# accepts: those it sets from the spec, a config file that could set them again, and those that would
# move or encrypt the endpoints the probes and Prometheus read (TLS, an API prefix). `spec.runtimeArgs`
# may not carry them (nor, for argparse-based runtimes, an abbreviation of one).
OWNED_FLAGS: dict[str, frozenset[str]] = {
    "vllm": frozenset({
        "--model", "--host", "--port", "--uds", "--served-model-name", "--revision", "--dtype",
        "--max-model-len", "--tensor-parallel-size", "-tp", "--config", "--ssl-keyfile", "--ssl-certfile",
    }),
    "sglang": frozenset({
        "--model-path", "--model", "--host", "--port", "--served-model-name", "--revision", "--dtype",
        "--context-length", "--tp-size", "--tensor-parallel-size", "--enable-metrics", "--config",
        "--ssl-keyfile", "--ssl-certfile",
    }),
    "tgi": frozenset({
        "--model-id", "--revision", "--dtype", "--num-shard", "--sharded", "--hostname", "--port", "-p",
        "--prometheus-port", "--max-total-tokens", "--huggingface-hub-cache",
    }),
    "llamacpp": frozenset({
        "-m", "--model", "-hf", "-hfr", "--hf-repo", "--host", "--port", "-c", "--ctx-size", "-a", "--alias",
        "--metrics", "-mu", "--model-url", "-dr", "--docker-repo", "--api-prefix", "--ssl-key-file", "--ssl-cert-file",
    }),
}
# Runtimes whose parser accepts any unambiguous prefix of a long flag (Python's argparse default).
_ABBREVIATING = frozenset({"vllm", "sglang"})
# TGI opens a second Prometheus listener besides /metrics on its HTTP port; pinned here so it is known.
TGI_PROMETHEUS_PORT = 9000


def _flag_name(token: str, runtime: str) -> str:
    name = token.split("=", 1)[0]
    if runtime == "vllm" and name.startswith("--"):
        name = "--" + name[2:].replace("_", "-")  # vLLM's parser takes --max_model_len as --max-model-len
    return name


def validate_runtime_args(runtime: str, extra_args: Sequence[str]) -> None:
    """Raise RuntimeArgsError naming the first extra flag the operator owns (or a bare positional for vLLM)."""
    _check_runtime(runtime)
    owned = OWNED_FLAGS[runtime]
    for item in extra_args:
        if not isinstance(item, str) or not item:
            raise RuntimeArgsError(f"{runtime}: runtimeArgs items must be non-empty strings, got {item!r}")
        if not item.startswith("-") or item == "-" or _is_number(item):
            continue  # a value of the previous flag
        name = _flag_name(item, runtime)
        if name in owned:
            raise RuntimeArgsError(
                f"{runtime}: runtimeArgs may not set {name}: the operator sets it from the spec "
                f"(flags it owns: {', '.join(sorted(owned))})"
            )
        if runtime in _ABBREVIATING and name.startswith("--") and len(name) > 2:
            shadowed = sorted(flag for flag in owned if flag.startswith("--") and flag.startswith(name))
            if shadowed:
                raise RuntimeArgsError(
                    f"{runtime}: runtimeArgs flag {name} abbreviates {shadowed[0]}, "
                    "which the operator sets from the spec"
                )


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise RuntimeArgsError(f"unknown runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")


def is_local_path(model: str) -> bool:
    """A model given as an absolute path is read from a mounted volume; anything else is a hub id."""
    return model.startswith("/")


def _probe(path: str, port: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}}


def _cache_env(cache_dir: str, *extra: tuple[str, str]) -> list[dict[str, str]]:
    """Writable locations under one emptyDir: the image's HOME is not writable under restricted security."""
    pairs = [("HOME", cache_dir), ("XDG_CACHE_HOME", cache_dir), ("HF_HOME", f"{cache_dir}/huggingface"), *extra]
    return [{"name": name, "value": value} for name, value in pairs]


def render_runtime(
    runtime: str,
    *,
    model: str,
    served_model_name: str,
    port: int,
    revision: str | None = None,
    dtype: str = "auto",
    max_context: int | None = None,
    gpus: int = 1,
    extra_args: Sequence[str] = (),
    host: str = "0.0.0.0",  # noqa: S104 - the pod's own network namespace; Services reach it there
    cache_dir: str = DEFAULT_CACHE_DIR,
) -> dict[str, Any]:
    """The serving container of `runtime` for these parameters, as plain data.

    `model` is a hub id, or an absolute path on a mounted volume (then `revision` is not rendered;
    for llama.cpp a path names the .gguf file). `gpus` is the number of GPUs of the pod: the tensor
    parallel size. Returns::

        {"runtime", "container", "version", "image", "gpuImage", "command": [...], "args": [...],
         "env": [{"name", "value"}], "hfTokenEnv", "port", "ports": {name: port},
         "probes": {"startup"|"liveness"|"readiness": {"httpGet": {"path", "port"}}},
         "metrics": {"path", "port"}, "needsShm", "servedModelName", "ownedFlags": [...]}

    Raises RuntimeArgsError on a parameter the runtime cannot honour or an extra flag it owns.
    """
    _check_runtime(runtime)
    if dtype not in DTYPES:
        raise RuntimeArgsError(f"{runtime}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not model:
        raise RuntimeArgsError(f"{runtime}: a model id or path is required")
    if gpus < 0:
        raise RuntimeArgsError(f"{runtime}: gpus must be >= 0, got {gpus}")
    if max_context is not None and max_context < 1:
        raise RuntimeArgsError(f"{runtime}: max context must be >= 1 token, got {max_context}")
    if not 0 < port < 65536:
        raise RuntimeArgsError(f"{runtime}: port {port} is out of range")
    validate_runtime_args(runtime, extra_args)
    local = is_local_path(model)
    rendered = _RENDERERS[runtime](
        model=model, local=local, served_model_name=served_model_name, port=port, host=host,
        revision=None if local else revision, dtype=dtype, max_context=max_context, gpus=gpus, cache_dir=cache_dir,
    )
    pin = PINS[runtime]
    image = pin.gpu_image if (gpus > 0 and pin.gpu_image) else pin.image
    result: dict[str, Any] = {
        "runtime": runtime,
        # The container's name: Prometheus labels every series it scrapes there `container="<runtime>"`,
        # which the chart's shared recording rules of that runtime select (data/rules.yaml `target`).
        "container": runtime,
        "version": pin.version,
        "image": image,
        "gpuImage": pin.gpu_image,
        "hfTokenEnv": HF_TOKEN_ENV,
        "port": port,
        "ownedFlags": sorted(OWNED_FLAGS[runtime]),
        **rendered,
    }
    result["args"] = [*rendered["args"], *extra_args]
    return result


def _vllm(*, model, local, served_model_name, port, host, revision, dtype, max_context, gpus, cache_dir):
    # `vllm serve MODEL`: the model is positional (vLLM warns that --model will be removed from serve).
    args = [model, "--host", host, "--port", str(port), "--served-model-name", served_model_name]
    if revision:
        args += ["--revision", revision]
    args += ["--dtype", dtype]
    if max_context is not None:
        args += ["--max-model-len", str(max_context)]
    args += ["--tensor-parallel-size", str(max(gpus, 1))]
    health = _probe("/health", port)  # 200 once the engine answers, 503 when it is dead
    return {
        "command": ["vllm", "serve"],
        "args": args,
        "env": _cache_env(cache_dir, ("VLLM_CACHE_ROOT", f"{cache_dir}/vllm")),
        "ports": {"http": port},
        "probes": {"startup": health, "liveness": health, "readiness": health},
        "metrics": {"path": "/metrics", "port": port},  # always on
        # Workers of one engine exchange tensors through shared memory (and NCCL with TP > 1).
        "needsShm": True,
        "servedModelName": served_model_name,
    }


def _sglang(*, model, local, served_model_name, port, host, revision, dtype, max_context, gpus, cache_dir):
    args = ["--model-path", model, "--host", host, "--port", str(port), "--served-model-name", served_model_name]
    if revision:
        args += ["--revision", revision]
    args += ["--dtype", dtype]
    if max_context is not None:
        args += ["--context-length", str(max_context)]
    args += ["--tp-size", str(max(gpus, 1)), "--enable-metrics"]  # no /metrics without --enable-metrics
    health = _probe("/health", port)  # 503 while starting; then runs a one-token generation when idle
    return {
        "command": ["python3", "-m", "sglang.launch_server"],
        "args": args,
        "env": _cache_env(cache_dir),
        "ports": {"http": port},
        "probes": {"startup": health, "liveness": health, "readiness": health},
        "metrics": {"path": "/metrics", "port": port},
        "needsShm": True,  # upstream runs its image with a large --shm-size (NCCL, multiprocess tensors)
        "servedModelName": served_model_name,
    }


_TGI_DTYPES = {"float16": "float16", "bfloat16": "bfloat16"}


def _tgi(*, model, local, served_model_name, port, host, revision, dtype, max_context, gpus, cache_dir):
    args = ["--model-id", model]
    if revision:
        args += ["--revision", revision]
    if dtype != "auto":
        if dtype not in _TGI_DTYPES:
            raise RuntimeArgsError(f"tgi: dtype {dtype} is not supported by TGI (float16 or bfloat16, or auto)")
        args += ["--dtype", _TGI_DTYPES[dtype]]
    if max_context is not None:
        args += ["--max-total-tokens", str(max_context)]
    args += [
        "--num-shard", str(max(gpus, 1)),
        "--hostname", host,
        "--port", str(port),
        "--prometheus-port", str(TGI_PROMETHEUS_PORT),
        "--huggingface-hub-cache", f"{cache_dir}/huggingface/hub",
    ]
    health = _probe("/health", port)  # 200 once the shards answer a health prefill
    return {
        # The image's entrypoint activates the Python environment of the shards, then execs the launcher.
        "command": ["/tgi-entrypoint.sh"],
        "args": args,
        "env": _cache_env(cache_dir),
        "ports": {"http": port, "prometheus": TGI_PROMETHEUS_PORT},
        "probes": {"startup": health, "liveness": health, "readiness": health},
        "metrics": {"path": "/metrics", "port": port},  # always on
        "needsShm": True,  # NCCL between shards; upstream documents --shm-size 1g
        # TGI has no served-name flag: /v1/models answers the model id, and the OpenAI routes accept any name.
        "servedModelName": model,
    }


def _llamacpp(*, model, local, served_model_name, port, host, revision, dtype, max_context, gpus, cache_dir):
    if dtype != "auto":
        raise RuntimeArgsError(
            f"llamacpp: dtype {dtype} cannot be chosen at start: a GGUF file fixes its tensor types (use auto)"
        )
    if revision not in (None, "", "main"):
        raise RuntimeArgsError(
            f"llamacpp: revision {revision!r} cannot be pinned for a hub model (llama-server downloads the "
            "newest file); give the path of a .gguf file on a volume instead"
        )
    args = ["--model", model] if local else ["--hf-repo", model]
    args += ["--host", host, "--port", str(port), "--alias", served_model_name]
    if max_context is not None:
        args += ["--ctx-size", str(max_context)]
    args += ["--metrics"]  # no /metrics without --metrics
    # More than one GPU: llama.cpp splits the layers over every visible GPU by default (--split-mode layer).
    return {
        "command": ["/app/llama-server"],
        "args": args,
        "env": _cache_env(cache_dir, ("LLAMA_CACHE", f"{cache_dir}/llama.cpp")),
        "ports": {"http": port},
        "probes": {
            "startup": _probe("/health", port),  # 503 while the model loads, then 200
            "liveness": _probe("/health", port),
            "readiness": _probe("/health", port),
        },
        "metrics": {"path": "/metrics", "port": port},
        "needsShm": False,  # one process, no shared-memory transport
        "servedModelName": served_model_name,
    }


_RENDERERS = {"vllm": _vllm, "sglang": _sglang, "tgi": _tgi, "llamacpp": _llamacpp}
