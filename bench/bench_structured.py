"""What structured output (`response_format`) costs: time per generated token with the grammar's
masks against the same generation without, and the time to compile a schema.

    .venv/bin/python bench/bench_structured.py [--tokens 64] [--streams 1,8] [--rounds 3] [--json OUT]

The model: a Llama-architecture model with random weights (256 hidden, 4 layers) and a 32,000-token
byte-level BPE vocabulary (Llama 2's and Mistral's size) trained here on the standard library's
sources, on the CPU. The mask's cost grows with the vocabulary, not with the model, so the tiny
test model's 2,048 tokens would understate it.

Per round, for each stream count: `streams` generations at once of exactly `--tokens` tokens each
(an array of strings, which a random model never finishes), sampled at temperature 0.8 with a seed,
once held to the schema and once free, in the same engine, one after the other. Reported: the
median time between two tokens of a stream, both ways, and the ratio. Then the time llguidance takes
to compile a schema of a dozen properties (cold: a new schema each time) against the server's cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from slm_server.generation.transformers_engine import TransformersEngine  # noqa: E402
from slm_server.generation.types import SamplingParams  # noqa: E402
from slm_server.settings import Settings  # noqa: E402

VOCAB = 32_000
LIST_OF_STRINGS = {"type": "array", "items": {"type": "string"}, "minItems": 64}  # not done in 64 tokens
PROMPTS = ["Return the list of files", "The names are", "Which values are kept?", "List the modules"]


def _corpus(limit_bytes: int = 12_000_000) -> list[str]:
    """The standard library's source files, in sorted order, up to `limit_bytes`: enough text for
    32,000 tokens (its docstrings alone give about 18,000)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if "test" in path.relative_to(root).parts[0] or size > limit_bytes:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        size += len(text)
    return texts


def build_model(target: Path, vocab: int = VOCAB, corpus_bytes: int = 12_000_000) -> int:
    """A random-weight Llama model directory with a byte-level BPE tokenizer of `vocab` tokens; its
    vocabulary size."""
    from bench_prefill import save_random_llama

    from slm_devtools.tinymodel import train_tokenizer

    tokenizer = train_tokenizer(_corpus(corpus_bytes), vocab_size=vocab)
    save_random_llama(target, tokenizer)
    return len(tokenizer)


def _gaps_ms(engine: TransformersEngine, streams: int, params: SamplingParams) -> list[float]:
    """`streams` generations at once; the gaps between consecutive tokens of each, in ms."""
    results: list[Any] = [None] * streams
    start = threading.Barrier(streams)

    def run(i: int) -> None:
        ids = engine.encode(PROMPTS[i % len(PROMPTS)])
        start.wait()
        results[i] = engine.generate(ids, params)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gaps = []
    for r in results:
        if len(r.token_ids) != params.max_tokens:
            raise SystemExit(
                f"a generation ended early ({r.finish_reason}, {r.text!r}): the comparison needs equal lengths"
            )
        gaps += [(b - a) * 1000 for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    return gaps


def _compile_ms(engine: TransformersEngine, count: int) -> tuple[float, float]:
    """Median ms to compile a new 12-property schema, and to get one from the cache."""
    grammars = engine.grammars
    assert grammars is not None
    cold, cached = [], []
    for i in range(count):
        schema = {
            "type": "object",
            "properties": {
                **{f"field_{i}_{k}": {"type": ["string", "integer", "boolean"][k % 3]} for k in range(9)},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
                "kind": {"enum": ["file", "directory", "link"]},
                "when": {"type": "string", "format": "date-time"},
            },
            "required": ["kind"],
            "additionalProperties": False,
        }
        key = grammars.key("json_schema", schema, "schema")
        began = time.perf_counter()
        grammars.compile(key, "json_schema", schema, "schema")
        cold.append((time.perf_counter() - began) * 1000)
        began = time.perf_counter()
        assert grammars.cached(key) is not None
        cached.append((time.perf_counter() - began) * 1000)
    return statistics.median(cold), statistics.median(cached)


def run(
    tokens: int, stream_counts: list[int], rounds: int, vocab: int = VOCAB, corpus_bytes: int = 12_000_000
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-structured-") as tmp:
        vocab = build_model(Path(tmp), vocab, corpus_bytes)
        engine = TransformersEngine(Settings(model=tmp, max_concurrent_requests=max(stream_counts)))
        engine.load()
        try:
            grammars = engine.grammars
            assert grammars is not None
            grammar = grammars.compile(
                grammars.key("json_schema", LIST_OF_STRINGS, "schema"), "json_schema", LIST_OF_STRINGS, "schema"
            )
            gaps: dict[int, dict[str, list[float]]] = {n: {"free": [], "json_schema": []} for n in stream_counts}
            _gaps_ms(engine, 1, SamplingParams(max_tokens=4, temperature=0.8, seed=0))  # warm up
            for round_ in range(rounds):
                for n in stream_counts:
                    for name, held in (("free", None), ("json_schema", grammar)):
                        params = SamplingParams(max_tokens=tokens, temperature=0.8, seed=round_, grammar=held)
                        gaps[n][name] += _gaps_ms(engine, n, params)
            compile_cold, compile_cached = _compile_ms(engine, 10)
            device = str(engine.device)
        finally:
            engine.close()
    per_streams = {}
    for n, by in gaps.items():
        free, held = statistics.median(by["free"]), statistics.median(by["json_schema"])
        per_streams[n] = {"free_ms": free, "json_schema_ms": held, "json_schema_over_free": held / free}
    return {
        "vocab": vocab,
        "device": device,
        "tokens": tokens,
        "inter_token": per_streams,
        "compile_ms": {"cold": compile_cold, "cached": compile_cached},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", default="1,8", help="stream counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    r = run(args.tokens, [int(n) for n in args.streams.split(",")], args.rounds)
    print(
        f"random-weight Llama (256 hidden, 4 layers), {r['vocab']:,}-token vocabulary, {r['device']}; "
        f"{args.tokens} tokens per stream, median gap between two tokens over {args.rounds} rounds"
    )
    for n, f in r["inter_token"].items():
        print(
            f"  {n} stream(s): free {f['free_ms']:6.2f} ms   json_schema {f['json_schema_ms']:6.2f} ms   "
            f"json_schema / free {f['json_schema_over_free']:5.2f}x"
        )
    c = r["compile_ms"]
    print(f"  compiling a 12-property schema: {c['cold']:.2f} ms; from the cache {c['cached'] * 1000:.1f} µs")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
