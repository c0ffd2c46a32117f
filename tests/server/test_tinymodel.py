"""The project's tiny model: a normal HF model directory that tells English from garbage by perplexity."""

from __future__ import annotations

import json
import math
import random

import torch

from slm_devtools.tinymodel import CONTEXT, build_corpus
from slm_devtools.tinymodel import tiny_model_dir as expected_dir

IN_DISTRIBUTION = [
    "Return the number of items in the list.",
    "This function returns a new object with the given name and value.",
    "Raise an exception if the file cannot be opened for reading.",
    "The default value is None, which means that the current time is used.",
    "If the optional argument is given, it is used as the default encoding.",
]


def _garbage(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!@#$%^&*()_+-=[]{};:,.<>/? "
    return ["".join(rng.choice(alphabet) for _ in range(80)) for _ in range(n)]


def _perplexity(engine, text: str) -> float:
    ids = torch.tensor([engine.encode(text)])
    with torch.no_grad():
        return math.exp(engine.model(input_ids=ids, labels=ids).loss.item())


def test_is_a_plain_hugging_face_model_directory(tiny_model_dir):
    assert tiny_model_dir == expected_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_model_dir / name).is_file(), name
    info = json.loads((tiny_model_dir / "slm_tiny_model.json").read_text())
    assert 500_000 < info["parameters"] < 1_000_000
    assert 400_000 < info["corpus_bytes"] <= 600_000


def test_loads_like_any_model_with_its_context_and_chat_template(tiny_engine):
    info = tiny_engine.info
    assert info.max_context == CONTEXT
    assert info.has_chat_template
    assert info.device == "cpu" and info.dtype == "float32"
    prompt = tiny_engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "User: hello\n\nAssistant:"


def test_perplexity_separates_english_from_garbage(tiny_engine):
    english = [_perplexity(tiny_engine, t) for t in IN_DISTRIBUTION]
    garbage = [_perplexity(tiny_engine, t) for t in _garbage(5)]
    print(f"in-distribution {[round(p) for p in english]}, garbage {[round(p) for p in garbage]}")
    assert max(english) < 200
    assert min(garbage) > 700
    assert math.prod(garbage) ** (1 / 5) > 10 * math.prod(english) ** (1 / 5)


def test_corpus_is_chosen_deterministically():
    first, second = build_corpus(), build_corpus()
    assert first == second
    assert all(p.strip() for p in first)
