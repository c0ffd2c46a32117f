"""Prefix caching (slm_server.prefix_cache, `SLM_PREFIX_CACHE_MIB`): a prompt that begins with the
whole blocks of an earlier prompt starts from a copy of their KV cache and feeds only its other
tokens, and is the same generation as without the cache.

The reference for every generation is the same request on an engine with prefix caching off.
"""

from __future__ import annotations

import random

import pytest
import torch

from slm_server.generation.prefix_cache import PrefixCache
from slm_server.generation.transformers_engine import TransformersEngine
from slm_server.generation.types import SamplingParams

from .conftest import (
    MODEL_NAME,
    HeldRun,
    assert_same_generation,
    assert_staggered_as_alone,
    random_sampling,
    serve,
    settings_for,
)

SYSTEM = "You answer questions about the file and the list in one short line, as the caller asks. " * 2
QUESTIONS = ["What does it return?", "When is the file not found?", "Is the list empty?", "What is the value?"]


# --- the cache itself, on tensors whose values are their positions -------------------------------------------
def _layers(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two layers of (keys, values), (1, 2 heads, n positions, 4): each value its position."""
    positions = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 2, n, 4)
    return [(positions.clone(), -positions.clone()), (positions.clone(), positions.clone())]


def _bytes(n: int) -> int:
    return sum(k.nbytes + v.nbytes for k, v in _layers(n))


def test_a_lookup_finds_the_longest_run_of_whole_blocks_and_leaves_the_last_token_to_feed():
    cache = PrefixCache(capacity_bytes=10 * _bytes(48), block=16)
    prompt = list(range(100, 141))  # 41 tokens: 2 whole blocks before its last token
    cache.insert(prompt, _layers(41))

    assert cache.lookup(prompt)[0] == 32
    assert cache.lookup(prompt[:20] + [7] * 30)[0] == 16  # the same first block, then another prompt
    assert cache.lookup(prompt[:33])[0] == 32
    assert cache.lookup(prompt[:32])[0] == 16  # its 32nd token must be fed: only the first block
    assert cache.lookup(prompt[:16])[0] == 0
    assert cache.lookup([7, *prompt])[0] == 0  # the same tokens one place later are another prompt
    _, layers = cache.lookup(prompt)
    assert [k.shape for k, _ in layers] == [torch.Size([1, 2, 32, 4])] * 2
    assert torch.equal(layers[0][0][0, 0, :, 0], torch.arange(32, dtype=torch.float32))  # positions 0..31
    assert torch.equal(layers[0][1], -layers[0][0])
    assert cache.stats() == (40 + 49 + 32 + 31 + 15 + 41 + 40, 32 + 16 + 32 + 16 + 0 + 0 + 32, _bytes(32))


def test_a_hash_collision_is_a_miss_not_another_prompts_cache(monkeypatch):
    cache = PrefixCache(capacity_bytes=10 * _bytes(48), block=16)
    # Every prompt's block boundaries hash alike: the index points any prompt at any entry.
    monkeypatch.setattr(cache, "_boundaries", lambda ids, limit: list(range(limit // 16)))
    cache.insert(list(range(100, 141)), _layers(41))
    assert cache.lookup(list(range(500, 541)))[0] == 0
    assert cache.lookup(list(range(100, 141)))[0] == 32


def test_the_least_recently_used_prefix_goes_first_and_the_budget_holds():
    cache = PrefixCache(capacity_bytes=2 * _bytes(32), block=16)
    a, b, c = ([base + i for i in range(33)] for base in (1000, 2000, 3000))
    cache.insert(a, _layers(33))
    cache.insert(b, _layers(33))
    assert cache.lookup(a)[0] == 32  # a is now the most recently used
    cache.insert(c, _layers(33))  # no room for three: b goes

    assert [cache.lookup(p)[0] for p in (a, b, c)] == [32, 0, 32]
    assert cache.stats()[2] == 2 * _bytes(32) <= cache.capacity_bytes
    cache.insert([9] * 200, _layers(200))  # bigger than the whole budget: not kept, nothing evicted
    assert [cache.lookup(p)[0] for p in (a, c)] == [32, 32]


def test_prompts_that_share_a_system_prompt_still_share_it_when_the_first_of_them_goes():
    system = list(range(500, 532))  # 2 blocks
    first, second, other = system + [1] * 17, system + [2] * 17, [7] * 49
    cache = PrefixCache(capacity_bytes=2 * _bytes(48), block=16)
    cache.insert(first, _layers(49))
    cache.insert(second, _layers(49))
    cache.insert(other, _layers(49))  # evicts `first`, whose blocks `second` also begins with

    assert cache.lookup(system + [3] * 17)[0] == 32
    assert cache.lookup(second)[0] == 48
    assert cache.lookup(first)[0] == 32


# --- on the tiny model -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uncached_engine(tiny_model_dir) -> TransformersEngine:
    engine = TransformersEngine(settings_for(tiny_model_dir, prefix_cache_mib=0))
    engine.load()
    yield engine
    engine.close()


def _hits(engine: TransformersEngine) -> int:
    stats = engine.prefix_cache_stats()
    assert stats is not None
    return stats[1]


def test_a_prompt_that_begins_like_an_earlier_one_feeds_only_the_rest_and_gets_the_same_generation(
    own_engine, uncached_engine
):
    engine = own_engine()
    assert engine.info.prefix_caching == "on" and uncached_engine.info.prefix_caching == "off"
    system_tokens = len(engine.encode(SYSTEM))
    for i, question in enumerate(QUESTIONS):
        params = SamplingParams(max_tokens=16, temperature=0.8 if i % 2 else 0.0, seed=i, logprobs=1)
        prompt = engine.encode(SYSTEM + question)
        hits_before = _hits(engine)
        result = engine.generate(prompt, params)
        assert_same_generation(result, uncached_engine.generate(uncached_engine.encode(SYSTEM + question), params))
        hit = _hits(engine) - hits_before
        # The first prompt fills the cache; each next one finds the system prompt's whole blocks.
        assert hit == (0 if i == 0 else system_tokens // 16 * 16), (i, hit)


def test_the_prefixes_of_prompts_prefilled_together_are_each_their_own(own_engine, uncached_engine):
    """Prompts of different lengths prefilled in one left-padded pass: each prompt's cache is taken
    from its own row, where its tokens are the last columns; a later prompt that begins like any
    of them gets the same generation as without the cache."""
    engine = own_engine()
    prompts = [SYSTEM + QUESTIONS[0], SYSTEM[:60] + QUESTIONS[1], SYSTEM[:100] + QUESTIONS[2]]
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=0)
    HeldRun(engine).arrive_together(prompts, params)  # one padded prefill for the three
    hits_before = _hits(engine)
    for prompt in prompts:
        again = prompt + " And why?"
        assert_same_generation(
            engine.generate(engine.encode(again), params),
            uncached_engine.generate(uncached_engine.encode(again), params),
        )
    # Each found its own prompt's whole blocks (taken from the wrong columns, they would differ above).
    assert _hits(engine) - hits_before == sum((len(engine.encode(p)) - 1) // 16 * 16 for p in prompts)


@pytest.mark.parametrize("seed", [1, 2])
def test_prompts_with_shared_prefixes_arriving_at_random_steps_get_what_they_get_without_the_cache(
    own_engine, uncached_engine, seed
):
    """Cached prefixes, chunks of 7 tokens and a running batch together: hits are prefilled on their
    own, the other arrivals together, and all join the batch."""
    engine = own_engine(prefill_chunk_tokens=7)
    rng = random.Random(seed)
    jobs = [("Return a new list of the", SamplingParams(max_tokens=100, temperature=0, logprobs=0), 0)]
    for _ in range(8):
        prompt = rng.choice([SYSTEM, SYSTEM[:40], ""]) + rng.choice(QUESTIONS)
        jobs.append((prompt, random_sampling(rng, 24), rng.randint(0, 60)))

    assert_staggered_as_alone(engine, uncached_engine, jobs)
    assert _hits(engine) > 0


def test_the_prefix_cache_metrics_and_the_load_event_say_what_it_does(own_engine, tiny_model_dir, json_records):
    engine = own_engine(prefix_cache_mib=4)
    labels = {"model": MODEL_NAME}
    with serve(engine, settings_for(tiny_model_dir, prefix_cache_mib=4)) as srv:
        assert [r["slm.prefix_caching"] for r in json_records("model_loaded")] == ["on"]
        assert srv.metric("slm_prefix_cache_capacity_bytes", labels) == 4 << 20
        assert srv.metric("slm_prefix_cache_hits_total", labels) == 0
        cached = []
        for question in QUESTIONS[:3]:
            r = srv.client.post("/generate", json={"prompt": SYSTEM + question, "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200, r.text
            cached.append(r.json()["cached_prompt_tokens"])
        prompt_tokens = srv.metric("slm_prompt_tokens_total", {"model": MODEL_NAME, "endpoint": "/generate"})
        queried = srv.metric("slm_prefix_cache_queries_total", labels)
        hits = srv.metric("slm_prefix_cache_hits_total", labels)
        assert queried == prompt_tokens - 3  # all but each prompt's last token
        system_blocks = len(engine.encode(SYSTEM)) // 16 * 16
        assert hits == 2 * system_blocks
        assert 0 < srv.metric("slm_prefix_cache_bytes", labels) <= 4 << 20
        chat = srv.client.post(
            "/v1/completions", json={"model": MODEL_NAME, "prompt": SYSTEM + QUESTIONS[3], "max_tokens": 2}
        )
        lines = {line["request_id"]: line for line in json_records("request")}
        # Each response and request line says how much of its prompt came from the cache.
        assert cached == [0, system_blocks, system_blocks]
        assert chat.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": system_blocks}
        assert lines[chat.json()["id"].removeprefix("cmpl-")]["gen_ai.usage.cache_read.input_tokens"] == system_blocks


def test_with_the_cache_off_its_series_say_so(uncached_engine, tiny_model_dir):
    with serve(uncached_engine, settings_for(tiny_model_dir, prefix_cache_mib=0)) as srv:
        srv.client.post("/generate", json={"prompt": SYSTEM, "max_tokens": 1})
        for name in ("capacity_bytes", "bytes", "hits_total", "queries_total"):
            assert srv.metric(f"slm_prefix_cache_{name}", {"model": MODEL_NAME}) == 0, name


def test_a_prefix_cache_out_of_memory_costs_its_hits_not_the_generations(own_engine, uncached_engine, monkeypatch):
    """Keeping a prefix, or copying a hit, that fails (a GPU out of memory) is logged and skipped."""
    from slm_server.generation import scheduler

    engine = own_engine()
    cache = engine.scheduler.prefix_cache
    prompt = SYSTEM + QUESTIONS[0]
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=0)
    reference = uncached_engine.generate(uncached_engine.encode(prompt), params)

    def out_of_memory(*_: object) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 MiB")

    with monkeypatch.context() as patched:
        patched.setattr(cache, "insert", out_of_memory)
        assert_same_generation(engine.generate(engine.encode(prompt), params), reference)
        assert cache.stats()[2] == 0  # nothing kept
    engine.generate(engine.encode(prompt), params)  # kept this time
    with monkeypatch.context() as patched:
        patched.setattr(scheduler, "_cache_of", out_of_memory)
        result = engine.generate(engine.encode(prompt), params)
    assert_same_generation(result, reference)
    assert result.cached_tokens == 0  # prefilled whole
    assert engine.generate(engine.encode(prompt), params).cached_tokens > 0  # and the cache serves again
