"""One pin per runtime: the operator's defaults (slm_operator.runtimes.PINS) are the versions the tests
check (scripts/deps/versions.env), and what `make deps` installed is that version."""

from __future__ import annotations

import subprocess
from pathlib import Path

from slm_devtools.tools import tool, versions
from slm_operator.runtimes import PINS


def test_operator_defaults_and_tested_versions_agree():
    pinned = versions()
    assert (PINS["vllm"].version, PINS["sglang"].version, PINS["tgi"].version, PINS["llamacpp"].version) == (
        pinned["VLLM_VERSION"], pinned["SGLANG_VERSION"], pinned["TGI_VERSION"], pinned["LLAMACPP_VERSION"])
    for pin in PINS.values():
        assert pin.version.lstrip("v") in pin.image, pin


def test_installed_runtime_packages_are_the_pinned_versions(vllm_python: Path, sglang_python: Path):
    for python, package, version in ((vllm_python, "vllm", PINS["vllm"].version),
                                     (sglang_python, "sglang", PINS["sglang"].version)):
        done = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version('{package}'))"],
                              capture_output=True, text=True, timeout=60, check=True)
        assert done.stdout.strip() == version


def test_llama_server_is_the_pinned_build():
    done = subprocess.run([tool("llama-server"), "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert f"(build {PINS['llamacpp'].version.removeprefix('b')}, commit {versions()['LLAMACPP_COMMIT']})" in (
        done.stdout + done.stderr)
