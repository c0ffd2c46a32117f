"""Online detection of drift in model behaviour, per model and signal, inside the server.

Six signals come from every request (`slm_server.signals.RequestSignals`):

| signal          | kind         | detector                                                        |
| --------------- | ------------ | --------------------------------------------------------------- |
| `perplexity`    | distribution | KS + PSI + shift floor, or a z-test of the window mean          |
| `output_length` | distribution | same                                                            |
| `finish_length` | rate         | Bernoulli log-likelihood-ratio CUSUM, with a return-to-normal CUSUM |
| `empty_output`  | rate         | same                                                            |
| `repetition`    | rate         | same                                                            |
| `error`         | rate         | same                                                            |

Every detector compares a **reference** (learned from the first requests after a warm-up, or pinned
from a JSON file) with what the model does **now**:

* Distribution signals keep a sliding window of the last `window_requests` values. Every
  `check_every_requests` requests (or `check_interval_seconds`, whichever comes first), but never
  twice within `min_check_interval_seconds`, the window is tested against the reference. Both
  samples must hold at least `min_samples`. The *shape* test
  alarms when the two-sample KS test (scipy's `ks_2samp(method="asymp")`, computed here without
  scipy) gives a p-value below `ks_pvalue`, the population stability
  index is at least `psi_min` (practical size, not only statistical significance), and some quantile
  (p10…p90) moved by more than a floor of `max(floor_ratio·|reference median|, floor_abs)`. The
  *mean* test alarms when the window mean is `mean_z` standard errors from the reference mean and
  moved by more than that floor: it catches a minority of requests going strange, which bends the
  CDF too little for KS. The floor (also the least reference spread the z-test assumes) is the
  variance floor that keeps constant or near-constant traffic from alarming.
* Rate signals run a one-sided Bernoulli CUSUM (Page 1954) per request: O(1), no window to sort. The
  in-control rate p0 is an upper confidence bound of the reference rate, floored at `rate_floor` (so a
  reference with zero errors does not make one error an anomaly); the out-of-control rate it is tuned
  for is p1 = p0 + `rate_shift_sigmas`·sqrt(p0(1-p0)). It alarms when the CUSUM passes
  `cusum_threshold` (log-likelihood units; larger = fewer false alarms, slower detection).

Hysteresis: a distribution signal enters the drift state after `enter_checks` consecutive alarming
checks and leaves it after `clear_checks` consecutive checks with a score below `clear_score`. A rate
signal leaves it when a mirrored CUSUM has collected `cusum_threshold` of evidence that the rate is
back at p0. So the state does not flap on a borderline window.

Exported per model and signal: `slm_drift_score` (each test's statistics over their alarm thresholds,
the weakest gate of the strongest test: 1.0 is the alarm level for every signal) and
`slm_drift_detected` (0/1). Every state change is logged once as a structured event
(`drift_detected` / `drift_cleared`) carrying the evidence: statistics, p-value, PSI, mean z, window
sizes, reference and current summaries.

Cost: `observe` appends to bounded deques and updates two CUSUMs (O(1)); the KS tests run at most
every `check_every_requests` requests and at most once per `min_check_interval_seconds`, on
`window_requests` + reference values (O(n log n), about a millisecond for the defaults): under a
heavy load the tests cost a bounded share of a core instead of a fixed cost per request. One lock
per monitor makes it safe to call from any thread.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger("slm_server.drift")

DISTRIBUTION_SIGNALS = ("perplexity", "output_length")
RATE_SIGNALS = ("finish_length", "empty_output", "repetition", "error")
SIGNALS = DISTRIBUTION_SIGNALS + RATE_SIGNALS
REFERENCE_FORMAT_VERSION = 1
# The quantiles compared against the shift floor.
_FLOOR_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
# Score gauges are capped: past a few times the alarm level the exact value carries no information,
# and a capped CUSUM recovers in bounded time.
SCORE_CAP = 10.0


class DriftSettings(BaseSettings):
    """Knobs of the in-server drift detectors (env `SLM_DRIFT_*`). Defaults are the benchmarked ones."""

    model_config = SettingsConfigDict(env_prefix="SLM_DRIFT_", extra="ignore")

    enabled: bool = True
    reference_file: Path | None = Field(
        default=None, description="Pinned reference (JSON, see DriftMonitor.export_reference); else learned."
    )
    warmup_requests: int = Field(default=20, ge=0, description="Requests ignored before learning the reference.")
    reference_requests: int = Field(default=1000, ge=10, description="Requests that make the learned reference.")
    window_requests: int = Field(default=300, ge=10, description="Sliding window of distribution signals.")
    min_samples: int = Field(default=100, ge=5, description="No test before both samples hold this many.")
    check_every_requests: int = Field(default=25, ge=1, description="Test the windows every this many requests…")
    check_interval_seconds: float = Field(default=30.0, gt=0, description="…or after this long, whichever first…")
    min_check_interval_seconds: float = Field(
        default=1.0, ge=0, description="…but not twice within this long (bounds the tests' CPU under load)."
    )
    ks_pvalue: float = Field(default=1e-6, gt=0, lt=1, description="KS p-value under which a window alarms.")
    psi_min: float = Field(default=0.1, ge=0, description="Population stability index an alarm needs.")
    psi_bins: int = Field(default=10, ge=2)
    mean_z: float = Field(default=6.0, ge=0, description="z of the window mean that alarms on its own (0: off).")
    floor_ratio: float = Field(default=0.05, ge=0, description="Shift floor, share of the reference median.")
    floor_abs: float = Field(default=1.0, ge=0, description="Shift floor, absolute (tokens, perplexity units).")
    enter_checks: int = Field(default=2, ge=1)
    clear_checks: int = Field(default=4, ge=1)
    clear_score: float = Field(default=0.5, gt=0, le=1)
    rate_floor: float = Field(default=0.01, gt=0, lt=0.5, description="Lowest in-control rate p0.")
    rate_shift_sigmas: float = Field(default=1.5, gt=0, description="Tuned-for shift, in sd of p0.")
    rate_confidence_z: float = Field(default=2.0, ge=0, description="p0 = reference rate + z·standard error.")
    cusum_threshold: float = Field(default=14.0, gt=0, description="CUSUM alarm level (log-likelihood).")


class SignalsLike(Protocol):
    """What the detectors read from one request (the server's `RequestSignals`)."""

    model: str
    perplexity: float | None
    output_tokens: int
    finish_reason: str
    empty: bool
    repetitive: bool
    error: bool
    structured: bool


@dataclass
class Evidence:
    """What a check found; logged on a state change."""

    signal: str
    detector: str
    score: float
    alarm: bool
    details: dict[str, Any] = field(default_factory=dict)


def _sorted_quantiles(values: np.ndarray, quantiles: tuple[float, ...]) -> np.ndarray:
    """Quantiles of an already sorted array (numpy's default linear interpolation), without a sort."""
    return np.interp(np.asarray(quantiles) * (values.size - 1), np.arange(values.size), values)


def _summary(values: np.ndarray) -> dict[str, float]:
    """Summary of a sorted sample, for the evidence."""
    if values.size == 0:
        return {"n": 0}
    q10, q50, q90 = _sorted_quantiles(values, (0.1, 0.5, 0.9))
    return {
        "n": int(values.size),
        "mean": round(float(values.mean()), 4),
        "std": round(float(values.std()), 4),
        "p10": round(float(q10), 4),
        "p50": round(float(q50), 4),
        "p90": round(float(q90), 4),
    }


class KSResult(NamedTuple):
    statistic: float
    pvalue: float


# Scaling of the Durbin matrix's powers against overflow (as scipy scales them).
_E128 = 128
_EP128 = math.ldexp(1.0, _E128)
_EM128 = math.ldexp(1.0, -_E128)


def _smirnov(n: int, x: float) -> float:
    """P(D+_n >= x): the exact tail of the one-sided one-sample KS statistic (Birnbaum & Tingey 1951), a
    sum of positive terms, taken in logs."""
    if x <= 0:
        return 1.0
    if x >= 1:
        return 0.0
    j = np.arange(0, math.floor(n * (1 - x)) + 1, dtype=float)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log(n - j[1:] + 1) - np.log(j[1:]))])
    with np.errstate(divide="ignore"):
        log_terms = log_choose + (n - j) * np.log(np.maximum(1 - x - j / n, 0.0)) + (j - 1) * np.log(x + j / n)
    top = float(log_terms.max())
    return min(1.0, x * math.exp(top) * float(np.exp(log_terms - top).sum()))


def _kolmogorov_cdf(n: int, d: float) -> float:
    """P(D_n <= d) of the two-sided one-sample KS statistic, exactly: Durbin's matrix as Marsaglia, Tsang &
    Wang (2003) compute it."""
    k = math.ceil(n * d)
    h = k - n * d
    m = 2 * k - 1
    powers = np.arange(1, m + 1)
    factorials = np.cumprod(powers.astype(float))  # j!
    v = (1.0 - h**powers) / factorials
    v[-1] = (1.0 + max(2 * h - 1.0, 0.0) ** m - 2 * h**m) / factorials[-1]
    w = np.concatenate([[1.0], 1.0 / factorials[:-1]])  # 1/j!, j = 0..m-1
    matrix = np.zeros((m, m))
    for i in range(1, m):
        matrix[i - 1 :, i] = w[: m - i + 1]
    matrix[:, 0] = v
    matrix[-1, :] = v[::-1]
    power, exponent, matrix_exponent, left = np.eye(m), 0, 0, n
    while left > 0:
        if left % 2:
            power = power @ matrix
            exponent += matrix_exponent
        matrix = matrix @ matrix
        matrix_exponent *= 2
        if abs(matrix[k - 1, k - 1]) > _EP128:
            matrix /= _EP128
            matrix_exponent += _E128
        left //= 2
    p = float(power[k - 1, k - 1])
    for i in range(1, n + 1):  # times n!/n^n
        p = i * p / n
        if abs(p) < _EM128:
            p *= _EP128
            exponent -= _E128
    return math.ldexp(p, exponent)


def _kolmogorov_sf(n: int, x: float) -> float:
    """P(D_n >= x) (scipy.stats.kstwo.sf) by scipy's choice of formulas (Simard & L'Ecuyer 2011): exactly
    2·smirnov in the tail, where alarms are decided; elsewhere Durbin's matrix (exact, where scipy
    approximates some large n by Pelz-Good: the two agree to ~1e-6 there, at p-values above 0.01)."""
    if x >= 1.0:
        return 0.0
    t = n * x
    if t <= 0.5:
        return 1.0
    if t <= 1.0:  # Ruben & Gambino
        return min(1.0, max(0.0, 1.0 - math.exp(math.lgamma(n + 1) - n * math.log(n) + n * math.log(2 * t - 1))))
    if t >= n - 1:
        return min(1.0, 2 * (1.0 - x) ** n)
    squared = t * x
    if n > 140 and squared >= 370.0:
        return 0.0
    if x >= 0.5 or (n <= 140 and squared > 4) or (n > 140 and squared >= 2.2):
        return min(1.0, 2 * _smirnov(n, x))
    return min(1.0, max(0.0, 1.0 - _kolmogorov_cdf(n, x)))


def _ks_2samp(ref: np.ndarray, current: np.ndarray) -> KSResult:
    """scipy.stats.ks_2samp(ref, current, method="asymp") of two sorted samples, without scipy (whose
    stats module is ~80 MiB resident: more than the whole sidecar): the KS distance, and its p-value from
    the two-sided one-sample statistic's distribution at round(n·m/(n+m)) samples, as scipy computes it."""
    grid = np.concatenate([ref, current])
    statistic = float(
        np.max(
            np.abs(
                np.searchsorted(ref, grid, side="right") / ref.size
                - np.searchsorted(current, grid, side="right") / current.size
            )
        )
    )
    effective = round(ref.size * current.size / (ref.size + current.size))
    return KSResult(statistic, _kolmogorov_sf(int(effective), statistic))


def _ks_critical(alpha: float, n: int, m: int) -> float:
    """Asymptotic two-sample KS critical value: D above it means p < alpha (Smirnov)."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


class DistributionDetector:
    """KS + PSI + shift floor on one continuous signal; a reference sample against a sliding window."""

    kind = "distribution"

    def __init__(self, signal: str, settings: DriftSettings) -> None:
        self.signal = signal
        self.settings = settings
        self.window: deque[float] = deque(maxlen=settings.window_requests)
        self._learning: list[float] = []
        self._skipped = 0
        self.reference: np.ndarray | None = None
        self._edges: np.ndarray | None = None
        self._ref_share: np.ndarray | None = None
        self._floor = 0.0
        self._ref_quantiles: np.ndarray | None = None
        self._ref_summary: dict[str, float] = {"n": 0}
        self._ref_mean = self._ref_sd = 0.0
        self.detected = False
        self.score = 0.0
        self._streak = 0  # consecutive alarming (or, in the drift state, quiet) checks

    def set_reference(self, values: Iterable[float]) -> None:
        ref = np.sort(np.asarray(list(values), dtype=float))
        ref = ref[np.isfinite(ref)]
        self.reference = ref
        self._learning = []
        if ref.size == 0:
            return
        s = self.settings
        # PSI bins: reference quantiles, deduplicated (a constant reference makes a single bin).
        inner = np.unique(np.quantile(ref, np.linspace(0, 1, s.psi_bins + 1)[1:-1]))
        self._edges = inner
        counts = np.bincount(np.searchsorted(inner, ref, side="right"), minlength=inner.size + 1)
        self._ref_share = self._smoothed_share(counts)
        self._ref_quantiles = _sorted_quantiles(ref, _FLOOR_QUANTILES)
        self._ref_summary = _summary(ref)
        self._ref_mean, self._ref_sd = float(ref.mean()), float(ref.std())
        self._floor = max(s.floor_ratio * abs(float(np.median(ref))), s.floor_abs)

    @staticmethod
    def _smoothed_share(counts: np.ndarray) -> np.ndarray:
        # +0.5 per bin (Jeffreys) keeps log(0) out of PSI for a bin a sample happens to miss.
        return (counts + 0.5) / (counts.sum() + 0.5 * counts.size)

    def add(self, value: float) -> None:
        if not math.isfinite(value):
            return
        if self.reference is None:
            if self._skipped < self.settings.warmup_requests:
                self._skipped += 1
                return
            self._learning.append(value)
            if len(self._learning) >= self.settings.reference_requests:
                self.set_reference(self._learning)
            return
        self.window.append(value)

    def check(self) -> Evidence:
        s = self.settings
        ref = self.reference
        current = np.sort(np.fromiter(self.window, dtype=float, count=len(self.window)))
        details: dict[str, Any] = {"window_requests": s.window_requests}
        if ref is None or ref.size < s.min_samples or current.size < s.min_samples:
            details.update(
                guard="min_samples",
                reference=self._ref_summary if ref is not None else {"n": len(self._learning), "learning": True},
                current=_summary(current),
            )
            return self._settle(Evidence(self.signal, "ks+psi+mean", 0.0, False, details))
        assert self._edges is not None and self._ref_share is not None and self._ref_quantiles is not None
        # The KS distance itself is cheap on sorted samples; the test's p-value (the judge of significance)
        # runs only when every gate could pass, which keeps a quiet check to a few microseconds.
        grid = np.concatenate([ref, current])
        statistic = float(
            np.max(
                np.abs(
                    np.searchsorted(ref, grid, side="right") / ref.size
                    - np.searchsorted(current, grid, side="right") / current.size
                )
            )
        )
        counts = np.bincount(np.searchsorted(self._edges, current, side="right"), minlength=self._edges.size + 1)
        cur_share = self._smoothed_share(counts)
        psi = float(np.sum((cur_share - self._ref_share) * np.log(cur_share / self._ref_share)))
        shift = float(np.max(np.abs(_sorted_quantiles(current, _FLOOR_QUANTILES) - self._ref_quantiles)))
        d_crit = _ks_critical(s.ks_pvalue, ref.size, current.size)
        # Each gate over its own threshold; the score is the weakest, so score >= 1 <=> every gate passes.
        ratios = {
            "ks": statistic / d_crit,
            "psi": psi / s.psi_min if s.psi_min > 0 else SCORE_CAP,
            "floor": shift / self._floor if self._floor > 0 else SCORE_CAP,
        }
        ks_score = min(SCORE_CAP, *ratios.values())
        pvalue: float | None = None
        ks_alarm = False
        if ks_score >= 1:
            ks = _ks_2samp(ref, current)
            statistic, pvalue = float(ks.statistic), float(ks.pvalue)
            ks_alarm = pvalue < s.ks_pvalue
        # A mean moved by a minority of requests (a share of the traffic gone strange) bends the CDF too
        # little for KS; a z-test of the window mean against the reference's catches it. The reference
        # spread is floored too, so a near-constant reference does not turn noise into a large z.
        mean_delta = float(current.mean()) - self._ref_mean
        std_err = max(self._ref_sd, self._floor) * math.sqrt(1 / current.size + 1 / ref.size)
        z = mean_delta / std_err
        mean_score = min(abs(z) / s.mean_z, abs(mean_delta) / self._floor) if s.mean_z > 0 and self._floor > 0 else 0.0
        mean_alarm = mean_score >= 1
        score = min(SCORE_CAP, max(ks_score, mean_score))
        alarm = ks_alarm or mean_alarm
        was_detected = self.detected
        evidence = self._settle(Evidence(self.signal, "ks+psi+mean", round(score, 4), alarm, details))
        if alarm or was_detected or self.detected:
            # Only a check that can change (or just changed) the state needs the full evidence.
            if pvalue is None:
                pvalue = float(_ks_2samp(ref, current).pvalue)
            details.update(
                reference=self._ref_summary,
                current=_summary(current),
                ks_statistic=round(statistic, 5),
                p_value=pvalue,
                ks_critical=round(d_crit, 5),
                psi=round(psi, 5),
                quantile_shift=round(shift, 4),
                shift_floor=round(self._floor, 4),
                mean_delta=round(mean_delta, 4),
                mean_z=round(z, 3),
                tests_alarming=[name for name, hit in (("ks", ks_alarm), ("mean", mean_alarm)) if hit],
                thresholds={"ks_pvalue": s.ks_pvalue, "psi_min": s.psi_min, "mean_z": s.mean_z},
            )
        return evidence

    def _settle(self, ev: Evidence) -> Evidence:
        s = self.settings
        self.score = ev.score
        if not self.detected:
            self._streak = self._streak + 1 if ev.alarm else 0
            if self._streak >= s.enter_checks:
                self.detected, self._streak = True, 0
        else:
            self._streak = self._streak + 1 if ev.score < s.clear_score else 0
            if self._streak >= s.clear_checks:
                self.detected, self._streak = False, 0
        return ev

    def reference_values(self) -> list[float] | None:
        return None if self.reference is None else [float(v) for v in self.reference]


class RateDetector:
    """Bernoulli CUSUM on the share of requests with some property (truncated, empty, repetitive, failed)."""

    kind = "rate"

    def __init__(self, signal: str, settings: DriftSettings) -> None:
        self.signal = signal
        self.settings = settings
        self._skipped = 0
        self._learn_n = 0
        self._learn_hits = 0
        self.reference_rate: float | None = None
        self.reference_n = 0
        self.p0 = 0.0
        self.p1 = 0.0
        self._llr_hit = 0.0  # log(p1/p0): added by an event
        self._llr_miss = 0.0  # log((1-p1)/(1-p0)): added by a non-event
        self.cusum_up = 0.0  # evidence for p1 (the alarm)
        self.cusum_down = 0.0  # evidence for p0 (the all-clear, only counted in the drift state)
        self._crossed = False
        self.window: deque[bool] = deque(maxlen=settings.window_requests)
        self._window_hits = 0
        self.detected = False
        self.score = 0.0

    def set_reference(self, rate: float, n: int) -> None:
        s = self.settings
        self.reference_rate, self.reference_n = float(rate), int(n)
        # An upper confidence bound: a reference that happened to be quiet must not make normal noisy.
        upper = rate + s.rate_confidence_z * math.sqrt(max(rate * (1 - rate), 1e-12) / max(n, 1))
        self.p0 = min(max(upper, s.rate_floor), 0.5)
        self.p1 = min(self.p0 + s.rate_shift_sigmas * math.sqrt(self.p0 * (1 - self.p0)), 0.999)
        self._llr_hit = math.log(self.p1 / self.p0)
        self._llr_miss = math.log((1 - self.p1) / (1 - self.p0))
        self.cusum_up = self.cusum_down = 0.0

    def add(self, hit: bool) -> None:
        s = self.settings
        if self.reference_rate is None:
            if self._skipped < s.warmup_requests:
                self._skipped += 1
                return
            self._learn_n += 1
            self._learn_hits += int(hit)
            if self._learn_n >= s.reference_requests:
                self.set_reference(self._learn_hits / self._learn_n, self._learn_n)
            return
        if len(self.window) == self.window.maxlen:
            self._window_hits -= self.window[0]
        self.window.append(hit)
        self._window_hits += hit
        step = self._llr_hit if hit else self._llr_miss
        cap = SCORE_CAP * s.cusum_threshold
        self.cusum_up = min(cap, max(0.0, self.cusum_up + step))
        if self.cusum_up >= s.cusum_threshold:
            self._crossed = True
        if self.detected:
            self.cusum_down = min(cap, max(0.0, self.cusum_down - step))

    def check(self) -> Evidence:
        s = self.settings
        hits = self._window_hits
        details: dict[str, Any] = {
            "reference": {"rate": self.reference_rate, "n": self.reference_n}
            if self.reference_rate is not None
            else {"n": self._learn_n, "learning": True},
            "current": {"rate": round(hits / len(self.window), 5) if self.window else None, "n": len(self.window)},
            "window_requests": s.window_requests,
        }
        if self.reference_rate is None:
            details["guard"] = "min_samples"
            self.score = 0.0
            return Evidence(self.signal, "cusum", 0.0, False, details)
        score = round(min(SCORE_CAP, self.cusum_up / s.cusum_threshold), 4)
        alarm = self._crossed
        details.update(
            p0=round(self.p0, 5),
            p1=round(self.p1, 5),
            cusum=round(self.cusum_up, 4),
            cusum_clear=round(self.cusum_down, 4),
            thresholds={"cusum": s.cusum_threshold},
        )
        self.score = score
        if not self.detected and alarm:
            self.detected, self.cusum_down = True, 0.0
        elif self.detected and self.cusum_down >= s.cusum_threshold:
            self.detected, self.cusum_up, self._crossed = False, 0.0, False
            self.score = 0.0
        if not self.detected:
            self._crossed = False
        return Evidence(self.signal, "cusum", score, alarm, details)


Detector = DistributionDetector | RateDetector


class _Gauge(Protocol):
    def labels(self, *args: str, **kwargs: str) -> Any: ...


class ModelDrift:
    """The six detectors of one model."""

    def __init__(self, model: str, settings: DriftSettings) -> None:
        self.model = model
        self.distributions = {name: DistributionDetector(name, settings) for name in DISTRIBUTION_SIGNALS}
        self.rates = {name: RateDetector(name, settings) for name in RATE_SIGNALS}
        self.detectors: dict[str, Detector] = {**self.distributions, **self.rates}
        self.since_check = 0
        self.last_check = 0.0


class DriftMonitor:
    """Per-model drift detection fed one `RequestSignals` per finished request (`observe`).

    `score_gauge` / `detected_gauge`: the server's `slm_drift_score{model,signal}` and
    `slm_drift_detected{model,signal}` (or None); or `publish(model, signal, score, detected)` to set
    them some other way (see `for_server`). `clock` is injectable so the benchmark replays traffic in
    simulated time.
    """

    def __init__(
        self,
        settings: DriftSettings | None = None,
        *,
        score_gauge: _Gauge | None = None,
        detected_gauge: _Gauge | None = None,
        publish: Callable[[str, str, float, bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger = logger,
    ) -> None:
        self.settings = settings or DriftSettings()
        self._score_gauge = score_gauge
        self._detected_gauge = detected_gauge
        self._publish_to = publish
        self._clock = clock
        self._log = log
        self._lock = threading.Lock()
        self._models: dict[str, ModelDrift] = {}
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._pinned: dict[str, Any] | None = None
        if self.settings.reference_file is not None:
            self._pinned = load_reference(self.settings.reference_file)

    # -- feeding -------------------------------------------------------------------------------
    def observe(self, signals: SignalsLike) -> None:
        """Record one finished request; runs the tests when a check is due. Never raises."""
        try:
            self._observe(signals)
        except Exception:  # drift detection must never fail a request
            self._log.exception("drift detection failed on a request")

    def _observe(self, signals: SignalsLike) -> None:
        model = signals.model
        with self._lock:
            md = self._models.get(model)
            if md is None:
                md = self._new_model(model)
            dist, rates = md.distributions, md.rates
            failed = bool(signals.error) or signals.finish_reason in ("error", "timeout")
            rates["error"].add(failed)
            if not failed and signals.finish_reason not in ("cancelled", "abort"):
                # The other signals describe outputs: a failed or cancelled request has none.
                rates["empty_output"].add(bool(signals.empty))
                if not signals.structured:
                    # A grammar shapes a structured output (forced keys and punctuation: another
                    # perplexity; the schema's length; calls that repeat by design), so a change in
                    # the share of JSON traffic would read as drift. Only free text feeds these.
                    if signals.perplexity is not None:
                        dist["perplexity"].add(float(signals.perplexity))
                    dist["output_length"].add(float(signals.output_tokens))
                    rates["finish_length"].add(signals.finish_reason == "length")
                    rates["repetition"].add(bool(signals.repetitive))
            md.since_check += 1
            now = self._clock()
            since = now - md.last_check
            if (
                md.since_check >= self.settings.check_every_requests
                and since >= self.settings.min_check_interval_seconds
            ) or since >= self.settings.check_interval_seconds:
                self._check(md, now)

    def check_now(self) -> dict[str, dict[str, Evidence]]:
        """Run every test now (for tests and the benchmark's end of run); returns the evidence."""
        with self._lock:
            now = self._clock()
            return {model: self._check(md, now) for model, md in self._models.items()}

    def _new_model(self, model: str) -> ModelDrift:
        md = ModelDrift(model, self.settings)
        md.last_check = self._clock()
        if self._pinned is not None:
            apply_reference(md, self._pinned)
        self._models[model] = md
        for name in SIGNALS:
            self._publish(model, name, 0.0, False)
        return md

    def _check(self, md: ModelDrift, now: float) -> dict[str, Evidence]:
        md.since_check = 0
        md.last_check = now
        found = {}
        for name, detector in md.detectors.items():
            before = detector.detected
            evidence = detector.check()
            found[name] = evidence
            self._publish(md.model, name, detector.score, detector.detected)
            if detector.detected != before:
                self._log_change(md.model, detector, evidence)
        return found

    def _publish(self, model: str, signal: str, score: float, detected: bool) -> None:
        if self._publish_to is not None:
            self._publish_to(model, signal, score, detected)
        if self._score_gauge is None and self._detected_gauge is None:
            return
        children = self._children.get((model, signal))
        if children is None:  # bound once per (model, signal), not .labels() per check
            children = (
                self._score_gauge.labels(model=model, signal=signal) if self._score_gauge else None,
                self._detected_gauge.labels(model=model, signal=signal) if self._detected_gauge else None,
            )
            self._children[(model, signal)] = children
        score_child, detected_child = children
        if score_child is not None:
            score_child.set(score)
        if detected_child is not None:
            detected_child.set(1.0 if detected else 0.0)

    def _log_change(self, model: str, detector: Detector, ev: Evidence) -> None:
        event = "drift_detected" if detector.detected else "drift_cleared"
        evidence = {"signal": detector.signal, "detector": ev.detector, "score": ev.score, **ev.details}
        if ev.detector == "cusum":
            what = f"CUSUM {ev.details.get('cusum')} (threshold {self.settings.cusum_threshold:g})"
        else:
            what = f"KS p={ev.details.get('p_value', float('nan')):.3g}, PSI {ev.details.get('psi')}"
        verb = "detected" if detector.detected else "cleared"
        level = logging.WARNING if detector.detected else logging.INFO
        # The server's JSON formatter (slm_server.logs) merges `fields` into the line.
        self._log.log(
            level,
            f"drift {verb} on {detector.signal} of {model}: {what}",
            extra={
                "fields": {
                    "event": event,
                    "gen_ai.request.model": model,
                    "slm.drift.signal": detector.signal,
                    "slm.drift": evidence,
                }
            },
        )

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{model: {signal: {"score", "detected", "reference_ready"}}} — for tests and debugging."""
        with self._lock:
            out: dict[str, dict[str, dict[str, Any]]] = {}
            for model, md in self._models.items():
                out[model] = {}
                for name, d in md.detectors.items():
                    ready = (
                        d.reference is not None
                        if isinstance(d, DistributionDetector)
                        else (d.reference_rate is not None)
                    )
                    out[model][name] = {"score": d.score, "detected": d.detected, "reference_ready": ready}
            return out

    def export_reference(self, model: str) -> dict[str, Any]:
        """The learned reference of `model`, in the format SLM_DRIFT_REFERENCE_FILE takes."""
        with self._lock:
            md = self._models[model]
            signals: dict[str, Any] = {}
            for name, d in md.detectors.items():
                if isinstance(d, DistributionDetector):
                    values = d.reference_values()
                    if values is not None:
                        signals[name] = {"values": values}
                elif d.reference_rate is not None:
                    signals[name] = {"rate": d.reference_rate, "n": d.reference_n}
            return {"version": REFERENCE_FORMAT_VERSION, "model": model, "signals": signals}


def load_reference(path: Path) -> dict[str, Any]:
    """Read and validate a pinned reference file (the format of `DriftMonitor.export_reference`)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("version") != REFERENCE_FORMAT_VERSION:
        raise ValueError(f"{path}: not a drift reference of version {REFERENCE_FORMAT_VERSION}")
    signals = data.get("signals")
    if not isinstance(signals, dict):
        raise ValueError(f"{path}: 'signals' must be an object")
    for name, entry in signals.items():
        if name not in SIGNALS:
            raise ValueError(f"{path}: unknown signal {name!r} (known: {', '.join(SIGNALS)})")
        if name in DISTRIBUTION_SIGNALS and not isinstance(entry.get("values"), list):
            raise ValueError(f"{path}: {name} needs 'values' (a list of numbers)")
        if name in RATE_SIGNALS and not (0 <= float(entry.get("rate", -1)) <= 1 and int(entry.get("n", 0)) > 0):
            raise ValueError(f"{path}: {name} needs 'rate' in [0, 1] and 'n' > 0")
    return data


def apply_reference(md: ModelDrift, data: Mapping[str, Any]) -> None:
    for name, entry in data["signals"].items():
        detector = md.detectors[name]
        if isinstance(detector, DistributionDetector):
            detector.set_reference(float(v) for v in entry["values"])
        else:
            detector.set_reference(float(entry["rate"]), int(entry["n"]))


def for_server(metrics: Any, settings: DriftSettings | None = None) -> DriftMonitor | None:
    """The server's observer (slm_server.signals.SignalObserver), or None when SLM_DRIFT_ENABLED=false.

    `metrics` is the server's ServerMetrics/NullMetrics: its `drift_score` / `drift_detected` hold the
    gauges' children per signal, bound to the served model. A signal it has no child for is detected
    and logged but not exported.
    """
    settings = settings or DriftSettings()
    if not settings.enabled:
        return None
    scores: Mapping[str, Any] = getattr(metrics, "drift_score", {})
    detected: Mapping[str, Any] = getattr(metrics, "drift_detected", {})

    def publish(model: str, signal: str, score: float, is_detected: bool) -> None:
        if signal in scores:
            scores[signal].set(score)
        if signal in detected:
            detected[signal].set(1.0 if is_detected else 0.0)

    return DriftMonitor(settings, publish=publish)
