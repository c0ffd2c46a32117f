# ruff: noqa: RUF002  (sigma, the standard deviation, is meant)
"""The core of the drift replay: per-request signals, drifts, detectors, replay in simulated time.

Used by the replay benchmark (bench/bench_drift.py, which documents the method and prints the tables)
and by the quality test (tests/drift/test_detection_quality.py, a reduced run with assertions), so both
measure the same thing.

* **Signals** come from a `SignalPools`: three pools of per-request signals (in-distribution traffic,
  shifted traffic, degenerate decoding) and the in-distribution pool cut at a lower output cap.
  `TinyModelPools` makes them with the project's tiny model (answers kept with their per-token
  log-likelihoods, so any cap is recomputed offline). `MetricsDeltaSource` makes them from any
  server that exposes the `slm_*` metrics contract (the built-in server, or the monitoring sidecar in
  front of another runtime): one request at a time, the signals of a request are the differences of
  its counters between two scrapes of `/metrics`, i.e. what that server itself measured.
* **Detectors** fed the same stream: the in-server `DriftMonitor` (any `DriftSettings`), static
  thresholds, and the PromQL drift alerts as the operator renders them (any `alerts` settings),
  evaluated by a real Prometheus over the stream turned into scraped counters and backfilled with
  promtool.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import random
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from slm_server.drift import DriftMonitor, DriftSettings
from slm_server.paths import cache_dir

POOL_VERSION = "3"
MAX_NEW_TOKENS = 64
RATE_PER_S = 1.0  # requests per simulated second: a small, steadily used deployment
DEADLINE_MIN = 15.0  # the goal: detected within 15 simulated minutes
WEEK_S = 7 * 86400
SIZES = (0.5, 1.0, 2.0, 3.0, 5.0)
DRIFT_TYPES = ("prompt_shift", "truncation", "repetition", "errors")
TARGET_SIGNAL = {
    "prompt_shift": "perplexity",
    "truncation": "output_length",
    "repetition": "repetition",
    "errors": "error",
}
BASE_ERROR_RATE = 0.002
RATE_SIGMA_FLOOR = 0.01
REPETITION_NGRAM = 3


# ----------------------------------------------------------------------------------------------
# 1. Pools of real per-request signals from the tiny model
# ----------------------------------------------------------------------------------------------
@dataclass
class Answer:
    """One generated answer, as the server counts it: the end-of-text token, when emitted, is an output
    token and part of the perplexity (slm_server.engine.GenerationResult)."""

    tokens: list[int]
    nll: list[float]  # per output token, natural log
    eos: bool  # ended by the end-of-text token (finish_reason "stop") rather than the length cap
    visible_from: int | None  # tokens needed before the decoded text is not blank (None: never)


def is_repetitive(tokens: list[int]) -> bool:
    """The repetition signal: fewer than half of the output's token trigrams are distinct."""
    try:  # the server's own definition when it exports one
        fn = getattr(importlib.import_module("slm_server.signals"), "is_repetitive", None)
    except ImportError:
        fn = None
    if fn is not None:
        try:
            return bool(fn(tokens))
        except TypeError:
            pass
    if len(tokens) < 12:
        return False
    grams = [tuple(tokens[i : i + REPETITION_NGRAM]) for i in range(len(tokens) - REPETITION_NGRAM + 1)]
    return len(set(grams)) < 0.5 * len(grams)


def prompts(count: int, seed: int) -> tuple[list[str], list[str]]:
    """(in-distribution, shifted) prompts: paragraph openings, and the same openings scrambled."""
    from slm_devtools.tinymodel import build_corpus

    docs = build_corpus()
    rng = random.Random(seed)
    picks = rng.sample(docs, min(count, len(docs)))
    normal = [" ".join(d.split()[: rng.randint(4, 14)]) for d in picks]
    shifted = []
    for prompt in normal:
        chars = list(prompt)
        rng.shuffle(chars)
        shifted.append("".join(chars))
    return normal, shifted


def _generate(
    model: Any,
    tok: Any,
    prompts: list[str],
    *,
    seed: int,
    degenerate: bool,
    log: Callable[[str], None],
    temperature: float = 1.0,
) -> list[Answer]:
    import torch

    torch.manual_seed(seed)
    eos = tok.eos_token_id
    tok.padding_side = "left"
    answers: list[Answer] = []
    batch = 100
    for start in range(0, len(prompts), batch):
        enc = tok(prompts[start : start + batch], return_tensors="pt", padding=True)
        kwargs: dict[str, Any] = (
            {"do_sample": False, "repetition_penalty": 0.4}
            if degenerate
            else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        )
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=MAX_NEW_TOKENS,
                pad_token_id=eos,
                eos_token_id=eos,
                return_dict_in_generate=True,
                output_logits=True,
                **kwargs,
            )
        new = out.sequences[:, enc["input_ids"].shape[1] :]
        # Perplexity is the model's own (temperature 1) likelihood of what it emitted.
        logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)
        chosen = logprobs.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        for row in range(new.shape[0]):
            ids = new[row].tolist()
            end = ids.index(eos) + 1 if eos in ids else len(ids)
            visible = next(
                (k for k in range(1, end + 1) if tok.decode(ids[:k], skip_special_tokens=True).strip()), None
            )
            answers.append(
                Answer(
                    tokens=ids[:end],
                    nll=[-float(x) for x in chosen[row, :end]],
                    eos=ids[end - 1] == eos,
                    visible_from=visible,
                )
            )
        log(f"[bench-drift]   {len(answers)}/{len(prompts)} answers")
    return answers


POOL_SIZES = {"normal": 1200, "shifted": 600, "degenerate": 200}
# The shifted client also samples hotter. Scrambled prompts alone move the tiny model's output perplexity
# by only ~0.7 sd (its own samples stay about as likely whatever the prompt); with temperature 1.3 the
# shifted pool sits ~5 sd above the reference, so every benchmarked size is a share of it.
SHIFTED_TEMPERATURE = 1.3


def load_pools(log: Callable[[str], None]) -> dict[str, list[Answer]]:
    """The three pools, each from the cache or generated with the tiny model (minutes on a busy CPU)."""
    from slm_devtools.tinymodel import TINY_MODEL_VERSION, ensure_tiny_model

    key = hashlib.sha256(f"{POOL_VERSION}-{TINY_MODEL_VERSION}-{MAX_NEW_TOKENS}".encode()).hexdigest()[:12]
    folder = cache_dir() / "bench-drift" / f"pools-{key}"
    pools: dict[str, list[Answer]] = {}
    model = tok = None
    normal, shifted = prompts(sum(POOL_SIZES.values()), seed=1)
    texts_of = {
        "normal": normal[: POOL_SIZES["normal"]],
        "shifted": shifted[POOL_SIZES["normal"] : POOL_SIZES["normal"] + POOL_SIZES["shifted"]],
        "degenerate": normal[POOL_SIZES["normal"] + POOL_SIZES["shifted"] :],
    }
    for seed, (name, texts) in enumerate(texts_of.items(), start=2):
        path = folder / f"{name}.json"
        if path.exists():
            pools[name] = [Answer(**a) for a in json.loads(path.read_text())]
            continue
        if model is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model_dir = ensure_tiny_model(log=log)
            torch.set_num_threads(1)  # the machine is shared; one thread does not spin against others
            tok = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        started = time.monotonic()
        pools[name] = _generate(
            model,
            tok,
            texts,
            seed=seed,
            degenerate=name == "degenerate",
            log=log,
            temperature=SHIFTED_TEMPERATURE if name == "shifted" else 1.0,
        )
        log(f"[bench-drift] generated the {name} pool ({len(texts)} answers) in {time.monotonic() - started:.0f}s")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([a.__dict__ for a in pools[name]]))
        tmp.rename(path)
    return pools


@dataclass
class Signals:
    """Per-request signals in the shape of slm_server.signals.RequestSignals (what the detectors read)."""

    perplexity: float | None
    output_tokens: int
    finish_reason: str
    empty: bool
    repetitive: bool
    error: bool
    model: str = "tiny"
    structured: bool = False


def answer_signals(answer: Answer, *, cap: int = MAX_NEW_TOKENS) -> Signals:
    tokens, nll = answer.tokens[:cap], answer.nll[:cap]
    truncated = len(answer.tokens) > cap or not answer.eos
    return Signals(
        perplexity=math.exp(sum(nll) / len(nll)) if nll else None,
        output_tokens=len(tokens),
        finish_reason="length" if truncated else "stop",
        empty=answer.visible_from is None or answer.visible_from > cap,
        repetitive=is_repetitive(tokens),
        error=False,
    )


class SignalPools(Protocol):
    """Where the replayed requests' signals come from: three pools, and the normal pool under a lower cap.

    `max_cap` is the output cap the pools were made with; `truncated(cap)` is the in-distribution pool
    as it would be with `max_tokens` = cap (a server-side source asks the server again with that cap).
    """

    max_cap: int
    normal: list[Signals]
    shifted: list[Signals]
    degenerate: list[Signals]

    def truncated(self, cap: int) -> list[Signals]: ...


class TinyModelPools:
    """The pools from generated answers (`load_pools`): any cap is recomputed from the kept tokens."""

    def __init__(self, pools: dict[str, list[Answer]]) -> None:
        self.pools = pools
        self.max_cap = MAX_NEW_TOKENS
        self.normal = [answer_signals(a) for a in pools["normal"]]
        self.shifted = [answer_signals(a) for a in pools["shifted"]]
        self.degenerate = [answer_signals(a) for a in pools["degenerate"]]
        self._truncated: dict[int, list[Signals]] = {}

    def truncated(self, cap: int) -> list[Signals]:
        if cap not in self._truncated:
            self._truncated[cap] = [answer_signals(a, cap=cap) for a in self.pools["normal"]]
        return self._truncated[cap]


FINISH_REASONS = ("stop", "length", "abort", "timeout", "error")


def _totals(text: str, model: str | None) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if model is not None and sample.labels.get("model", model) != model:
                continue
            key = (sample.name, sample.labels.get("finish_reason", ""))
            out[key] = out.get(key, 0.0) + sample.value
    return out


def signals_from_scrapes(before: str, after: str, *, model: str | None = None) -> Signals:
    """One request's signals from two scrapes of a server's `/metrics` around it (and nothing else).

    Reads only the `slm_*` contract (docs/reference/metrics.md): `slm_request_perplexity` and `model_output_tokens`
    (sum and count), `slm_request_finish_total{finish_reason}`, `slm_empty_outputs_total`,
    `slm_repetitive_outputs_total`. So the signals are what that server measured, whichever runtime
    generated the answer.
    """
    b, a = _totals(before, model), _totals(after, model)

    def delta(name: str, reason: str = "") -> float:
        return a.get((name, reason), 0.0) - b.get((name, reason), 0.0)

    finish = next((r for r in FINISH_REASONS if delta("slm_request_finish_total", r) > 0), "error")
    ppl_count = delta("slm_request_perplexity_count")
    return Signals(
        perplexity=delta("slm_request_perplexity_sum") / ppl_count if ppl_count > 0 else None,
        output_tokens=round(delta("model_output_tokens_sum")),
        finish_reason=finish,
        empty=delta("slm_empty_outputs_total") > 0,
        repetitive=delta("slm_repetitive_outputs_total") > 0,
        error=finish in ("error", "timeout"),
        model=model or "tiny",
    )


class MetricsDeltaSource:
    """Pools measured by a running server that speaks the `slm_*` contract (built-in server or sidecar).

    `requests` maps each pool ("normal", "shifted", "degenerate") to the JSON bodies of completion
    requests (prompt, max_tokens, temperature, ...). `send(body)` makes one request; `scrape()` returns
    the server's `/metrics` text (`over_http` builds both for a URL; a test may pass an in-process
    client's). The requests go one at a time, `/metrics` scraped before and after each
    (`signals_from_scrapes`); `truncated(cap)` sends the normal bodies again with `max_tokens` = cap.
    Anything that takes a `SignalPools` (PoolStats, the replay, the PromQL side) then runs on what that
    server measured.
    """

    def __init__(
        self,
        requests: Mapping[str, Sequence[Mapping[str, Any]]],
        *,
        send: Callable[[Mapping[str, Any]], object],
        scrape: Callable[[], str],
        max_cap: int = MAX_NEW_TOKENS,
        model: str | None = None,
    ) -> None:
        self.requests, self.send, self.scrape, self.model = requests, send, scrape, model
        self.max_cap = max_cap
        self.normal = self.collect(requests["normal"])
        self.shifted = self.collect(requests["shifted"])
        self.degenerate = self.collect(requests["degenerate"])
        self._truncated: dict[int, list[Signals]] = {max_cap: self.normal}

    @classmethod
    def over_http(
        cls,
        base_url: str,
        requests: Mapping[str, Sequence[Mapping[str, Any]]],
        *,
        path: str = "/v1/completions",
        timeout_s: float = 120.0,
        **kwargs: Any,
    ) -> MetricsDeltaSource:
        base = base_url.rstrip("/")

        def scrape() -> str:
            with urllib.request.urlopen(f"{base}/metrics", timeout=timeout_s) as resp:  # noqa: S310 - under test
                return str(resp.read().decode())

        def send(body: Mapping[str, Any]) -> object:
            req = urllib.request.Request(  # noqa: S310 - the server under test
                f"{base}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310
                    return resp.read()
            except urllib.error.HTTPError as exc:  # an error answer is a signal too
                return exc.read()

        return cls(requests, send=send, scrape=scrape, **kwargs)

    def collect(self, bodies: Sequence[Mapping[str, Any]]) -> list[Signals]:
        out = []
        for body in bodies:
            before = self.scrape()
            self.send(body)
            out.append(signals_from_scrapes(before, self.scrape(), model=self.model))
        return out

    def truncated(self, cap: int) -> list[Signals]:
        if cap not in self._truncated:
            self._truncated[cap] = self.collect([{**b, "max_tokens": cap} for b in self.requests["normal"]])
        return self._truncated[cap]


class PoolStats:
    """The pools, and the reference statistics sizes are measured in."""

    def __init__(self, source: SignalPools | dict[str, list[Answer]]) -> None:
        if isinstance(source, dict):
            source = TinyModelPools(source)
        self.source = source
        self.normal, self.shifted, self.degenerate = source.normal, source.shifted, source.degenerate
        ppl = np.array([s.perplexity for s in self.normal if s.perplexity is not None])
        self.ppl_mean, self.ppl_sd = float(ppl.mean()), float(ppl.std())
        shifted_ppl = np.array([s.perplexity for s in self.shifted if s.perplexity is not None])
        self.shifted_ppl_mean = float(shifted_ppl.mean())
        lengths = np.array([s.output_tokens for s in self.normal], dtype=float)
        self.len_mean, self.len_sd = float(lengths.mean()), float(lengths.std())
        self.rep_rate = float(np.mean([s.repetitive for s in self.normal]))
        self.degenerate_rep_rate = float(np.mean([s.repetitive for s in self.degenerate]))
        self.empty_rate = float(np.mean([s.empty for s in self.normal]))
        self.length_share = float(np.mean([s.finish_reason == "length" for s in self.normal]))

    def truncated(self, cap: int) -> list[Signals]:
        return self.source.truncated(cap)

    def cap_for(self, size: float) -> int | None:
        """The largest output cap that lowers the mean output length by at least size·σ.

        The drop only grows as the cap falls, so a binary search asks for a few caps, not every one
        (each is a pool's worth of requests with a server-side source).
        """

        def enough(cap: int) -> bool:
            mean = float(np.mean([s.output_tokens for s in self.truncated(cap)]))
            return self.len_mean - mean >= size * self.len_sd

        if not enough(1):
            return None
        low, high = 1, self.source.max_cap  # enough(low) holds; the uncut pool (high) drops by 0
        while high - low > 1:
            mid = (low + high) // 2
            if enough(mid):
                low = mid
            else:
                high = mid
        return low

    def describe(self) -> dict[str, Any]:
        return {
            "perplexity": {
                "mean": round(self.ppl_mean, 1),
                "sd": round(self.ppl_sd, 1),
                "shifted_pool_mean": round(self.shifted_ppl_mean, 1),
            },
            "output_length": {"mean": round(self.len_mean, 1), "sd": round(self.len_sd, 1)},
            "rates": {
                "repetitive": round(self.rep_rate, 4),
                "degenerate_pool_repetitive": round(self.degenerate_rep_rate, 3),
                "empty": round(self.empty_rate, 4),
                "finish_length": round(self.length_share, 4),
                "error": BASE_ERROR_RATE,
            },
            "pool_sizes": {
                "normal": len(self.normal),
                "shifted": len(self.shifted),
                "degenerate": len(self.degenerate),
            },
        }


def rate_sigma(p: float) -> float:
    p = max(p, RATE_SIGMA_FLOOR)
    return math.sqrt(p * (1 - p))


# ----------------------------------------------------------------------------------------------
# 2. Scenarios replayed in simulated time
# ----------------------------------------------------------------------------------------------
ERROR_SIGNALS = Signals(
    perplexity=None, output_tokens=0, finish_reason="error", empty=True, repetitive=False, error=True
)


@dataclass
class Drift:
    """One injected drift: what changes, by how much (in σ), and the knob that achieves it."""

    kind: str
    size: float
    knob: str = ""
    reachable: bool = True
    share: float = 0.0  # prompt_shift / repetition: share of requests from the other pool
    cap: int = MAX_NEW_TOKENS  # truncation: output cap
    error_rate: float = BASE_ERROR_RATE

    @classmethod
    def make(cls, kind: str, size: float, st: PoolStats) -> Drift:
        if kind == "prompt_shift":
            share = size * st.ppl_sd / (st.shifted_ppl_mean - st.ppl_mean)
            return cls(kind, size, knob=f"{share:.0%} shifted prompts", share=share, reachable=0 < share <= 1)
        if kind == "truncation":
            cap = st.cap_for(size)
            return cls(kind, size, knob=f"max_new_tokens {cap}", cap=cap or 0, reachable=cap is not None)
        if kind == "repetition":
            target = st.rep_rate + size * rate_sigma(st.rep_rate)
            share = (target - st.rep_rate) / (st.degenerate_rep_rate - st.rep_rate)
            return cls(kind, size, knob=f"repetitive {target:.1%}", share=share, reachable=0 < share <= 1)
        if kind == "errors":
            rate = BASE_ERROR_RATE + size * rate_sigma(BASE_ERROR_RATE)
            return cls(kind, size, knob=f"errors {rate:.1%}", error_rate=rate)
        raise ValueError(kind)


class Traffic:
    """Draws one request's signals, stable or under a drift."""

    def __init__(self, st: PoolStats, rng: np.random.Generator, *, rate: float = RATE_PER_S) -> None:
        self.st = st
        self.rng = rng
        self.rate = rate

    def stream(
        self, *, end_s: float, onset_s: float = math.inf, drift: Drift | None = None, rate: float | None = None
    ) -> Iterator[tuple[float, Signals]]:
        """Poisson arrivals until end_s; from onset_s on, requests follow `drift`. Draws are vectorised."""
        rng, st = self.rng, self.st
        rate = rate or self.rate
        n = int(end_s * rate * 1.2) + 100
        times = np.cumsum(rng.exponential(1 / rate, size=n))
        u_error, u_mix = rng.random(n), rng.random(n)
        normal_idx = rng.integers(len(st.normal), size=n)
        other: list[Signals] = st.normal
        if drift is not None and drift.kind == "prompt_shift":
            other = st.shifted
        elif drift is not None and drift.kind == "repetition":
            other = st.degenerate
        other_idx = rng.integers(len(other), size=n)
        truncated = st.truncated(drift.cap) if drift is not None and drift.kind == "truncation" else st.normal
        for i in range(n):
            t = float(times[i])
            if t >= end_s:
                return
            if t < onset_s or drift is None:
                yield t, ERROR_SIGNALS if u_error[i] < BASE_ERROR_RATE else st.normal[normal_idx[i]]
            elif u_error[i] < drift.error_rate:
                yield t, ERROR_SIGNALS
            elif drift.kind == "truncation":
                yield t, truncated[normal_idx[i]]
            elif u_mix[i] < drift.share:
                yield t, other[other_idx[i]]
            else:
                yield t, st.normal[normal_idx[i]]


class ServerDetector:
    """slm_server.drift.DriftMonitor on a simulated clock; state changes read from its log events."""

    name = "server"

    def __init__(self, settings: DriftSettings | None = None, name: str = "server") -> None:
        self.name = name
        self.now = 0.0
        self.events: list[tuple[float, str, str]] = []  # (t, "drift_detected"|"drift_cleared", signal)
        log = logging.Logger("bench.drift", level=logging.INFO)
        log.addHandler(_Capture(self))
        self.monitor = DriftMonitor(settings or DriftSettings(), clock=lambda: self.now, log=log)

    def observe(self, t: float, s: Signals) -> None:
        self.now = t
        self.monitor.observe(s)


class _Capture(logging.Handler):
    def __init__(self, owner: ServerDetector) -> None:
        super().__init__()
        self.owner = owner

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None) or {}
        if "slm.drift" in fields:
            self.owner.events.append((self.owner.now, fields["event"], fields["slm.drift.signal"]))


@dataclass
class _Minute:
    n: int = 0
    ppl_sum: float = 0.0
    ppl_n: int = 0
    len_sum: float = 0.0
    ok: int = 0
    errors: int = 0
    empty: int = 0
    repetitive: int = 0
    length: int = 0


class StaticThresholds:
    """The baseline: fixed thresholds on 5-minute means/shares, evaluated each minute, `for: 5m`."""

    name = "static"
    WINDOW_MIN = 5
    FOR_MIN = 5

    def __init__(self, st: PoolStats) -> None:
        self.limits = {
            "perplexity": ("gt", 1.5 * st.ppl_mean),
            "output_length": ("lt", 0.5 * st.len_mean),
            # 5 % (the seed's error-rate threshold), or twice the normal share where that is higher.
            "finish_length": ("gt", max(0.05, 2 * st.length_share)),
            "empty_output": ("gt", max(0.05, 2 * st.empty_rate)),
            "repetition": ("gt", max(0.05, 2 * st.rep_rate)),
            "error": ("gt", max(0.05, 2 * BASE_ERROR_RATE)),
        }
        self.minutes: deque[_Minute] = deque(maxlen=self.WINDOW_MIN)
        self.current = _Minute()
        self.minute = 0
        self.active_since: dict[str, int | None] = dict.fromkeys(self.limits)
        self.firing: dict[str, bool] = dict.fromkeys(self.limits, False)
        self.events: list[tuple[float, str, str]] = []

    def observe(self, t: float, s: Signals) -> None:
        minute = int(t // 60)
        while self.minute < minute:
            self._evaluate()
        m = self.current
        m.n += 1
        if s.error:
            m.errors += 1
            return
        m.ok += 1
        m.len_sum += s.output_tokens
        if s.perplexity is not None:
            m.ppl_sum += s.perplexity
            m.ppl_n += 1
        m.empty += s.empty
        m.repetitive += s.repetitive
        m.length += s.finish_reason == "length"

    def _evaluate(self) -> None:
        self.minutes.append(self.current)
        self.current = _Minute()
        self.minute += 1
        if len(self.minutes) < self.WINDOW_MIN:
            return
        tot = _Minute()
        for m in self.minutes:
            for key in tot.__dict__:
                setattr(tot, key, getattr(tot, key) + getattr(m, key))
        values = {
            "perplexity": tot.ppl_sum / tot.ppl_n if tot.ppl_n else None,
            "output_length": tot.len_sum / tot.ok if tot.ok else None,
            "finish_length": tot.length / tot.ok if tot.ok else None,
            "empty_output": tot.empty / tot.ok if tot.ok else None,
            "repetition": tot.repetitive / tot.ok if tot.ok else None,
            "error": tot.errors / tot.n if tot.n else None,
        }
        for signal, (op, limit) in self.limits.items():
            value = values[signal]
            bad = value is not None and (value > limit if op == "gt" else value < limit)
            if not bad:
                if self.firing[signal]:
                    self.events.append((self.minute * 60.0, "drift_cleared", signal))
                self.active_since[signal], self.firing[signal] = None, False
                continue
            since = self.active_since[signal]
            if since is None:
                self.active_since[signal] = since = self.minute
            if not self.firing[signal] and self.minute - since >= self.FOR_MIN:
                self.firing[signal] = True
                self.events.append((self.minute * 60.0, "drift_detected", signal))


@dataclass
class Outcome:
    detector: str
    drift: str
    size: float
    delays_min: list[float | None] = field(default_factory=list)  # None: not detected within the run

    def recall(self) -> float:
        return sum(d is not None and d <= DEADLINE_MIN for d in self.delays_min) / max(1, len(self.delays_min))

    def median_delay(self) -> float | None:
        hits = sorted(d for d in self.delays_min if d is not None)
        return hits[len(hits) // 2] if hits else None


def first_detection(events: list[tuple[float, str, str]], signal: str, onset_s: float) -> float | None:
    """Minutes from onset to the first time `signal` is in the drift state at or after onset."""
    state = False
    for t, event, sig in events:
        if sig != signal:
            continue
        if t >= onset_s:
            if state:  # already alarmed (a false alarm still standing): count it as caught at onset
                return 0.0
            if event == "drift_detected":
                return (t - onset_s) / 60
        state = event == "drift_detected"
    return 0.0 if state else None


def false_alarms(events: list[tuple[float, str, str]], until_s: float) -> int:
    return sum(1 for t, event, _ in events if event == "drift_detected" and t < until_s)


# ----------------------------------------------------------------------------------------------
# 3. The replay of the in-process detectors (server, static)
# ----------------------------------------------------------------------------------------------
ONSET_S = 60 * 60.0  # drift starts an hour in: the reference is learned by then (1,020 requests)
# DriftSettings' warm-up + reference (the defaults; 1,020 requests)
LEARN_REQUESTS = int(DriftSettings.model_fields["warmup_requests"].default) + int(
    DriftSettings.model_fields["reference_requests"].default
)
DRIFT_RUN_S = 30 * 60.0  # drift lasts 30 minutes; later than that counts as missed
LEARNED_BY_S = 20 * 60.0  # stable exposure for false alarms is counted from here


@dataclass
class ReplayResult:
    outcomes: list[Outcome]
    drifts: list[Drift]
    stable_s: float
    false_alarms: dict[str, int]
    false_alarm_signals: dict[str, dict[str, int]]


def _count_false_alarms(result: ReplayResult, detector: Any, until_s: float) -> None:
    for t, event, signal in detector.events:
        if event == "drift_detected" and t < until_s:
            result.false_alarms[detector.name] += 1
            per = result.false_alarm_signals[detector.name]
            per[signal] = per.get(signal, 0) + 1


class Detector(Protocol):
    name: str
    events: list[tuple[float, str, str]]

    def observe(self, t: float, s: Signals) -> None: ...


def default_detectors(st: PoolStats, settings: DriftSettings | None = None) -> dict[str, Callable[[], Detector]]:
    """The in-process detectors the benchmark compares: the server's (with `settings`) and static thresholds."""
    return {"server": lambda: ServerDetector(settings), "static": lambda: StaticThresholds(st)}


def replay(
    st: PoolStats,
    *,
    reps: int,
    stable_weeks: float,
    seed: int,
    log: Callable[[str], None] = lambda _: None,
    rate: float = RATE_PER_S,
    detectors: Mapping[str, Callable[[], Detector]] | None = None,
    kinds: Sequence[str] = DRIFT_TYPES,
    sizes: Sequence[float] | Mapping[str, Sequence[float]] = SIZES,
) -> ReplayResult:
    """Each drift (kind x size) `reps` times, then `stable_weeks` of stable traffic, through every detector.

    `detectors` maps a name to a factory of a fresh detector (default: `default_detectors(st)`); `sizes`
    are the drift sizes in σ, for every kind or per kind.
    """
    makers = dict(detectors) if detectors is not None else default_detectors(st)
    names = tuple(makers)
    result = ReplayResult([], [], 0.0, dict.fromkeys(names, 0), {n: {} for n in names})
    started = time.monotonic()
    # At lower traffic the reference takes longer to learn: the drift starts 40 minutes after it is.
    learned_by = max(LEARNED_BY_S, 1.2 * LEARN_REQUESTS / rate)
    onset = max(ONSET_S, LEARN_REQUESTS / rate + 40 * 60)
    for kind in kinds:
        k = DRIFT_TYPES.index(kind)
        for size in sizes[kind] if isinstance(sizes, Mapping) else sizes:
            j = SIZES.index(size) if size in SIZES else 100 + int(size * 100)
            drift = Drift.make(kind, size, st)
            result.drifts.append(drift)
            outcomes = {n: Outcome(n, kind, size) for n in names}
            result.outcomes.extend(outcomes.values())
            if not drift.reachable:
                continue
            for rep in range(reps):
                traffic = Traffic(st, np.random.default_rng([seed, k, j, rep]), rate=rate)
                running = [make() for make in makers.values()]
                for t, s in traffic.stream(end_s=onset + DRIFT_RUN_S, onset_s=onset, drift=drift):
                    for det in running:
                        det.observe(t, s)
                for det in running:
                    outcomes[det.name].delays_min.append(first_detection(det.events, TARGET_SIGNAL[kind], onset))
                    _count_false_alarms(result, det, onset)
                result.stable_s += onset - learned_by
        log(f"[bench-drift] {kind}: done ({time.monotonic() - started:.0f}s)")
    # Long stable traffic: the false-alarm rate needs model-weeks, not hours.
    total = stable_weeks * WEEK_S
    chunk = 0
    while total > 0:
        span = min(total, WEEK_S)
        traffic = Traffic(st, np.random.default_rng([seed, 99, chunk]), rate=rate)
        running = [make() for make in makers.values()]
        for t, s in traffic.stream(end_s=span):
            for det in running:
                det.observe(t, s)
        for det in running:
            _count_false_alarms(result, det, span)
        result.stable_s += span - learned_by
        total -= span
        chunk += 1
        log(f"[bench-drift] stable model-week {chunk}: done ({time.monotonic() - started:.0f}s)")
    return result


# ----------------------------------------------------------------------------------------------
# 4. The PromQL detector: rendered rules over backfilled series in a real Prometheus
# ----------------------------------------------------------------------------------------------
PROMQL_KINDS = ("prompt_shift", "truncation")
PROMQL_ALERT = {"prompt_shift": "SLMPerplexityDrift", "truncation": "SLMOutputLengthDrift"}
SCRAPE_S = 15
PROMQL_ONSET_S = 26 * 3600.0  # a full 1d baseline (and the 12h history guard) before the drift
PROMQL_GUARD_S = 13 * 3600.0  # stable exposure for false alarms is counted from here
NAMESPACE = "bench"
SHARED_EVAL_S = 30  # the shared recording rules' evaluation interval (the Prometheus Operator's default)


@dataclass
class PromSeries:
    job: str
    kind: str | None  # None: the long stable run
    size: float
    onset_s: float
    end_s: float
    times: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ppl: np.ndarray = field(default_factory=lambda: np.zeros(0))  # NaN: no perplexity (empty / error)
    length: np.ndarray = field(default_factory=lambda: np.zeros(0))  # NaN: error


def _arrays(signals: list[Signals]) -> tuple[np.ndarray, np.ndarray]:
    ppl = np.array([s.perplexity if s.perplexity is not None else np.nan for s in signals], dtype=float)
    return ppl, np.array([s.output_tokens for s in signals], dtype=float)


def promql_stream(
    st: PoolStats, series: PromSeries, drift: Drift | None, rng: np.random.Generator, *, rate: float = RATE_PER_S
) -> None:
    """The same traffic model as Traffic.stream, vectorised (a day of requests per series)."""
    n = rng.poisson(series.end_s * rate)
    times = np.sort(rng.uniform(0, series.end_s, n))
    ppl_n, len_n = _arrays(st.normal)
    idx = rng.integers(len(st.normal), size=n)
    ppl, length = ppl_n[idx], len_n[idx]
    drifting = times >= series.onset_s
    error_rate = np.where(drifting & (drift is not None), drift.error_rate if drift else 0, BASE_ERROR_RATE)
    if drift is not None and drift.kind == "prompt_shift":
        ppl_s, len_s = _arrays(st.shifted)
        pick = drifting & (rng.random(n) < drift.share)
        j = rng.integers(len(st.shifted), size=int(pick.sum()))
        ppl[pick], length[pick] = ppl_s[j], len_s[j]
    if drift is not None and drift.kind == "truncation":
        ppl_t, len_t = _arrays(st.truncated(drift.cap))
        ppl[drifting], length[drifting] = ppl_t[idx[drifting]], len_t[idx[drifting]]
    failed = rng.random(n) < error_rate
    ppl[failed], length[failed] = np.nan, np.nan
    series.times, series.ppl, series.length = times, ppl, length


def write_openmetrics(path: Path, all_series: list[PromSeries], t0: float) -> int:
    """Counters as the server exposes them, one scrape every SCRAPE_S. Returns the sample count."""
    families: dict[str, list[str]] = {
        "slm_request_perplexity_sum": [],
        "slm_request_perplexity_count": [],
        "model_output_tokens_sum": [],
        "model_output_tokens_count": [],
    }
    for s in all_series:
        scrapes = np.arange(SCRAPE_S, s.end_s + 1e-9, SCRAPE_S)
        ok_ppl = ~np.isnan(s.ppl)
        ok_len = ~np.isnan(s.length)
        cum = {
            "slm_request_perplexity_sum": np.cumsum(np.where(ok_ppl, s.ppl, 0.0)),
            "slm_request_perplexity_count": np.cumsum(ok_ppl.astype(float)),
            "model_output_tokens_sum": np.cumsum(np.where(ok_len, s.length, 0.0)),
            "model_output_tokens_count": np.cumsum(ok_len.astype(float)),
        }
        upto = np.searchsorted(s.times, scrapes, side="right")
        labels = (
            f'container="server",endpoint="/v1/completions",instance="{s.job}:8000",job="{s.job}",'
            f'model="tiny",namespace="{NAMESPACE}",pod="{s.job}-5d8f7c9b4-abcde",service="{s.job}"'
        )
        stamps = [f"{t0 + x:.0f}" for x in scrapes]
        for name, values in cum.items():
            at = np.where(upto > 0, values[np.maximum(upto - 1, 0)], 0.0)
            families[name].extend(f"{name}{{{labels}}} {v:.10g} {ts}" for v, ts in zip(at, stamps, strict=True))
    lines = 0
    with path.open("w") as out:
        for name, samples in families.items():
            out.write(f"# TYPE {name} unknown\n")
            out.write("\n".join(samples) + "\n")
            lines += len(samples)
        out.write("# EOF\n")
    return lines


class Prometheus:
    """A real Prometheus process over a TSDB directory (loopback, free port, no scraping)."""

    def __init__(self, binary: str, data: Path, work: Path) -> None:
        self.binary, self.data, self.work = binary, data, work
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        config = self.work / "prometheus.yml"
        config.write_text("global: {scrape_interval: 15s}\n")
        self.url = f"http://127.0.0.1:{port}"
        self.log = (self.work / "prometheus.log").open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.data}",
                "--storage.tsdb.retention.time=100y",
                f"--web.listen-address=127.0.0.1:{port}",
                "--query.max-samples=200000000",
                "--query.timeout=10m",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: see {self.work / 'prometheus.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:  # noqa: S310 - loopback http
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("prometheus did not become ready in 120 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            self.log.close()

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[list[Any]]:
        """The [timestamp, value] pairs of the expression's (single) series, in chunks under the API's
        11,000-points-per-series limit."""
        values: list[list[Any]] = []
        chunk = 10_000 * step
        at = start
        while at <= end:
            stop = min(end, at + chunk - step)
            params = urllib.parse.urlencode({"query": expr, "start": at, "end": stop, "step": step})
            try:
                with urllib.request.urlopen(f"{self.url}/api/v1/query_range?{params}", timeout=600) as resp:  # noqa: S310
                    body = json.load(resp)
            except urllib.error.HTTPError as exc:
                raise RuntimeError(f"query failed: {exc.read().decode(errors='replace')}") from exc
            result = body["data"]["result"]
            if len(result) > 1:
                raise RuntimeError(f"expected one series from {expr!r}, got {len(result)}")
            if result:
                values.extend(result[0]["values"])
            at = stop + step
        return values


def _block_hours(level: list[dict[str, Any]], parse_duration: Callable[[str], float]) -> int:
    shortest = min(parse_duration(g["interval"]) for g in level)
    return max(1, int(10_000 * shortest // 3600))


def _check(proc: subprocess.CompletedProcess[bytes]) -> None:
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, proc.args))} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-2000:]}"
        )


def _firing_times(values: list[list[Any]], for_s: float) -> list[float]:
    """Times an alert with this `for` goes to firing, from its expression's range-query result.

    Prometheus semantics: pending from the first evaluation where the expression has a result,
    firing at the first evaluation at least `for` later while it kept a result at every evaluation.
    """
    fired: list[float] = []
    active_since: float | None = None
    previous: float | None = None
    firing = False
    step = None
    for ts, _ in values:
        t = float(ts)
        if previous is not None and step is None:
            step = t - previous
        if previous is not None and step is not None and t - previous > step * 1.5:  # a gap: it resolved
            active_since, firing = None, False
        if active_since is None:
            active_since = t
        if not firing and t - active_since >= for_s:
            firing = True
            fired.append(t)
        previous = t
    return fired


DRIFT_CONFIGS = ("perplexityDrift", "outputLengthDrift")


def drift_alerts(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """`spec.monitoring.alerts` that sets both drift alerts to `config` (None: the operator's defaults)."""
    if not config:
        return None
    return {key: dict(config) for key in DRIFT_CONFIGS}


def config_label(config: Mapping[str, Any] | None) -> str:
    """A drift alert configuration as the tables name it, defaults filled in: `window 15m/1d z 3 for 15m`."""
    from slm_operator.monitoring.defaults import merged_alerts

    merged = merged_alerts(drift_alerts(config))["perplexityDrift"]
    return f"window {merged['window']}/{merged['baselineWindow']} z {merged['zScore']:g} for {merged['for']}"


@dataclass
class PromqlCell:
    """One drift alert configuration's figures over the replayed series."""

    label: str
    config: dict[str, Any]
    outcomes: list[Outcome]
    false_alarms: int
    stable_s: float

    def per_week(self) -> float:
        return self.false_alarms / (self.stable_s / WEEK_S)


def promql_detector(
    st: PoolStats,
    *,
    reps: int,
    stable_weeks: float,
    seed: int,
    log: Callable[[str], None] = lambda _: None,
    configs: Sequence[Mapping[str, Any] | None] = (None,),
    rate: float = RATE_PER_S,
    kinds: Sequence[str] = PROMQL_KINDS,
    sizes: Sequence[float] | Mapping[str, Sequence[float]] = SIZES,
) -> list[PromqlCell]:
    """Recall/delay/false alarms of the drift alerts as rendered for each of `configs`.

    A config is the part of `perplexityDrift` / `outputLengthDrift` to set (`window`, `baselineWindow`,
    `zScore`, `for`; None or {}: the defaults), applied to both alerts. The series are backfilled once;
    the recording rules of every distinct window/baseline once per level; each alert expression (with its
    threshold) is read back with a range query and its rendered `for` applied.
    """
    import yaml

    from slm_devtools.tools import tool
    from slm_operator.monitoring.rules import parse_duration, render_rule_groups, shared_rule_groups

    promtool, prometheus = str(tool("promtool")), str(tool("prometheus"))
    started = time.monotonic()
    all_series: list[PromSeries] = []
    drifts: dict[tuple[str, float], Drift] = {}
    for kind in kinds:
        k = DRIFT_TYPES.index(kind)
        for size in sizes[kind] if isinstance(sizes, Mapping) else sizes:
            j = SIZES.index(size) if size in SIZES else 100 + int(size * 100)
            drift = Drift.make(kind, size, st)
            drifts[(kind, size)] = drift
            if not drift.reachable:
                continue
            for rep in range(reps):
                s = PromSeries(f"d{k}s{j}r{rep}", kind, size, PROMQL_ONSET_S, PROMQL_ONSET_S + DRIFT_RUN_S)
                promql_stream(st, s, drift, np.random.default_rng([seed, 7, k, j, rep]), rate=rate)
                all_series.append(s)
    long_s = 86400.0 + stable_weeks * WEEK_S
    stable = PromSeries("stable", None, 0.0, math.inf, long_s)
    promql_stream(st, stable, None, np.random.default_rng([seed, 8]), rate=rate)
    all_series.append(stable)

    # Rules as rendered for each series' deployment (job = the SLMDeployment name), per config. Recording
    # rules are the same for configs that share window and baseline: each is backfilled once.
    # The shared per-target counters the drift means read; then mean; avg + stddev; zscore (each level
    # reads the one before, so each is backfilled after the one before it).
    levels: list[list[dict[str, Any]]] = [[], [], [], []]
    seen_records: dict[tuple[str, str], str] = {}  # (job, record) -> expression
    # (config index, job, alert name) -> (expr, for seconds, evaluation interval seconds)
    alert_rules: dict[tuple[int, str, str], tuple[str, float, float]] = {}
    for c, config in enumerate(configs):
        for s in all_series:
            groups = render_rule_groups(name=s.job, namespace=NAMESPACE, alerts=drift_alerts(config))
            for g in (g for g in groups if ".drift-" in g["name"]):
                records = [r for r in g["rules"] if "record" in r]
                for n, part in enumerate((records[:1], records[1:3], records[3:]), start=1):
                    fresh = []
                    for r in part:
                        key = (s.job, r["record"])
                        if key not in seen_records:
                            seen_records[key] = r["expr"]
                            fresh.append(r)
                        elif seen_records[key] != r["expr"]:  # e.g. two baselines of one window: one zscore name
                            raise ValueError(f"configs {configs} record {r['record']} two ways: replay them apart")
                    if fresh:
                        levels[n].append({"name": f"{g['name']}-c{c}-l{n}", "interval": g["interval"], "rules": fresh})
                for r in g["rules"]:
                    if "alert" in r:
                        alert_rules[(c, s.job, r["alert"])] = (
                            r["expr"],
                            parse_duration(r["for"]),
                            parse_duration(g["interval"]),
                        )

    drift_text = json.dumps(levels[1])
    levels[0] = [
        {
            "name": g["name"],
            "interval": f"{SHARED_EVAL_S}s",
            "rules": [r for r in g["rules"] if r["record"] in drift_text],
        }
        for g in shared_rule_groups()
        if g["name"].endswith(".runtime-builtin")
    ]
    assert levels[0] and levels[0][0]["rules"], "no shared recording rule feeds the drift rules"

    now = time.time()
    t0 = math.floor((now - long_s - 3 * 86400) / 3600) * 3600  # in the past, on whole hours
    end = t0 + max(s.end_s for s in all_series)
    work = Path(tempfile.mkdtemp(prefix="bench-drift-promql-"))
    prom = Prometheus(prometheus, work / "data", work)
    try:
        om = work / "series.om"
        samples = write_openmetrics(om, all_series, t0)
        (work / "data").mkdir()
        proc = subprocess.run(
            # One block for the whole range (the default 2h blocks make hundreds, slowly); a hidden flag.
            [
                promtool,
                "tsdb",
                "create-blocks-from",
                "openmetrics",
                "--max-block-duration=2400h",
                str(om),
                str(work / "data"),
            ],
            check=False,
            capture_output=True,
        )
        _check(proc)
        om.unlink()
        log(f"[bench-drift] promql: {samples} samples backfilled ({time.monotonic() - started:.0f}s)")
        for n, level in enumerate(levels):
            rule_file = work / f"level{n}.yml"
            rule_file.write_text(yaml.safe_dump({"groups": level}, sort_keys=False))
            prom.start()
            out = work / f"rules{n}"
            proc = subprocess.run(
                [
                    promtool,
                    "tsdb",
                    "create-blocks-from",
                    "rules",
                    f"--start={t0:.0f}",
                    f"--end={end:.0f}",
                    f"--url={prom.url}",
                    f"--output-dir={out}",
                    "--eval-interval=60s",  # each group's own interval takes precedence
                    # Hidden flag: blocks as long as one range query may go (11,000 points a series) at the
                    # level's shortest interval, not the default 2h (hundreds of blocks, slowly).
                    f"--max-block-duration={_block_hours(level, parse_duration)}h",
                    str(rule_file),
                ],
                check=False,
                capture_output=True,
            )
            _check(proc)
            prom.stop()
            for block in out.iterdir():
                if block.is_dir():
                    shutil.move(str(block), str(work / "data" / block.name))
            log(f"[bench-drift] promql: recording rules level {n} backfilled ({time.monotonic() - started:.0f}s)")
        prom.start()
        cells: list[PromqlCell] = []
        for c, config in enumerate(configs):
            outcomes = {(kind, size): Outcome(f"promql {config_label(config)}", kind, size) for kind, size in drifts}
            fa = 0
            stable_s = 0.0
            for s in all_series:
                for kind, alert_name in PROMQL_ALERT.items():
                    expr, for_s, interval = alert_rules[(c, s.job, alert_name)]
                    values = prom.query_range(expr, t0 + interval, end, interval)
                    fired = [t - t0 for t in _firing_times(values, for_s)]
                    until = min(s.onset_s, s.end_s)
                    fa += sum(1 for t in fired if t < until)
                    if s.kind == kind:
                        after = [t for t in fired if t >= s.onset_s]
                        outcomes[(kind, s.size)].delays_min.append((after[0] - s.onset_s) / 60 if after else None)
                stable_s += min(s.onset_s, s.end_s) - PROMQL_GUARD_S
            cells.append(PromqlCell(config_label(config), dict(config or {}), list(outcomes.values()), fa, stable_s))
        log(f"[bench-drift] promql: done ({time.monotonic() - started:.0f}s)")
        return cells
    finally:
        prom.stop()
        shutil.rmtree(work, ignore_errors=True)
