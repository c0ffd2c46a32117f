"""Rendering the chart with the pinned Helm, and the offline schemas kubeconform validates it against."""

from __future__ import annotations

import copy
import functools
import json
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from slm_devtools import tools

REPO_ROOT = tools.REPO_ROOT
CHART = REPO_ROOT / "charts" / "slm-monitoring"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
# The Kubernetes version the chart is rendered for: the pinned control plane's. Helm built from its Go
# module defaults to v1.20 (the version ldflags of Helm's own Makefile are not set), below kubeVersion.
KUBE_VERSION = tools.versions()["KUBERNETES_VERSION"].lstrip("v")
MONITORING_APIS = (
    "monitoring.coreos.com/v1",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
    "monitoring.coreos.com/v1/Prometheus",
    "monitoring.coreos.com/v1alpha1/AlertmanagerConfig",
)


def helm(*args: str, check: bool = True, timeout: float = 300, env: dict[str, str] | None = None) -> (
        subprocess.CompletedProcess[str]):
    result = subprocess.run(
        [tools.tool("helm"), *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}")
    return result


def render(
    *,
    values: Sequence[Path] = (),
    set_values: Sequence[str] = (),
    monitoring: bool = True,
    release: str = "slm",
    namespace: str = "slm-system",
    extra_apis: Iterable[str] = (),
) -> str:
    """`helm template` output. `monitoring` makes Helm believe the Prometheus Operator CRDs are served."""
    args = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION]
    for api in (*MONITORING_APIS, *extra_apis) if monitoring else extra_apis:
        args += ["--api-versions", api]
    for path in values:
        args += ["--values", str(path)]
    for item in set_values:
        args += ["--set", item]
    return helm(*args).stdout


def documents(rendered: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def by_kind(docs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: Iterable[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [doc for doc in by_kind(docs, kind) if doc["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


# --- offline JSON schemas for kubeconform ---------------------------------------------------------

def kind_suffix(api_version: str) -> str:
    """kubeconform's {{ .KindSuffix }}: `-<first label of the group>-<version>`, or `-<version>` for core."""
    if "/" not in api_version:
        return f"-{api_version}"
    group, version = api_version.split("/", 1)
    return f"-{group.split('.')[0]}-{version}"


def schema_filename(api_version: str, kind: str) -> str:
    return f"{kind.lower()}{kind_suffix(api_version)}.json"


def builtin_schema_dir() -> Path:
    """kubernetes-validate's bundled schemas (offline) for the pinned minor version, strict flavour."""
    import kubernetes_validate

    major_minor = ".".join(KUBE_VERSION.split(".")[:2])
    path = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{major_minor}.0-local-strict"
    assert path.is_dir(), f"kubernetes-validate has no schemas for Kubernetes {major_minor}: {path}"
    return path


def _inline_refs(node: Any, definitions: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """Replace every `$ref` into the definitions file with the definition itself (kubeconform loads
    schemas from bytes, so references to a sibling file cannot be followed)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and "#/$defs/" in ref:
            name = ref.split("#/$defs/", 1)[1]
            if name in seen:
                raise ValueError(f"recursive definition {name}: cannot inline")
            return _inline_refs(copy.deepcopy(definitions[name]), definitions, (*seen, name))
        return {key: _inline_refs(value, definitions, seen) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline_refs(item, definitions, seen) for item in node]
    return node


def _strict(schema: Any) -> Any:
    """Close every object schema that names its properties (like kubeconform's openapi2jsonschema
    `DENY_ROOT_ADDITIONAL_PROPERTIES`/strict conversion), so misspelt fields are errors."""
    if isinstance(schema, dict):
        closed = {key: _strict(value) for key, value in schema.items()}
        if (
            "properties" in closed
            and "additionalProperties" not in closed
            and not closed.get("x-kubernetes-preserve-unknown-fields")
        ):
            closed["additionalProperties"] = False
        return closed
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


class _CrdLoader(yaml.CSafeLoader):
    """PyYAML reads a bare `=` as YAML 1.1's `value` tag, which it cannot construct; the Prometheus
    Operator CRDs list `=` among their enum values (label matchers). Keep it a string."""


def _value_as_string(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    assert isinstance(node, yaml.ScalarNode)
    return str(loader.construct_scalar(node))


_CrdLoader.add_constructor("tag:yaml.org,2002:value", _value_as_string)


@functools.cache
def _load_crds(path: Path) -> list[Any]:
    # libyaml: the Prometheus Operator CRDs are megabytes, ~10 s for the pure-Python parser.
    return list(yaml.load_all(path.read_text(), Loader=_CrdLoader))


def crd_schemas(crd_files: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """{filename: JSON schema} for every served version of every CRD in the files."""
    schemas: dict[str, dict[str, Any]] = {}
    for path in crd_files:
        for crd in _load_crds(path):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                api_version = f"{group}/{version['name']}"
                schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                properties = schema.setdefault("properties", {})
                properties["apiVersion"] = {"type": "string", "enum": [api_version]}
                properties["kind"] = {"type": "string", "enum": [kind]}
                properties["metadata"] = {"type": "object"}
                schemas[schema_filename(api_version, kind)] = _strict(schema)
    return schemas


def write_schemas(directory: Path, docs: Iterable[dict[str, Any]], crd_files: Iterable[Path]) -> Path:
    """Write a standalone schema for every kind in `docs` into `directory` (flat, kubeconform naming)."""
    directory.mkdir(parents=True, exist_ok=True)
    custom = crd_schemas(crd_files)
    builtin = builtin_schema_dir()
    definitions = json.loads((builtin / "_definitions.json").read_text())["$defs"]
    for doc in docs:
        name = schema_filename(doc["apiVersion"], doc["kind"])
        target = directory / name
        if target.exists():
            continue
        if name in custom:
            target.write_text(json.dumps(custom[name]))
        elif (builtin / name).exists():
            schema = json.loads((builtin / name).read_text())
            target.write_text(json.dumps(_inline_refs(schema, definitions)))
        # else: no schema; kubeconform reports it as an error (no -ignore-missing-schemas).
    return directory


def kubeconform(manifest: Path, schema_dir: Path) -> dict[str, Any]:
    """Run kubeconform offline, strictly; returns its JSON report."""
    result = subprocess.run(
        [
            tools.tool("kubeconform"),
            "-strict",
            "-summary",
            "-output", "json",
            "-kubernetes-version", KUBE_VERSION,
            "-schema-location", f"{schema_dir}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
            str(manifest),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )
    try:
        report: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"kubeconform failed ({result.returncode}): {result.stderr}{result.stdout}") from exc
    report["returncode"] = result.returncode
    return report
