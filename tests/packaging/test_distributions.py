"""The products stand apart from each other and from the tooling, as a user installing one of them sees.

- `pip install slm-operator` in a clean environment pulls no torch and no server, and the operator starts.
- No module of the operator imports the server or the tooling; the server imports neither the operator
  nor the tooling (read from the source with `ast`, so a lazy import inside a function counts too).
- Nothing published finds files by walking up from `__file__` (a wheel has no repository around it).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from slm_devtools import tools

ROOT = tools.REPO_ROOT
PRODUCTS = {"slm_operator": ROOT / "operator" / "slm_operator", "slm_server": ROOT / "server" / "slm_server"}
FOREIGN = {
    "slm_operator": {"slm_server", "slm_devtools", "tests"},
    "slm_server": {"slm_operator", "slm_devtools", "tests"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_products_import_neither_each_other_nor_the_tooling() -> None:
    offenders = []
    for package, directory in PRODUCTS.items():
        for path in sorted(directory.rglob("*.py")):
            bad = imported_packages(path) & FOREIGN[package]
            if bad:
                offenders.append(f"{path.relative_to(ROOT)} imports {', '.join(sorted(bad))}")
    assert offenders == []


def test_published_code_does_not_walk_up_from_its_own_file() -> None:
    walking_up = re.compile(r"__file__\)?(\.resolve\(\))?\.parents?\b")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for directory in PRODUCTS.values()
        for path in sorted(directory.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if walking_up.search(line)
    ]
    assert offenders == []


def test_operator_installs_in_a_clean_environment_without_torch_or_the_server(tmp_path: Path) -> None:
    """A real install of operator/ into an empty virtual environment, resolved from operator/requirements.lock.

    uv (the one `make deps` installs) works offline from its cache, which `make deps` filled with these
    exact wheels; the project's own environment is not visible to the new one.
    """
    uv = tools.cache_dir() / "uv-0.13.9" / "bin" / "uv"
    assert uv.exists(), f"{uv} missing: run `make deps`"
    venv = tmp_path / "venv"
    env = {**os.environ, "UV_CACHE_DIR": str(tools.cache_dir() / "uv-cache"), "UV_OFFLINE": "1"}
    env.pop("VIRTUAL_ENV", None)
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    subprocess.run([str(uv), "venv", "-q", "--python", python, str(venv)], check=True, env=env)
    install = subprocess.run(
        [str(uv), "pip", "install", "--python", str(venv / "bin" / "python"), "--require-hashes",
         "-r", str(ROOT / "operator" / "requirements.lock")],
        env=env, capture_output=True, text=True, check=False)
    assert install.returncode == 0, install.stderr
    install = subprocess.run(
        [str(uv), "pip", "install", "--python", str(venv / "bin" / "python"), "--no-deps", str(ROOT / "operator")],
        env=env, capture_output=True, text=True, check=False)
    assert install.returncode == 0, install.stderr
    listed = subprocess.run([str(uv), "pip", "list", "--python", str(venv / "bin" / "python")],
                            env=env, capture_output=True, text=True, check=True).stdout
    names = {line.split()[0].lower() for line in listed.splitlines()[2:] if line.strip()}
    assert "slm-operator" in names
    assert not names & {"torch", "transformers", "slm-server", "slm-monitoring-dev", "fastapi", "pytest"}
    # The installed operator imports its handlers and answers --help (the image's entry point).
    started = subprocess.run([str(venv / "bin" / "slm-operator"), "--help"], capture_output=True, text=True,
                             check=False, cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    assert "--namespace" in started.stdout
    imported = subprocess.run([str(venv / "bin" / "python"), "-c", "import slm_operator.main, slm_operator.render"],
                              capture_output=True, text=True, check=False, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr


def test_the_server_base_install_leaves_torch_to_the_engine_extra() -> None:
    """The monitoring half of the server (reused by the runtime sidecar) must not require torch."""
    import tomllib

    project = tomllib.loads((ROOT / "server" / "pyproject.toml").read_text())["project"]
    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!;\[ ]", requirement)[0].lower() for requirement in requirements}

    base = names(project["dependencies"])
    engine = names(project["optional-dependencies"]["engine"])
    assert not base & {"torch", "transformers", "llguidance", "tokenizers", "safetensors"}
    assert {"torch", "transformers"} <= engine
