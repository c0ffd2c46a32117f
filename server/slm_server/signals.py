"""Per-request model-behaviour signals, handed to an observer after every generation.

The hook for drift detection: the service calls `observer.observe(RequestSignals(...))` once per
generation request (successful or not), on the event loop, after the metrics are recorded. The
default observer does nothing. A drift detector implements `SignalObserver`, keeps its own
windows, and sets `ServerMetrics.drift_score[signal]` / `drift_detected[signal]` (the
`slm_drift_score` / `slm_drift_detected` gauges, which stay at 0 until it does). It must be cheap
(it runs on the event loop) or hand the work to a thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class RequestSignals:
    model: str
    endpoint: str
    perplexity: float | None  # None when no token was generated
    prompt_tokens: int
    output_tokens: int
    finish_reason: str  # stop | length | abort | timeout | error
    empty: bool  # no visible text produced
    repetitive: bool  # see is_repetitive
    error: bool
    latency_seconds: float
    # Held to a grammar (a JSON response_format, tool calls): its output's shape is the schema's, not
    # the model's own (slm_server.drift leaves it out of the output signals).
    structured: bool = False


class SignalObserver(Protocol):
    def observe(self, signals: RequestSignals) -> None: ...


class NoopObserver:
    def observe(self, signals: RequestSignals) -> None:
        return None


def is_repetitive(token_ids: Sequence[int], n: int = 3, min_tokens: int = 12, max_unique_share: float = 0.5) -> bool:
    """True when most n-grams of the output repeat (a model stuck in a loop)."""
    if len(token_ids) < min_tokens:
        return False
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    return len(set(grams)) / len(grams) < max_unique_share
