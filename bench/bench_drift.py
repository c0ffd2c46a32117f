# ruff: noqa: RUF001, RUF002  (sigma, the standard deviation, is meant)
"""Replay benchmark of model-behaviour drift detection: recall, detection delay, false alarms.

    .venv/bin/python bench/bench_drift.py                 # full run (a few minutes on 2 cores)
    .venv/bin/python bench/bench_drift.py --quick         # fewer repetitions, one stable model-day
    .venv/bin/python bench/bench_drift.py --no-promql     # skip the Prometheus side
    .venv/bin/python bench/bench_drift.py --sweep         # candidate defaults, side by side

The replay core (pools, drifts, detectors, the PromQL backfill) is slm_devtools.drift_replay, shared
with tests/drift/test_detection_quality.py; this script runs it and prints the tables.

What it does
1. **Pools of real per-request signals.** The project's tiny model (`slm_devtools.tinymodel`) generates
   answers (sampling, temperature 1, up to MAX_NEW_TOKENS) for three kinds of traffic:
   in-distribution prompts (openings of prose paragraphs like its training corpus), shifted traffic
   (the same openings with their characters scrambled, sampled at temperature 1.3: a new client
   sending text the model does not know, with its own sampling settings), and degenerate decoding
   (greedy with a repetition *reward*: the loops a broken sampler or a bad quantisation produces).
   Each answer keeps its tokens and per-token negative log-likelihoods, so
   perplexity, output length, finish reason, emptiness and repetition can be recomputed for any
   truncation. Generated once per tiny-model version, cached under `cache_dir()/bench-drift/`.
2. **Replay in simulated time.** Requests arrive as a Poisson stream (RATE_PER_S). Their signals are
   resampled from the pools, so a model-week costs seconds. Scenarios: a stable period, then one
   injected drift of a given size, measured in standard deviations (σ) of the reference signal:
   * `prompt_shift`: a share f of requests come from the shifted pool; f is chosen so the mean
     perplexity moves by size·σ(perplexity).
   * `truncation`: every answer is cut at L tokens (a lowered max_new_tokens / stop sequence); L is
     chosen so the mean output length falls by size·σ(output length).
   * `repetition`: a share of answers come from the degenerate pool; the repetitive-output rate rises
     by size·σ, σ = sqrt(p(1-p)) of the reference rate p (floored at 1 %).
   * `errors`: the error rate steps up by size·σ (same σ convention).
3. **Detectors, side by side**, fed the same stream:
   * `server`: slm_server.drift.DriftMonitor with its defaults (KS+PSI, CUSUM), on a simulated clock.
   * `static`: fixed thresholds an SRE would write without drift detection, evaluated every minute
     over 5 minutes with `for: 5m`: mean perplexity > 1.5x normal, mean output length < 0.5x normal,
     error / empty / repetitive / length-finish share > 5 % (the seed's error-rate threshold) or
     twice its normal share, whichever is higher.
   * `promql`: the SLMPerplexityDrift / SLMOutputLengthDrift rules exactly as
     `slm_operator.monitoring.rules.render_rule_groups` renders them, over the same streams turned
     into scraped counters (15 s scrapes), backfilled into a real Prometheus TSDB with
     `promtool tsdb create-blocks-from openmetrics`, recording rules backfilled level by level with
     `promtool tsdb create-blocks-from rules`, the alert expression read back with a range query and
     its `for` applied. Only the two signals the rules cover.
4. **Figures** per detector and drift type/size: recall within DEADLINE_MIN simulated minutes, median
   detection delay (simulated minutes), and false alarms per model-week of stable traffic (every
   detector's alarms during stable traffic, all signals together).
5. **--sweep**: the PromQL alerts under every combination of SWEEP_WINDOWS (window/baselineWindow),
   SWEEP_Z (zScore) and SWEEP_FOR (`for`), and the server's detector under SWEEP_SERVER settings,
   summarised per candidate: worst recall within 15 minutes over the drifts of at least
   --goal-size σ, the range of median delays, false alarms per model-week.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

from slm_devtools import drift_replay as dr
from slm_devtools.drift_replay import DEADLINE_MIN, DRIFT_RUN_S, WEEK_S, Outcome, PoolStats, PromqlCell, ReplayResult
from slm_server.drift import DriftSettings

# The drift alerts' defaults before the sweep (for: 15m could not fire within 15 minutes): compared in every run.
PREVIOUS_DEFAULTS = {"window": "15m", "baselineWindow": "1d", "zScore": 3.0, "for": "15m"}
# --sweep: the PromQL candidates (every combination) ...
SWEEP_WINDOWS = (("5m", "1d"), ("10m", "1d"), ("15m", "1d"))  # one baseline per run: see promql_detector
SWEEP_Z = (3.0, 4.0, 5.0)
SWEEP_FOR = ("15m", "10m", "5m", "3m", "2m")
# ... and the server's (DriftSettings fields that differ from the defaults).
SWEEP_SERVER: dict[str, dict[str, Any]] = {
    "defaults": {},
    "min_samples 50": {"min_samples": 50},
    "window 150, min_samples 50": {"window_requests": 150, "min_samples": 50},
    "cusum_threshold 10": {"cusum_threshold": 10.0},
}


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def _fmt_delay(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def render_tables(
    st: PoolStats, result: ReplayResult, promql: list[PromqlCell] | None, args: argparse.Namespace
) -> str:
    knobs = {(d.kind, d.size): (d.knob if d.reachable else "not reachable with these pools") for d in result.drifts}
    rows = [(o.detector, o) for o in result.outcomes]
    if promql is not None:
        rows += [(o.detector, o) for cell in promql for o in cell.outcomes]
    lines = [
        f"Traffic: {args.rate:g} request/s (Poisson), tiny model, max_new_tokens {dr.MAX_NEW_TOKENS}; "
        f"reference: perplexity {st.ppl_mean:.1f} ± {st.ppl_sd:.1f}, output length {st.len_mean:.1f} ± "
        f"{st.len_sd:.1f} tokens, repetitive {st.rep_rate:.2%}, length-finish {st.length_share:.1%}, "
        f"errors {dr.BASE_ERROR_RATE:.1%}.",
        f"Recall = share of injected drifts detected by the targeted signal within {DEADLINE_MIN:g} simulated "
        f"minutes; delay = median minutes from onset to detection (detections up to {DRIFT_RUN_S / 60:g} min); "
        f"{args.reps} runs per cell in-process, {args.promql_reps} per cell for PromQL.",
        "",
        "| drift | size | injected as | detector | recall ≤15 min | median delay (min) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    order = {name: i for i, name in enumerate(["server", "static"])}
    rows.sort(key=lambda r: (dr.DRIFT_TYPES.index(r[1].drift), r[1].size, order.get(r[0], 9), r[0]))
    for name, o in rows:
        if not o.delays_min:
            recall, delay = "n/a", "n/a"
        else:
            recall, delay = f"{o.recall():.2f}", _fmt_delay(o.median_delay())
        lines.append(f"| {o.drift} | {o.size:g}σ | {knobs[(o.drift, o.size)]} | {name} | {recall} | {delay} |")
    lines += [
        "",
        "| detector | stable traffic (model-weeks) | false alarms | per model-week | by signal |",
        "| --- | --- | --- | --- | --- |",
    ]
    weeks = result.stable_s / WEEK_S
    for name, count in result.false_alarms.items():
        by = ", ".join(f"{k} {v}" for k, v in sorted(result.false_alarm_signals[name].items())) or "—"
        lines.append(f"| {name} | {weeks:.2f} | {count} | {count / weeks:.2f} | {by} |")
    for cell in promql or []:
        lines.append(
            f"| promql {cell.label} | {cell.stable_s / WEEK_S:.2f} | {cell.false_alarms} | "
            f"{cell.per_week():.2f} | perplexity + output length alerts |"
        )
    return "\n".join(lines)


def goal_cells(outcomes: list[Outcome], st: PoolStats, goal_size: float) -> list[Outcome]:
    """The outcomes the goal is judged on: drifts of at least goal_size σ, or the largest reachable size
    of a kind where none that large is (truncation: this model's lengths allow about 1σ)."""
    chosen: list[Outcome] = []
    for kind in dict.fromkeys(o.drift for o in outcomes):
        mine = [o for o in outcomes if o.drift == kind and o.delays_min]
        big = [o for o in mine if o.size >= goal_size]
        if not big and mine:
            big = [max(mine, key=lambda o: o.size)]
        chosen += big
    return chosen


def summarise(
    name: str, outcomes: list[Outcome], false_alarms: int, stable_s: float, st: PoolStats, goal: float
) -> str:
    cells = goal_cells(outcomes, st, goal)
    worst = min(cells, key=lambda o: o.recall())
    delays = [d for d in (o.median_delay() for o in cells) if d is not None]
    span = f"{min(delays):.1f}–{max(delays):.1f}" if delays else "—"
    per_week = false_alarms / (stable_s / WEEK_S)
    ok = worst.recall() >= 0.9 and per_week <= 1.0
    return (
        f"| {name} | {worst.recall():.2f} ({worst.drift} {worst.size:g}σ) | {span} | "
        f"{false_alarms} in {stable_s / WEEK_S:.2f} = {per_week:.2f} | {'yes' if ok else 'no'} |"
    )


def sweep(st: PoolStats, args: argparse.Namespace, log: Any) -> str:
    lines = [
        f"Sweep at {args.rate:g} request/s; goal judged on drifts ≥ {args.goal_size:g}σ (truncation: its largest "
        f"reachable size); {args.reps} runs per cell in-process, {args.promql_reps} for PromQL.",
        "",
        "| candidate | worst recall ≤15 min | median delays (min) | false alarms (model-weeks) = per week | goal met |",
        "| --- | --- | --- | --- | --- |",
    ]
    if not args.no_server:

        def server(name: str, fields: dict[str, Any]) -> Any:
            return lambda: dr.ServerDetector(DriftSettings(**fields), name=name)

        detectors = {f"server {name}": server(f"server {name}", fields) for name, fields in SWEEP_SERVER.items()}
        result = dr.replay(
            st,
            reps=args.reps,
            stable_weeks=args.stable_weeks,
            seed=args.seed,
            log=log,
            rate=args.rate,
            detectors=detectors,
        )
        for name in detectors:
            mine = [o for o in result.outcomes if o.detector == name]
            lines.append(summarise(name, mine, result.false_alarms[name], result.stable_s, st, args.goal_size))
    if not args.no_promql:
        configs = [
            {"window": w, "baselineWindow": b, "zScore": z, "for": f}
            for (w, b), z, f in itertools.product(SWEEP_WINDOWS, SWEEP_Z, SWEEP_FOR)
        ]
        cells = dr.promql_detector(
            st,
            reps=args.promql_reps,
            stable_weeks=min(args.stable_weeks, 1.0),
            seed=args.seed,
            log=log,
            configs=configs,
            rate=args.rate,
        )
        for cell in cells:
            lines.append(
                summarise(f"promql {cell.label}", cell.outcomes, cell.false_alarms, cell.stable_s, st, args.goal_size)
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 runs per cell, 1 stable model-day")
    parser.add_argument("--reps", type=int, default=None, help="runs per drift type and size (default 20)")
    parser.add_argument("--stable-weeks", type=float, default=None, help="extra stable model-weeks (default 2)")
    parser.add_argument("--promql-reps", type=int, default=None, help="runs per cell on the PromQL side (5)")
    parser.add_argument("--no-promql", action="store_true", help="skip the Prometheus side")
    parser.add_argument("--no-server", action="store_true", help="--sweep: skip the in-process side")
    parser.add_argument("--rate", type=float, default=dr.RATE_PER_S, help="requests per simulated second (1)")
    parser.add_argument("--seed", type=int, default=20261126)
    parser.add_argument("--sweep", action="store_true", help="compare candidate defaults (see SWEEP_*)")
    parser.add_argument("--goal-size", type=float, default=2.0, help="--sweep: judge drifts of this many σ up")
    parser.add_argument(
        "--promql-config",
        action="append",
        type=json.loads,
        default=None,
        help="PromQL alert settings to compare, as JSON (repeatable; default: the operator defaults and "
        'PREVIOUS_DEFAULTS), e.g. \'{"for": "5m", "zScore": 4}\'',
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    args.reps = args.reps or (5 if args.quick else 20)
    args.stable_weeks = args.stable_weeks if args.stable_weeks is not None else (1 / 7 if args.quick else 2.0)
    args.promql_reps = args.promql_reps or (3 if args.quick else 5)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.monotonic()
    st = PoolStats(dr.load_pools(log))
    log(f"[bench-drift] pools: {json.dumps(st.describe())}")
    if args.sweep:
        print(sweep(st, args, log))
        print(f"\n({time.monotonic() - started:.0f} s wall clock)")
        return 0
    result = dr.replay(st, reps=args.reps, stable_weeks=args.stable_weeks, seed=args.seed, log=log, rate=args.rate)
    promql = None
    if not args.no_promql:
        configs = args.promql_config or [None, PREVIOUS_DEFAULTS]
        promql = dr.promql_detector(
            st,
            reps=args.promql_reps,
            stable_weeks=min(args.stable_weeks, 1.0),
            seed=args.seed,
            log=log,
            configs=configs,
            rate=args.rate,
        )
    print(render_tables(st, result, promql, args))
    print(f"\n({time.monotonic() - started:.0f} s wall clock)")
    if args.json:
        payload: dict[str, Any] = {
            "pools": st.describe(),
            "outcomes": [o.__dict__ for o in result.outcomes],
            "false_alarms": result.false_alarms,
            "stable_model_weeks": result.stable_s / WEEK_S,
        }
        if promql is not None:
            payload["promql"] = {
                cell.label: {
                    "outcomes": [o.__dict__ for o in cell.outcomes],
                    "false_alarms": cell.false_alarms,
                    "stable_model_weeks": cell.stable_s / WEEK_S,
                }
                for cell in promql
            }
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
