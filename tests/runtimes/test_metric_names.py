"""Every metric the runtime mapping reads (operator/slm_operator/monitoring/data/runtime_metrics.yaml) is
defined by the pinned runtime's own code, with the type, labels and buckets the mapping says.

vLLM and SGLang: their installed packages' source files; llama.cpp: the server sources llama-server is
built from (see metric_sources.py for how definitions are read). TGI: its router cannot be obtained here
at test time, so its names are checked against tests/runtimes/data/tgi-<version>-metrics.txt, an extract
of its sources at the pinned tag made by scripts/tgi_extract.sh; that check cannot notice an upstream
rename by itself, only the next extract can (TGI has been in maintenance mode since 3.3.7).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_devtools.tools import REPO_ROOT, versions
from slm_operator.runtimes import PINS
from tests.runtimes.conftest import site_packages
from tests.runtimes.metric_sources import Definition, llamacpp_definitions, python_definitions

MAPPING_FILE = REPO_ROOT / "operator/slm_operator/monitoring/data/runtime_metrics.yaml"
MAPPING: dict[str, Any] = yaml.safe_load(MAPPING_FILE.read_text())
SIGNALS = set(MAPPING["signals"])


def mapped(runtime: str) -> list[tuple[str, dict[str, Any]]]:
    return [(signal, row) for signal, row in MAPPING["runtimes"][runtime]["metrics"].items() if "missing" not in row]


def check(runtime: str, defined: dict[str, Definition]) -> list[str]:
    """What in the mapping of `runtime` its code does not define as written."""
    problems = []
    for signal, row in mapped(runtime):
        definition = defined.get(row["name"])
        where = f"{runtime} {signal}: {row['name']}"
        if definition is None:
            problems.append(f"{where} is not defined in {row['source']}")
            continue
        if definition.type != row["type"]:
            problems.append(f"{where} is a {definition.type}, the mapping says {row['type']}")
        if not set(definition.labels) <= set(row["labels"]):
            problems.append(f"{where} has labels {definition.labels}, the mapping lists {row['labels']}")
        if "buckets" in row and definition.buckets != tuple(row["buckets"]):
            problems.append(f"{where} has buckets {definition.buckets}, the mapping lists {row['buckets']}")
    return problems


def test_every_runtime_maps_every_signal_or_says_why_not():
    for runtime, entry in MAPPING["runtimes"].items():
        assert set(entry["metrics"]) == SIGNALS, runtime
        for signal, row in entry["metrics"].items():
            assert ("missing" in row) != ("name" in row), (runtime, signal)
            if "missing" not in row:
                assert {"name", "type", "labels", "source"} <= set(row), (runtime, signal)


def test_the_mapping_is_for_the_pinned_versions():
    for runtime, entry in MAPPING["runtimes"].items():
        assert entry["version"] == PINS[runtime].version, runtime


def test_vllm_defines_every_metric_the_mapping_reads(vllm_python: Path):
    root = site_packages(vllm_python)
    defined = python_definitions(root / "vllm/v1/metrics/loggers.py", root)
    assert check("vllm", defined) == []


def test_vllm_error_selector_names_a_finish_reason_it_has(vllm_python: Path):
    source = (site_packages(vllm_python) / "vllm/v1/engine/__init__.py").read_text()
    assert re.search(r'\bERROR = \d+', source), "vLLM's FinishReason has no ERROR member"
    assert '"error"' in source


def test_sglang_defines_every_metric_the_mapping_reads(sglang_python: Path):
    root = site_packages(sglang_python) / "sglang/srt/observability"
    defined = python_definitions(root / "metrics_collector.py")
    defined.update(python_definitions(root / "http_request_metrics.py"))
    assert check("sglang", defined) == []


def test_llamacpp_defines_every_metric_the_mapping_reads(llamacpp_source: Path):
    defined = llamacpp_definitions(llamacpp_source / "tools/server/server-task.cpp")
    assert len(defined) >= 10  # the reader still understands the file
    assert check("llamacpp", defined) == []


def test_tgi_names_are_in_the_recorded_extract_of_its_sources():
    version = versions()["TGI_VERSION"]
    assert version == PINS["tgi"].version
    extract = REPO_ROOT / f"tests/runtimes/data/tgi-{version}-metrics.txt"
    assert extract.is_file(), f"run scripts/tgi_extract.sh for TGI {version}"
    recorded: dict[str, set[tuple[str, str]]] = {}
    for line in extract.read_text().splitlines():
        if line and not line.startswith("#"):
            where, kind, name = line.split()
            recorded.setdefault(name, set()).add((kind, where.rsplit(":", 1)[0]))
    for signal, row in mapped("tgi"):
        assert row["name"] in recorded, (signal, row["name"])
        kinds = {kind for kind, _ in recorded[row["name"]]}
        assert kinds == {row["type"]}, (signal, kinds)
        files = {path for _, path in recorded[row["name"]]}
        cited = {s.strip() for s in row["source"].split(",")}
        assert cited <= files, (signal, f"{row['name']} is not used in {sorted(cited - files)}")


@pytest.mark.parametrize("runtime", ["vllm", "sglang", "llamacpp"])
def test_a_renamed_metric_would_fail(runtime: str, request: pytest.FixtureRequest):
    """The check is not vacuous: a mapping row with a name the runtime does not define is reported."""
    defined: dict[str, Definition]
    if runtime == "llamacpp":
        defined = llamacpp_definitions(request.getfixturevalue("llamacpp_source") / "tools/server/server-task.cpp")
    elif runtime == "vllm":
        root = site_packages(request.getfixturevalue("vllm_python"))
        defined = python_definitions(root / "vllm/v1/metrics/loggers.py", root)
    else:
        root = site_packages(request.getfixturevalue("sglang_python")) / "sglang/srt/observability"
        defined = python_definitions(root / "metrics_collector.py")
        defined.update(python_definitions(root / "http_request_metrics.py"))
    signal, row = mapped(runtime)[0]
    renamed = defined.copy()
    del renamed[row["name"]]
    assert any(f"{row['name']} is not defined" in p for p in check(runtime, renamed)), signal


def test_the_reference_page_names_every_mapped_metric_and_every_gap():
    page = (REPO_ROOT / "docs/reference/runtimes.md").read_text()
    for runtime, entry in MAPPING["runtimes"].items():
        assert f"{entry['version']}" in page, runtime
        for signal, row in entry["metrics"].items():
            if "missing" in row:
                continue
            # Histogram sums read as counters appear with their _sum suffix.
            assert row["name"] in page, (runtime, signal, row["name"])
    table = [line for line in page.splitlines() if line.startswith("| ") and line.count("|") == 6]
    gaps = {(cells[0], column) for line in table
            for cells in [[c.strip() for c in line.strip("|").split("|")]]
            for column, cell in enumerate(cells[1:]) if cell == "—"}
    runtimes = list(MAPPING["runtimes"])
    expected = {(signal, runtimes.index(runtime)) for runtime, entry in MAPPING["runtimes"].items()
                for signal, row in entry["metrics"].items() if "missing" in row}
    labels = {"requests": "requests", "errors": "errors", "e2e_latency": "end-to-end latency",
              "ttft": "time to first token", "inter_token_latency": "inter-token latency", "queue_time": "queue time",
              "running": "running requests", "waiting": "waiting requests", "prompt_tokens": "prompt tokens",
              "generated_tokens": "generated tokens", "kv_cache_usage": "KV-cache usage (0\N{EN DASH}1)",
              "preemptions": "preemptions", "queue_limit": "queue limit", "filesystem": "filesystem",
              "device": "device", "fault_injection": "fault injection", "perplexity": "perplexity"}
    assert gaps == {(labels[signal], column) for signal, column in expected}
