"""Metric definitions read from the pinned runtimes' own code, without running it.

Python runtimes (vLLM, SGLang): the source files of the installed packages (scripts/deps/runtime-venv.sh)
are parsed with `ast`; every call with a string keyword `name=` is a metric definition: its type from
the constructor (`Counter`, `Gauge`, `Histogram`, or vLLM's `self._counter_cls` …), its label names and
buckets from the `labelnames=` and `buckets=` keywords, following a variable to its literal assignment
in the same function and vLLM's `histogram_buckets("family")` to the family's tuple in
`vllm/v1/metrics/buckets.py`. The exposed name is what prometheus_client writes: a counter gets `_total`.

llama.cpp: `tools/server/server-task.cpp` of the sources llama-server was built from; its metrics are
two C++ tables (counters, gauges) of {"name", "help", value} rows printed behind `llamacpp:`.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Definition:
    name: str  # as exposed, what PromQL reads (counters with _total)
    type: str  # counter | gauge | histogram | summary
    labels: tuple[str, ...]  # the label names written literally in the definition
    buckets: tuple[float, ...] | None  # None when not a histogram or not resolvable to literals
    line: int


def _type_of(func: ast.expr) -> str | None:
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    lowered = name.lower()
    for kind in ("counter", "gauge", "histogram", "summary"):
        if kind in lowered:
            return kind
    return None


def _literal_strings(node: ast.AST | None) -> tuple[str, ...]:
    if node is None:
        return ()
    return tuple(n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))


def _literal_numbers(node: ast.AST | None) -> tuple[float, ...] | None:
    if isinstance(node, ast.List | ast.Tuple) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, int | float) for e in node.elts
    ):
        return tuple(float(e.value) for e in node.elts)  # type: ignore[attr-defined]
    return None


class _Scope(ast.NodeVisitor):
    """Per function: the last literal assigned to each local name (for `labelnames=labelnames`)."""

    def __init__(self) -> None:
        self.assignments: dict[str, ast.expr] = {}

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            if isinstance(target, ast.Name):
                self.assignments.setdefault(target.id, node.value)
        self.generic_visit(node)


def _vllm_bucket_families(package_root: Path) -> dict[str, tuple[float, ...]]:
    tree = ast.parse((package_root / "vllm/v1/metrics/buckets.py").read_text())
    constants: dict[str, tuple[float, ...]] = {}
    families: dict[str, str] = {}
    for node in tree.body:
        target, value = None, None
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            target, value = node.target.id, node.value
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        if target is None:
            continue
        numbers = _literal_numbers(value)
        if numbers is not None:
            constants[target] = numbers
        if target == "_STATIC_FAMILY_DEFAULTS" and isinstance(value, ast.Dict):
            for key, ref in zip(value.keys, value.values, strict=True):
                if isinstance(key, ast.Constant) and isinstance(ref, ast.Name):
                    families[key.value] = ref.id
    return {family: constants[const] for family, const in families.items() if const in constants}


def python_definitions(path: Path, package_root: Path | None = None) -> dict[str, Definition]:
    """Every metric defined in the Python file `path`, by exposed name."""
    tree = ast.parse(path.read_text())
    families = _vllm_bucket_families(package_root) if package_root is not None and "vllm" in path.parts else {}
    found: dict[str, Definition] = {}
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)] or [tree]
    for function in functions:
        scope = _Scope()
        scope.visit(function)
        for call in ast.walk(function):
            if not isinstance(call, ast.Call):
                continue
            keywords = {k.arg: k.value for k in call.keywords if k.arg}
            name_node = keywords.get("name")
            if not (isinstance(name_node, ast.Constant) and isinstance(name_node.value, str)):
                continue
            kind = _type_of(call.func)
            if kind is None:
                continue
            labels_node = keywords.get("labelnames")
            labels = list(_literal_strings(labels_node))
            for name in (n.id for n in ast.walk(labels_node) if isinstance(n, ast.Name)) if labels_node else ():
                labels[:0] = _literal_strings(scope.assignments.get(name))
            buckets_node = keywords.get("buckets")
            if isinstance(buckets_node, ast.Name):
                buckets_node = scope.assignments.get(buckets_node.id, buckets_node)
            buckets = _literal_numbers(buckets_node)
            if buckets is None and isinstance(buckets_node, ast.Call) and buckets_node.args:
                family = buckets_node.args[0]
                if isinstance(family, ast.Constant) and family.value in families:
                    buckets = families[family.value]
            exposed = name_node.value
            if kind == "counter" and not exposed.endswith("_total"):
                exposed += "_total"
            found.setdefault(exposed, Definition(exposed, kind, tuple(dict.fromkeys(labels)), buckets, call.lineno))
    return found


_TABLE = re.compile(r"const std::vector<metric_item> (counters|gauges) = \{(.*?)\n    \};", re.S)
_ROW = re.compile(r'\{\s*"([a-z_]+)",\s*"')


def llamacpp_definitions(server_task_cpp: Path) -> dict[str, Definition]:
    """The metrics llama-server prints on /metrics, from its to_metrics() tables."""
    text = server_task_cpp.read_text()
    found: dict[str, Definition] = {}
    for table in _TABLE.finditer(text):
        kind = "counter" if table.group(1) == "counters" else "gauge"
        for row in _ROW.finditer(table.group(2)):
            line = text[: table.start(2) + row.start()].count("\n") + 1
            name = f"llamacpp:{row.group(1)}"
            found[name] = Definition(name, kind, (), None, line)
    return found


def as_dict(definition: Definition) -> dict[str, Any]:
    return dataclasses.asdict(definition)
