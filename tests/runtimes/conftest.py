"""Where the pinned runtimes' own code is: environments made by scripts/deps/runtime-venv.sh (vLLM,
SGLang) and the llama.cpp sources llama-server was built from (linked at .bin/llama.cpp-src)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from slm_devtools.tools import REPO_ROOT, bin_dir


def runtime_python(runtime: str) -> Path:
    """The runtime's environment's python (installed by the script on first use, like checkov)."""
    done = subprocess.run([str(REPO_ROOT / "scripts" / "deps" / "runtime-venv.sh"), runtime],
                          capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        pytest.fail(f"scripts/deps/runtime-venv.sh {runtime} failed:\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def site_packages(python: Path) -> Path:
    (found,) = (python.parent.parent / "lib").glob("python3*/site-packages")
    return found


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    return runtime_python("vllm")


@pytest.fixture(scope="session")
def sglang_python() -> Path:
    return runtime_python("sglang")


@pytest.fixture(scope="session")
def llamacpp_source() -> Path:
    path = bin_dir() / "llama.cpp-src"
    if not (path / "tools" / "server" / "server-task.cpp").is_file():
        pytest.fail(f"llama.cpp sources missing at {path}: run `make deps` (scripts/deps/build-tools.sh).")
    return path.resolve()


def example_container(runtime: str) -> dict:
    """The runtime container the operator renders for examples/<runtime>.yaml (what `kubectl apply` of it runs)."""
    import yaml

    from slm_operator import render
    from slm_operator.spec import Parent, parse_spec

    obj = yaml.safe_load((REPO_ROOT / "examples" / f"{runtime}.yaml").read_text())
    children = render.desired_children(Parent(obj["metadata"]["name"], "llm", "uid"), parse_spec(obj["spec"]),
                                       render.RenderContext(server_image="unused"))
    deployment = next(c for c in children if c["kind"] == "Deployment")
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == runtime]
    return dict(container)
