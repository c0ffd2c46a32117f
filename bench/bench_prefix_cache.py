"""Time to first token of prompts that share a long system prompt: prefix caching on against off.

    .venv/bin/python bench/bench_prefix_cache.py [--system-tokens 1500] [--requests 8] [--rounds 3] [--json OUT]

Requests one after another, each the same `--system-tokens`-token system prompt followed by its own
question (~20 tokens), 4 generated tokens each, on two engines that differ only by
`prefix_cache_mib` (512 = the default, and 0 = off), in this process, on the same model, rounds
alternating. The first request of the "on" engine fills its cache and is not counted (nor is the
same request on the other); reported per engine: the median time to first token of the others (in
process: no HTTP), the ratio, and the share of prompt tokens found in the cache (the server's own
`slm_prefix_cache_hits_total / slm_prefix_cache_queries_total`). Then what the cache costs when it
cannot help: the same, with prompts that each begin with their own question (no shared block), so
every prefill looks up, misses, and stores its blocks.

The model is bench_prefill's: a Llama-architecture model with random weights, 2,048-token context,
on the CPU. On a GPU the prefill is faster, and what caching saves shrinks with it; the share of the
prompt that skips the model is the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_prefill import LONG_TEXT, build_model  # noqa: E402

from slm_server.generation.transformers_engine import TransformersEngine  # noqa: E402
from slm_server.generation.types import SamplingParams  # noqa: E402
from slm_server.settings import Settings  # noqa: E402

QUESTIONS = [
    "What does the function return when the list is empty?",
    "Which file does it read first, and why?",
    "When is the value not found in the list?",
    "How does the caller know that the file is missing?",
    "What is returned to the caller after the second call?",
    "Is the order of the items kept?",
    "What happens when the file is found twice?",
    "Which value is returned when none is given?",
]


def _ttft_ms(engine: TransformersEngine, ids: list[int]) -> float:
    import time

    began = time.perf_counter()
    result = engine.generate(ids, SamplingParams(max_tokens=4, temperature=0))
    return (result.token_times[0] - began) * 1000


def _times(
    engines: dict[str, TransformersEngine], prompt: Callable[[int, int], list[int]], count: int, rounds: int
) -> dict[str, list[float]]:
    """Each engine's time to first token of `prompt(round, i)` for i in 0..count, but i = 0 (which
    fills the cache)."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(rounds):
        for name, engine in engines.items():
            for i in range(count + 1):
                ttft = _ttft_ms(engine, prompt(round_, i))
                if i > 0:
                    times[name].append(ttft)
    return times


def run(system_tokens: int, requests: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as tmp:
        model_dir = Path(tmp)
        build_model(model_dir)
        engines = {}
        for name, mib in (("on", 512), ("off", 0)):
            engine = TransformersEngine(Settings(model=str(model_dir), prefix_cache_mib=mib))
            engine.load()
            engines[name] = engine
        try:
            first = engines["on"]
            system = first.encode(LONG_TEXT * (system_tokens // 16 + 1))[:system_tokens]
            prompts = [system + first.encode(" " + QUESTIONS[i % len(QUESTIONS)]) for i in range(requests + 1)]
            times = _times(engines, lambda _, i: prompts[i], requests, rounds)
            stats = first.prefix_cache_stats()
            assert stats is not None
            # Each prompt of each round its own: its first block differs from every other's.
            misses = _times(
                engines, lambda round_, i: first.encode(f"Round {round_}, question {i}: ") + system, requests, rounds
            )
        finally:
            for engine in engines.values():
                engine.close()
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    miss_on, miss_off = statistics.median(misses["on"]), statistics.median(misses["off"])
    return {
        "prompt_tokens": len(prompts[1]),
        "time_to_first_token_ms": {"on": on, "off": off},
        "off_over_on": off / on,
        "hit_share": stats[1] / stats[0],
        "no_shared_prefix_time_to_first_token_ms": {"on": miss_on, "off": miss_off},
        "no_shared_prefix_on_over_off": miss_on / miss_off,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system-tokens", type=int, default=1500)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    r = run(args.system_tokens, args.requests, args.rounds)
    ttft = r["time_to_first_token_ms"]
    print(
        f"prompts of ~{r['prompt_tokens']} tokens sharing a {args.system_tokens}-token system prompt; random-weight "
        f"Llama (256 hidden, 4 layers) on the CPU; median of {args.requests} requests x {args.rounds} rounds"
    )
    print(
        f"  time to first token: prefix caching on {ttft['on']:6.1f} ms   off {ttft['off']:6.1f} ms   "
        f"off / on {r['off_over_on']:5.2f}x   prompt tokens found in the cache {r['hit_share']:.0%}"
    )
    miss = r["no_shared_prefix_time_to_first_token_ms"]
    print(
        f"  no shared prefix (every lookup misses, every prefill stored): on {miss['on']:6.1f} ms   "
        f"off {miss['off']:6.1f} ms   on / off {r['no_shared_prefix_on_over_off']:5.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
