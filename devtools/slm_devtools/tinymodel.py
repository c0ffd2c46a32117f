"""A tiny GPT-2-style model the project builds itself, for tests and the demo (no download).

    python -m slm_devtools.tinymodel            # build (or find) it and print its directory

What it is: a byte-level BPE tokenizer (2,048 tokens) and a 2-layer, 128-wide GPT-2 (~0.7 M
parameters, 256-token context), trained for a fixed number of steps (~1 minute on one CPU core) on
~0.6 MB of English prose: the docstrings of the Python standard library of the interpreter that
builds it (always on the machine, so nothing is fetched). It is saved with `save_pretrained` as an
ordinary Hugging Face model directory, with a chat template, into
`cache_dir()/models/tiny-gpt2-<TINY_MODEL_VERSION>`, so the server loads it exactly like any other
model directory.

It is good for one thing that matters to monitoring: its perplexity separates text like its corpus
(≈100) from garbage (≈1,600), so perplexity metrics and drift alerts can be exercised for real.

Deterministic: fixed seeds, a fixed corpus choice, a fixed step count, a fixed thread count. The
build is guarded by a file lock so parallel test workers (or a test and the demo) never race; the
directory appears atomically (built aside, then renamed).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from slm_server.paths import cache_dir

# Bump when the recipe below changes: a new directory is built, old ones are left alone.
TINY_MODEL_VERSION = "2"
EOS = "<|endoftext|>"
VOCAB_SIZE = 2048
CONTEXT = 256
CORPUS_BYTES = 600_000
TRAIN_STEPS = 600
# (batch, sequence length): mostly short windows; every 4th step a full-context one so that every
# position embedding is trained. ~0.1 s a step on one core.
SHAPES = ((8, 128), (8, 128), (8, 128), (4, CONTEXT))
SEED = 1234

# A plain-text chat format the model has never seen, but good enough to route chat requests
# through `apply_chat_template` the way a real instruct model's template is used.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip", "__pycache__"}


def tiny_model_dir() -> Path:
    return cache_dir() / "models" / f"tiny-gpt2-{TINY_MODEL_VERSION}"


def _is_prose(paragraph: str) -> bool:
    """Keep English sentences; drop doctest, code, tables and signature lines."""
    if len(paragraph) < 40 or ">>>" in paragraph or "::" in paragraph:
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in paragraph)
    if letters / len(paragraph) < 0.85:
        return False
    return paragraph.rstrip()[-1:] in ".:)" and paragraph.count("(") <= 3


def build_corpus(limit_bytes: int = CORPUS_BYTES) -> list[str]:
    """Prose paragraphs from the standard library's docstrings, in a fixed order, up to `limit_bytes`.

    Modules are visited in sorted order and every paragraph kept is a whole document (an end-of-text
    token separates documents in training). When there is more prose than needed, a fixed stride
    keeps the sample spread over the whole library instead of the alphabetically first modules.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts))
    paragraphs: list[str] = []
    seen: set[str] = set()
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for para in doc.split("\n\n"):
                para = " ".join(para.split())
                if _is_prose(para) and para not in seen:
                    seen.add(para)
                    paragraphs.append(para)
    total = sum(len(p) + 1 for p in paragraphs)
    stride = max(1, math.ceil(total / limit_bytes))
    chosen: list[str] = []
    size = 0
    for para in paragraphs[::stride]:
        if size + len(para) > limit_bytes:
            break
        chosen.append(para)
        size += len(para) + 1
    return chosen


def train_tokenizer(docs: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer of `vocab_size` tokens trained on `docs`, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, model_max_length=CONTEXT
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _lr(step: int, peak: float = 3e-3, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, TRAIN_STEPS - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build(target: Path, *, steps: int = TRAIN_STEPS, log=print) -> dict:
    """Train and save the model into `target` (which must not exist). Returns the build info."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    started = time.monotonic()
    random.seed(SEED)
    torch.manual_seed(SEED)
    threads_before = torch.get_num_threads()
    # One thread: the float reductions (so the weights) repeat across machines, and a busy machine
    # (parallel builds, test workers) cannot oversubscribe it — two contended threads were 6x slower.
    torch.set_num_threads(1)
    try:
        docs = build_corpus()
        tokenizer = train_tokenizer(docs)
        eos_id = tokenizer.convert_tokens_to_ids(EOS)
        stream: list[int] = []
        for doc in docs:
            stream.extend(tokenizer.encode(doc))
            stream.append(eos_id)
        data = torch.tensor(stream, dtype=torch.long)
        split = int(len(data) * 0.95)
        train, held_out = data[:split], data[split:]

        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=CONTEXT,
            n_embd=128,
            n_layer=2,
            n_head=4,
            n_inner=512,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            tie_word_embeddings=True,
        )
        model = GPT2LMHeadModel(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=_lr(0), weight_decay=0.01)
        gen = torch.Generator().manual_seed(SEED)
        model.train()
        for step in range(steps):
            batch_size, seq = SHAPES[step % len(SHAPES)]
            starts = torch.randint(0, len(train) - seq - 1, (batch_size,), generator=gen)
            batch = torch.stack([train[s : s + seq] for s in starts.tolist()])
            for group in optimizer.param_groups:
                group["lr"] = _lr(step)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % 100 == 0 or step == steps - 1:
                log(f"[tinymodel] step {step}/{steps} loss {loss.item():.3f}")
        model.eval()

        with torch.no_grad():
            chunks = held_out[: (len(held_out) // 128) * 128].view(-1, 128)[:32]
            held_out_loss = model(input_ids=chunks, labels=chunks).loss.item()

        info = {
            "version": TINY_MODEL_VERSION,
            "parameters": sum(p.numel() for p in model.parameters()),
            "corpus": "Python standard library docstrings (prose paragraphs)",
            "corpus_bytes": sum(len(d) + 1 for d in docs),
            "corpus_sha256": hashlib.sha256("\n".join(docs).encode()).hexdigest(),
            "python": sys.version.split()[0],
            "train_steps": steps,
            "train_tokens": len(train),
            "held_out_perplexity": math.exp(held_out_loss),
            "build_seconds": round(time.monotonic() - started, 1),
        }
        target.mkdir(parents=True)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        (target / "held_out.txt").write_text("\n".join(tokenizer.decode(c) for c in chunks[:8].tolist()))
        (target / "slm_tiny_model.json").write_text(json.dumps(info, indent=2) + "\n")
        return info
    finally:
        torch.set_num_threads(threads_before)


def ensure_tiny_model(log=print) -> Path:
    """The tiny model's directory, built on first use (once per machine, under a file lock)."""
    from filelock import FileLock

    target = tiny_model_dir()
    marker = target / "slm_tiny_model.json"
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=900):
        if marker.exists():  # another process built it while we waited
            return target
        work = target.parent / f".{target.name}.building-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)  # a directory without its marker is a broken build
        log(f"[tinymodel] building {target} (about a minute, once per machine)")
        build(work, log=log)
        work.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quiet", action="store_true", help="print only the directory")
    args = parser.parse_args(argv)
    path = ensure_tiny_model(log=(lambda *_: None) if args.quiet else lambda m: print(m, file=sys.stderr))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
