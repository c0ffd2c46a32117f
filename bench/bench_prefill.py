"""What a long prompt costs the generations already running: chunked prefill against one pass.

    .venv/bin/python bench/bench_prefill.py [--chunks 0 512 128] [--prompt-tokens 1800] [--streams 4]
                                            [--rounds 3] [--json OUT]

`--streams` greedy generations run (short prompts, continuous batching); once all of them are in the
running batch, a prompt of `--prompt-tokens` tokens arrives. Each engine differs only by
`prefill_chunk_tokens` (0 = the whole prompt in one pass), all in this process, on the same model,
rounds alternating between them. Reported per engine, medians over rounds:

  longest gap      the longest wait between two tokens of a running stream while the prompt is
                   prefilled: what its user sees as the stream stalling (the server's inter-token
                   latency histogram, `slm_inter_token_latency_seconds`, records it)
  usual gap        the median wait between two tokens of the running streams over the whole round
  time to first    the long prompt's time to its first token (chunks interleave decode steps, so it
  token            is longer in chunks: the price of the shorter stall)

The model is a Llama-architecture model with random weights (no checkpoint can be downloaded
here) and a 2,048-token context, built in a temporary directory with the tiny model's tokenizer:
hidden size 256, 4 layers, grouped-query attention. The tiny model's 256-token context is too short
for a prefill to stand out from a decode step. On a GPU both passes are faster, and the prefill's
share grows with the prompt's length the same way.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "server"))

from slm_devtools.tinymodel import ensure_tiny_model  # noqa: E402
from slm_server.generation.transformers_engine import TransformersEngine  # noqa: E402
from slm_server.generation.types import GenerationResult, SamplingParams  # noqa: E402
from slm_server.settings import Settings  # noqa: E402

CONTEXT = 2048
STREAM_PROMPTS = ["Return a new list of the", "The file is", "If the value is not None, the function", "A"]
LONG_TEXT = "The value of the list is returned to the caller when the file is not found. "


def build_model(target: Path) -> None:
    """A random-weight Llama-architecture model directory with the tiny model's tokenizer."""
    from transformers import AutoTokenizer

    save_random_llama(target, AutoTokenizer.from_pretrained(ensure_tiny_model(log=lambda *_: None)))


def save_random_llama(target: Path, tokenizer: Any) -> None:
    """A Llama-architecture model with random weights (256 hidden, 4 layers, 2,048 positions) over
    `tokenizer`'s vocabulary, saved with it in `target`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer.model_max_length = CONTEXT
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=CONTEXT,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)


def _round(engine: TransformersEngine, long_ids: list[int], streams: int, stream_tokens: int) -> dict[str, float]:
    params = SamplingParams(max_tokens=stream_tokens, temperature=0)
    results: list[Any] = [None] * streams

    def run(i: int) -> None:
        results[i] = engine.generate(engine.encode(STREAM_PROMPTS[i % len(STREAM_PROMPTS)]), params)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while engine.batch_stats()[0] < streams:  # type: ignore[index]  # all of them decoding
        if time.monotonic() > deadline:
            raise SystemExit("the streams did not all start")
        time.sleep(0.001)
    arrived = time.perf_counter()
    long_result = engine.generate(long_ids, SamplingParams(max_tokens=1, temperature=0))
    first_token = long_result.token_times[0]
    for t in threads:
        t.join()
    gaps, stalls = [], []
    for result in results:
        assert isinstance(result, GenerationResult)
        times = result.token_times
        if times[-1] < first_token:
            raise SystemExit("a stream ended before the long prompt was prefilled: raise the stream tokens")
        for before, after in itertools.pairwise(times):
            gaps.append(after - before)
            if after > arrived and before < first_token:  # a wait that overlaps the prefill
                stalls.append(after - before)
    return {
        "longest_gap_ms": max(stalls) * 1000,
        "usual_gap_ms": statistics.median(gaps) * 1000,
        "time_to_first_token_ms": (first_token - arrived) * 1000,
    }


def run(chunks: list[int], prompt_tokens: int, streams: int, rounds: int, stream_tokens: int = 96) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-prefill-") as tmp:
        model_dir = Path(tmp)
        build_model(model_dir)
        engines = {}
        for chunk in chunks:
            engine = TransformersEngine(
                Settings(model=str(model_dir), max_concurrent_requests=streams + 1, prefill_chunk_tokens=chunk)
            )
            engine.load()
            engines[chunk] = engine
        try:
            first = next(iter(engines.values()))
            long_ids = first.encode(LONG_TEXT * (prompt_tokens // 16 + 1))[:prompt_tokens]
            by_round: dict[int, list[dict[str, float]]] = {chunk: [] for chunk in chunks}
            for _ in range(rounds):
                for chunk, engine in engines.items():
                    by_round[chunk].append(_round(engine, long_ids, streams, stream_tokens))
        finally:
            for engine in engines.values():
                engine.close()
    results: dict[str, Any] = {"prompt_tokens": len(long_ids), "streams": streams, "engines": {}}
    for chunk, figures in by_round.items():
        results["engines"][str(chunk)] = {key: statistics.median(f[key] for f in figures) for key in figures[0]}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 512, 128])
    parser.add_argument("--prompt-tokens", type=int, default=1800)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = run(args.chunks, args.prompt_tokens, args.streams, args.rounds)
    print(
        f"a {results['prompt_tokens']}-token prompt arrives while {args.streams} generations run; random-weight "
        f"Llama (256 hidden, 4 layers) on the CPU; medians of {args.rounds} rounds"
    )
    engines = results["engines"]
    baseline = engines.get("0")
    for chunk, r in engines.items():
        name = "one pass" if chunk == "0" else f"chunks of {chunk}"
        line = (
            f"  {name:>16}: longest gap {r['longest_gap_ms']:7.1f} ms   usual gap {r['usual_gap_ms']:5.1f} ms"
            f"   its time to first token {r['time_to_first_token_ms']:7.1f} ms"
        )
        if baseline is not None and chunk != "0":
            line += (
                f"   longest gap / one pass's {r['longest_gap_ms'] / baseline['longest_gap_ms']:4.2f}"
                f"   time to first token / one pass's "
                f"{r['time_to_first_token_ms'] / baseline['time_to_first_token_ms']:4.2f}"
            )
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
