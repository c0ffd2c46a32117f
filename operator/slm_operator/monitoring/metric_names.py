"""Which metric names a PromQL expression reads, and where each is documented to come from.

Used by the contract tests: a name in a rule or a panel that neither the server's metric contract
nor a documented exporter provides would leave that panel or alert silently empty.
"""

from __future__ import annotations

import re

from slm_operator.monitoring import load_data

_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS_RE = re.compile(r"\{[^{}]*\}")
_RANGE_RE = re.compile(r"\[[^\[\]]*\]")
_GROUPING_RE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT_RE = re.compile(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![a-zA-Z0-9_:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on", "ignoring",
             "group_left", "group_right"}  # fmt: skip
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names(expr: str) -> set[str]:
    """Metric names (and recording rule names) selected by `expr`, without functions or labels."""
    text = _STRING_RE.sub('""', expr)
    text = _MATCHERS_RE.sub("", text)
    text = _RANGE_RE.sub("", text)
    text = _GROUPING_RE.sub("", text)
    names = set()
    for match in _IDENT_RE.finditer(text):
        name = match.group(1)
        if name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def _catalogue() -> dict[str, object]:
    return load_data("metrics.yaml")


def server_metric_names(*, with_gpu: bool = False) -> set[str]:
    """Every sample name the server's contract promises (histograms expanded)."""
    server = _catalogue()["server"]
    assert isinstance(server, dict)
    names = set(server["counters"]) | set(server["gauges"])
    for histogram in server["histograms"]:
        names |= {histogram + suffix for suffix in HISTOGRAM_SUFFIXES}
    if with_gpu:
        names |= set(_as_list(_catalogue()["server_gpu_only"]))
    return names


def external_metric_names() -> dict[str, set[str]]:
    """{source: names} of the documented series that do not come from the server."""
    return {
        source: set(_as_list(_catalogue()[source])) for source in ("dcgm_exporter", "kube_state_metrics", "prometheus")
    }


def _as_list(value: object) -> list[str]:
    assert isinstance(value, list)
    return [str(item) for item in value]
