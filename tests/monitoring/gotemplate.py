"""Expected alert annotations: the few Go-template forms rules.yaml uses, rendered as Prometheus does.

promtool compares annotations exactly, so the rule tests must know the text an alert will carry.
Only `{{ $labels.x }}`, `{{ $value }}` and `{{ $value | f }}` with f one of humanizePercentage,
humanizeDuration or printf "%.Nf" are supported; anything else raises, so a new template form in
rules.yaml makes the tests fail loudly rather than compare against a guess.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

_ACTION_RE = re.compile(r"\{\{\s*(.*?)\s*\}\}")


def _go_g(value: float, precision: int) -> str:
    """Go's fmt %.<precision>g (same as C's for the values alerts carry)."""
    return f"{value:.{precision}g}"


def go_value(value: float) -> str:
    """Go's fmt %v of a float64: the shortest representation, no trailing .0."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e21:
        return str(int(value))
    return repr(value)


def humanize_percentage(value: float) -> str:
    return f"{_go_g(value * 100, 4)}%"


def humanize_duration(value: float) -> str:
    """prometheus/template humanizeDuration."""
    if math.isnan(value) or math.isinf(value):
        return _go_g(value, 4)
    if value == 0:
        return f"{_go_g(value, 4)}s"
    if abs(value) >= 1:
        sign = "-" if value < 0 else ""
        value = abs(value)
        duration = int(value)
        seconds, minutes = duration % 60, (duration // 60) % 60
        hours, days = (duration // 3600) % 24, duration // 86400
        if days:
            return f"{sign}{days}d {hours}h {minutes}m {seconds}s"
        if hours:
            return f"{sign}{hours}h {minutes}m {seconds}s"
        if minutes:
            return f"{sign}{minutes}m {seconds}s"
        return f"{sign}{_go_g(value, 4)}s"
    prefix = ""
    for candidate in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(value) >= 1:
            break
        prefix = candidate
        value *= 1000
    return f"{_go_g(value, 4)}{prefix}s"


def render(text: str, *, labels: Mapping[str, str], value: float) -> str:
    def action(match: re.Match[str]) -> str:
        body = match.group(1)
        if body.startswith("$labels."):
            return labels.get(body.removeprefix("$labels."), "")
        parts = [part.strip() for part in body.split("|")]
        if parts[0] != "$value":
            raise ValueError(f"unsupported template action {{{{ {body} }}}}")
        if len(parts) == 1:
            return go_value(value)
        func = parts[1]
        if func == "humanizePercentage":
            return humanize_percentage(value)
        if func == "humanizeDuration":
            return humanize_duration(value)
        printf = re.fullmatch(r'printf "%\.(\d+)f"', func)
        if printf:
            return f"{value:.{int(printf.group(1))}f}"
        raise ValueError(f"unsupported template function {func!r}")

    return _ACTION_RE.sub(action, text)
