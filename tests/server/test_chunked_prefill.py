"""Chunked prefill (slm_server.batching, `SLM_PREFILL_CHUNK_TOKENS`): a prompt is fed in passes of at
most `prefill_chunk_tokens` tokens, each followed by a decode step of the generations already
running, so a long prompt that arrives delays their next token by one chunk's pass instead of its
whole prefill; and a prompt fed in chunks is the same generation as a prompt fed in one pass.

The reference for every generation is the same request on the shared tiny engine, whose default
chunk (512 tokens) is above the tiny model's whole context (256): one pass per prompt.
"""

from __future__ import annotations

import math
import random
import threading

import pytest

from slm_server.generation.transformers_engine import TransformersEngine
from slm_server.generation.types import GenerationResult, SamplingParams

from .conftest import (
    HeldRun,
    assert_same_generation,
    assert_staggered_as_alone,
    random_sampling,
    start_generation,
    wait_for,
)

# ~130 tokens of the tiny model's vocabulary: several chunks at the chunk sizes below.
LONG_PROMPT = " ".join(["The value of the list is returned to the caller when the file is not found."] * 8)
RUNNING_PROMPT = HeldRun.PROMPT


def _alone(engine: TransformersEngine, prompt: str, params: SamplingParams) -> GenerationResult:
    return engine.generate(engine.encode(prompt), params)


@pytest.mark.parametrize("chunk", [0, 16])
def test_a_running_generation_gets_a_token_between_the_chunks_of_a_long_prompt(own_engine, tiny_engine, chunk):
    """Without chunks (0) the running stream gets no token while the long prompt is prefilled; with
    16-token chunks it gets one after each chunk but the last."""
    engine = own_engine(prefill_chunk_tokens=chunk)
    prompt_tokens = len(engine.encode(LONG_PROMPT))
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=0)
    reference = _alone(tiny_engine, LONG_PROMPT, params)
    running = HeldRun(engine)
    (long_result,) = running.arrive_together([LONG_PROMPT], params)

    assert isinstance(long_result, GenerationResult), long_result
    assert_same_generation(long_result, reference)
    between = running.tokens_between(running.released_at, long_result.token_times[0])
    assert between == (math.ceil(prompt_tokens / chunk) - 1 if chunk else 0)
    assert running.result.token_ids == _alone(tiny_engine, RUNNING_PROMPT, HeldRun.RUNNING).token_ids


@pytest.mark.parametrize("seed", [1, 2])
def test_prompts_fed_in_chunks_joining_at_random_steps_get_what_they_get_in_one_pass(own_engine, tiny_engine, seed):
    """Prompts of 1 to ~130 tokens, greedy or sampled, join a running batch at random steps, fed 7
    tokens per pass (a chunk's width shrinks with the rows prefilled together); each generation's
    tokens and log-probabilities are those of its one-pass prefill."""
    engine = own_engine(prefill_chunk_tokens=7)
    rng = random.Random(seed)
    words = LONG_PROMPT.split()
    jobs = [(RUNNING_PROMPT, SamplingParams(max_tokens=100, temperature=0, logprobs=0), 0)]
    for _ in range(8):
        start = rng.randrange(len(words))
        prompt = " ".join(words[start : start + rng.randint(1, 80)])
        jobs.append((prompt, random_sampling(rng, 30), rng.randint(0, 60)))

    assert_staggered_as_alone(engine, tiny_engine, jobs)


def test_prompts_prefilled_together_share_the_chunk_budget(own_engine, tiny_engine):
    """Four prompts prefilled together share a 32-token budget: 8 columns of the padded prompts per
    pass, a decode step of the running generation after each but the last."""
    engine = own_engine(prefill_chunk_tokens=32)
    prompts = [LONG_PROMPT, "A", "The file is", " ".join(LONG_PROMPT.split()[:30])]
    params = SamplingParams(max_tokens=3, temperature=0, logprobs=1)
    references = [_alone(tiny_engine, prompt, params) for prompt in prompts]
    longest = max(len(engine.encode(prompt)) for prompt in prompts)
    running = HeldRun(engine)
    results = running.arrive_together(prompts, params)

    for result, reference in zip(results, references, strict=True):
        assert isinstance(result, GenerationResult), result
        assert_same_generation(result, reference)
    first_tokens_at = {result.token_times[0] for result in results}
    assert len(first_tokens_at) == 1  # from the same pass: the last chunk's
    assert running.tokens_between(running.released_at, first_tokens_at.pop()) == math.ceil(longest / 8) - 1


def test_a_generation_cancelled_while_its_prompt_is_fed_returns_and_the_others_of_its_prefill_go_on(
    own_engine, tiny_engine
):
    engine = own_engine(prefill_chunk_tokens=16)
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=0)
    shorter = " ".join(LONG_PROMPT.split()[:40])
    reference = _alone(tiny_engine, shorter, params)
    running = HeldRun(engine, holds=2)
    cancel = threading.Event()
    try:
        running.wait_held(0)
        cancelled_thread, cancelled = start_generation(engine, LONG_PROMPT, params, cancel)
        other_thread, other = start_generation(engine, shorter, params)
        wait_for(lambda: engine.scheduler.waiting == 2)  # the two are prefilled together
        running.release(0)
        running.wait_held(1)  # a chunk of the two prompts has been fed, and a decode step has run
        assert engine.scheduler.prefilling  # their prompts are not all in yet
        cancel.set()
        running.release(1)
    finally:
        running.release_all()
    cancelled_thread.join(timeout=60)
    other_thread.join(timeout=60)
    running.thread.join(timeout=60)

    assert cancelled["result"].finish_reason == "abort"
    assert cancelled["result"].output_tokens == 0
    assert isinstance(other["result"], GenerationResult), other["result"]
    assert_same_generation(other["result"], reference)
