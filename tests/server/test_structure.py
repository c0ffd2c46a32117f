"""The server package's structure: every module imports on its own, the import graph has no cycle,
the generation layer stands below the HTTP and monitoring layers, and everything but the engine's
modules imports — and serves — without torch (the monitoring sidecar reuses the app, its
middleware, metrics, logs and drift detection on a machine without it)."""

from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import slm_server

PACKAGE_DIR = Path(slm_server.__file__).parent
# The modules that need the model's libraries (torch, transformers); nothing else may.
ENGINE_MODULES = {
    "slm_server.generation.sampling",
    "slm_server.generation.scheduler",
    "slm_server.generation.transformers_engine",
}
MODEL_LIBRARIES = ("torch", "transformers", "llguidance", "tokenizers", "safetensors")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module_name(p) for p in PACKAGE_DIR.rglob("*.py"))
ENTRY_POINT = "slm_server.__main__"  # `python -m slm_server`: importing it runs the server
LIBRARY_MODULES = [m for m in MODULES if m != ENTRY_POINT]


def _imports(module: str) -> set[str]:
    """The slm_server modules `module` imports anywhere in its text (top level, functions, TYPE_CHECKING
    blocks), and the package it is in (Python imports that first)."""
    path = PACKAGE_DIR.parent.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    is_package = path.name == "__init__.py"
    found = set()
    if "." in module:
        found.add(module.rsplit(".", 1)[0])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                package = module if is_package else module.rsplit(".", 1)[0]
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from package import module` imports the module; `from module import name`, the module.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in MODULES)
    found.discard(module)
    return found


def test_every_module_is_found():
    assert {"slm_server.app", "slm_server.generation.scheduler", "slm_server.service.serving"} <= set(MODULES)


def test_the_import_graph_has_no_cycle():
    graph = {module: _imports(module) for module in MODULES}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None
    assert set(order) == set(MODULES)


def test_the_server_imports_nothing_of_the_operator_or_the_tooling():
    """slm-server is a distribution of its own: slm_operator and the unpublished slm_devtools are not
    installed beside it."""
    for module in MODULES:
        path = PACKAGE_DIR.parent.joinpath(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            foreign = [n for n in names if n.split(".")[0] in ("slm_operator", "slm_devtools")]
            assert not foreign, f"{module} imports {foreign}"


def test_the_generation_layer_imports_nothing_above_it():
    """The engines and the scheduler know nothing of HTTP, metrics or logs: only their own layer and
    the settings."""
    allowed = {"slm_server", "slm_server.settings"}
    for module in MODULES:
        if module.startswith("slm_server.generation"):
            above = {m for m in _imports(module) if not m.startswith("slm_server.generation") and m not in allowed}
            assert not above, f"{module} imports {sorted(above)}"


def _python(code: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def test_every_module_imports_alone():
    """Each module as the first of the package to be imported (the others dropped from sys.modules
    before each; third-party libraries stay loaded, to keep this quick): no module relies on another
    having been imported before it, the symptom of an import cycle broken by import order."""
    code = textwrap.dedent(
        f"""
        import importlib, sys, traceback
        failures = {{}}
        for module in {LIBRARY_MODULES!r}:
            for name in [n for n in sys.modules if n == "slm_server" or n.startswith("slm_server.")]:
                del sys.modules[name]
            try:
                importlib.import_module(module)
            except Exception as exc:
                failures[module] = f"{{type(exc).__name__}}: {{exc}}"
        print(failures)
        """
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "{}"


# A finder that refuses the model's libraries, as a machine without them would.
_WITHOUT_MODEL_LIBRARIES = textwrap.dedent(
    f"""
    import importlib.abc, sys

    class NoModelLibraries(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {MODEL_LIBRARIES!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (made unimportable by the test)")
            return None

    sys.meta_path.insert(0, NoModelLibraries())
    """
)


def test_everything_but_the_engine_imports_and_serves_without_torch():
    """With torch, transformers, llguidance, tokenizers and safetensors unimportable: every module
    but the engine's imports, and the app serves a generation (the no-op engine), /metrics and the
    probes. Fails if any of those modules imports a model library, even lazily on the request path."""
    torch_free = [m for m in LIBRARY_MODULES if m not in ENGINE_MODULES]
    code = _WITHOUT_MODEL_LIBRARIES + textwrap.dedent(
        f"""
        import importlib
        for module in {torch_free!r}:
            importlib.import_module(module)

        from fastapi.testclient import TestClient
        from slm_server.app import create_app
        from slm_server.settings import Settings

        settings = Settings(engine="echo", served_model_name="echo")
        with TestClient(create_app(settings)) as client:
            assert client.get("/readyz").status_code == 200, client.get("/readyz").text
            generated = client.post("/generate", json={{"prompt": "one two three", "max_tokens": 2}})
            assert generated.status_code == 200, generated.text
            streamed = client.post("/v1/completions", json={{"model": "echo", "prompt": "a b", "stream": True}})
            assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\\n\\n"), streamed.text
            assert "slm_request_output_tokens_bucket" in client.get("/metrics").text
        assert not any(name.split(".")[0] in {MODEL_LIBRARIES!r} for name in sys.modules)
        print("ok", len({torch_free!r}))
        """
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[:2] == ["ok", str(len(torch_free))]
