"""Detokenization cost per generated token: the server's incremental tracker against decoding the
whole output at every token (what the server did before; simple, and quadratic in the output).

    .venv/bin/python bench/bench_detokenize.py [--lengths 64 512 2048] [--repeats 5] [--json OUT]

The tokens are the tiny model's tokenizer's encoding of English prose (its training corpus, so
words are whole tokens as in a real model's output); each length is streamed token by token through
`slm_server.engine.TextTracker` (the server's, with no stop strings) and through the baseline, in
the same process, alternating, `--repeats` times; the figure is the best run's CPU time per token.
Both produce the same text (checked). Reported: µs per token for each, and baseline / incremental.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "server"))

from slm_devtools.tinymodel import build_corpus, ensure_tiny_model  # noqa: E402
from slm_server.generation.detokenize import TextTracker  # noqa: E402


def whole_output(decode: Callable[[list[int]], str], ids: list[int]) -> str:
    """The baseline: decode everything so far at each token, emit what is new (U+FFFD held back)."""
    emitted, out = 0, []
    for n in range(1, len(ids) + 1):
        text = decode(ids[:n])
        safe = len(text.rstrip("\ufffd"))
        if safe > emitted:
            out.append(text[emitted:safe])
            emitted = safe
    return "".join(out)


def incremental(decode: Callable[[list[int]], str], ids: list[int]) -> str:
    tracker = TextTracker(decode, ())
    out, seen = [], []
    for token in ids:
        seen.append(token)
        out.append(tracker.update(seen)[0])
    out.append(tracker.finish(seen))
    return "".join(out)


def _us_per_token(fn: Callable[..., str], decode: Callable[[list[int]], str], ids: list[int]) -> tuple[float, str]:
    start = time.thread_time()
    text = fn(decode, ids)
    return (time.thread_time() - start) / len(ids) * 1e6, text


def run(lengths: list[int], repeats: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_tiny_model(log=lambda *_: None)))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    stream = tokenizer.encode(" ".join(build_corpus(200_000)), add_special_tokens=False)
    results: dict[str, Any] = {}
    for length in lengths:
        ids = stream[:length]
        timings: dict[str, list[float]] = {"whole_output": [], "incremental": []}
        for _ in range(repeats):
            for name, fn in (("whole_output", whole_output), ("incremental", incremental)):
                us, text = _us_per_token(fn, decode, ids)
                if text != decode(ids).rstrip("\ufffd"):
                    raise SystemExit(f"{name} at {length} tokens: the streamed text is not the tokens' text")
                timings[name].append(us)
        best = {name: min(values) for name, values in timings.items()}
        results[str(length)] = {**best, "ratio": best["whole_output"] / best["incremental"]}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = run(args.lengths, args.repeats)
    print("detokenization per generated token, tiny model's tokenizer, CPU time, best of", args.repeats)
    for length, r in results.items():
        print(
            f"  {length:>5} tokens: incremental {r['incremental']:7.1f} µs/token   "
            f"whole output {r['whole_output']:7.1f} µs/token   whole / incremental {r['ratio']:6.1f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
