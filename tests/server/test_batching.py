"""Continuous batching (slm_server.batching): generations that run at the same time share forward
passes, and each one's tokens, text, log-probabilities and perplexity are those it gets alone.

The reference for every concurrent generation is the same request run alone on the same engine
(one row, no padding). Running together, a generation's cache is left-padded to the batch's longest
and its positions are its own; a bug there (a wrong position, padding the mask does not hide, a
row's cache mixed up with another's when one leaves) changes its tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import threading
import time
from typing import Any, cast

import numpy as np
import pytest

from slm_server.generation.scheduler import PassFailed
from slm_server.generation.transformers_engine import TransformersEngine
from slm_server.generation.types import GenerationResult, SamplingParams

from .conftest import (
    MODEL_NAME,
    HeldRun,
    assert_same_generation,
    assert_staggered_as_alone,
    generate_together,
    random_sampling,
    serve,
    settings_for,
    start_generation,
    wait_for,
)

PROMPTS = [
    "Return a new list of the",
    "The file is",
    "If the value is not None, the function",
    "A",
    "Create a new",
    "The server sends the request to the",
]
# Greedy, these run to max_tokens=48 on the tiny model (most of its outputs end at a full stop).
LONG_PROMPTS = [
    "Return a new list of the",
    "If the value is not None, the function",
    "The server sends the request to the",
    "Returns the",
    "The following",
    "This function",
]
LONG = SamplingParams(max_tokens=48, temperature=0)
# Every per-generation setting, mixed in one batch: greedy, seeded sampling with top_p / top_k / min_p
# and penalties, log-probabilities, a stop string, a repetition penalty and logit biases.
PARAMS = [
    SamplingParams(max_tokens=40, temperature=0),
    SamplingParams(max_tokens=30, temperature=0.8, seed=3),
    SamplingParams(max_tokens=48, temperature=1.0, top_p=0.9, top_k=20, seed=5, presence_penalty=0.5,
                   frequency_penalty=0.3),
    SamplingParams(max_tokens=20, temperature=0, logprobs=2, repetition_penalty=1.2, logit_bias=((42, 2.0),)),
    SamplingParams(max_tokens=48, temperature=0, stop=(".", "\n\n")),
    SamplingParams(max_tokens=36, temperature=0.7, seed=9, logprobs=0, min_p=0.1),
]  # fmt: skip


def _alone(engine: TransformersEngine, prompt: str, params: SamplingParams) -> GenerationResult:
    return engine.generate(engine.encode(prompt), params)


def _batch_counters(engine: TransformersEngine) -> tuple[int, int]:
    stats = engine.batch_stats()
    assert stats is not None
    return stats[1], stats[2]


def test_generations_at_the_same_time_share_passes_and_each_gets_what_it_gets_alone(tiny_engine):
    assert tiny_engine.info.batching == "continuous"
    jobs = [(prompt, LONG) for prompt in LONG_PROMPTS]
    alone = [_alone(tiny_engine, prompt, params) for prompt, params in jobs]
    assert [r.finish_reason for r in alone] == ["length"] * len(jobs)
    passes_before, fed_before = _batch_counters(tiny_engine)

    together = generate_together(tiny_engine, jobs)

    for result, reference in zip(together, alone, strict=True):
        assert isinstance(result, GenerationResult), result
        assert_same_generation(result, reference)
    passes, fed = _batch_counters(tiny_engine)
    assert fed - fed_before == len(jobs) * LONG.max_tokens  # one feed per generated token
    # Alone, that is one pass per token; together, the six share most of them.
    assert passes - passes_before < (fed - fed_before) / 3


def test_each_generation_keeps_its_own_settings_in_a_batch(tiny_engine):
    jobs = list(zip(PROMPTS, PARAMS, strict=True))
    alone = [_alone(tiny_engine, prompt, params) for prompt, params in jobs]
    for result, reference in zip(generate_together(tiny_engine, jobs), alone, strict=True):
        assert isinstance(result, GenerationResult), result
        assert_same_generation(result, reference)


def test_streamed_text_of_a_generation_in_a_batch_is_its_whole_text(tiny_engine):
    pieces: dict[int, list[str]] = {i: [] for i in range(len(PROMPTS))}
    together = generate_together(
        tiny_engine, list(zip(PROMPTS, PARAMS, strict=True)), lambda i: lambda text, _: pieces[i].append(text)
    )
    for i, result in enumerate(together):
        assert isinstance(result, GenerationResult), result
        assert "".join(pieces[i]) == result.text


def test_a_cancelled_generation_leaves_the_batch_and_the_others_go_on(tiny_engine):
    params = LONG
    jobs = [(prompt, params) for prompt in LONG_PROMPTS[:4]]
    alone = [_alone(tiny_engine, prompt, params) for prompt, _ in jobs]
    cancel = threading.Event()
    tokens_seen = [0]

    def generate_cancelled_after_4_pieces() -> GenerationResult:
        def on_text(text: str, _: Any) -> None:
            tokens_seen[0] += 1
            if tokens_seen[0] == 4:
                cancel.set()  # what the service does when the request times out or the client leaves

        return tiny_engine.generate(tiny_engine.encode(LONG_PROMPTS[4]), params, on_text, cancel)

    results: dict[str, Any] = {}
    cancelled = threading.Thread(target=lambda: results.update(cancelled=generate_cancelled_after_4_pieces()))
    cancelled.start()
    together = generate_together(tiny_engine, jobs)
    cancelled.join(timeout=60)

    assert results["cancelled"].finish_reason == "abort"
    assert results["cancelled"].output_tokens < params.max_tokens
    for result, reference in zip(together, alone, strict=True):
        assert_same_generation(result, reference)  # type: ignore[arg-type]


class _FailingModel:
    """The model, failing its `fail_at`-th call from now (a CUDA error, out of memory)."""

    def __init__(self, model: Any, fail_at: int):
        self.model = model
        self.calls = 0
        self.fail_at = fail_at
        self.forward = model.forward

    def __call__(self, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.model(**kwargs)


def test_a_failing_pass_fails_its_generations_with_the_cause_and_the_next_ones_are_served(own_engine):
    engine = own_engine()
    params = LONG
    jobs = [(prompt, params) for prompt in LONG_PROMPTS[:4]]
    alone = [_alone(engine, prompt, params) for prompt, _ in jobs]
    engine.model = _FailingModel(engine.model, fail_at=12)  # past every prefill: a decode step of them all

    together = generate_together(engine, jobs)

    failed = [r for r in together if isinstance(r, PassFailed)]
    assert len(failed) >= 2, together  # a pass of several generations failed
    assert all(isinstance(r, PassFailed | GenerationResult) for r in together)
    for error in failed:
        assert "illegal memory access" in str(error)
        assert isinstance(error.__cause__, RuntimeError)
    assert len({id(e) for e in failed}) == len(failed)  # each thread raises its own
    assert_same_generation(_alone(engine, LONG_PROMPTS[0], params), alone[0])  # the scheduler goes on


def test_a_failing_pass_is_a_500_that_names_the_cause(own_engine, tiny_model_dir):
    engine = own_engine()
    engine.model = _FailingModel(engine.model, fail_at=1)
    with serve(engine, settings_for(tiny_model_dir)) as srv:
        r = srv.client.post("/generate", json={"prompt": "Return the", "max_tokens": 4})
        assert r.status_code == 500
        assert "illegal memory access" in r.json()["error"]["message"]
        assert srv.metric("slm_request_errors_total", {"model": MODEL_NAME, "endpoint": "/generate",
                                                       "error": "model_error"}) == 1  # fmt: skip
        assert srv.client.post("/generate", json={"prompt": "Return the", "max_tokens": 4}).status_code == 200


def test_with_max_batch_size_1_generations_run_one_at_a_time(own_engine):
    engine = own_engine(max_batch_size=1)
    assert engine.info.batching == "one sequence per pass"
    jobs = list(zip(PROMPTS, PARAMS, strict=True))
    alone = [_alone(engine, prompt, params) for prompt, params in jobs]
    passes_before, fed_before = _batch_counters(engine)
    for result, reference in zip(generate_together(engine, jobs), alone, strict=True):
        assert_same_generation(result, reference)  # type: ignore[arg-type]
    passes, fed = _batch_counters(engine)
    assert passes - passes_before == fed - fed_before


def test_a_model_whose_cache_cannot_be_padded_runs_one_generation_per_pass(own_engine, monkeypatch):
    monkeypatch.setattr("slm_server.generation.transformers_engine.cache_support", lambda model: (False, False))
    engine = own_engine()
    assert engine.info.batching == "one sequence per pass"
    jobs = list(zip(PROMPTS, PARAMS, strict=True))
    alone = [_alone(engine, prompt, params) for prompt, params in jobs]
    passes_before, fed_before = _batch_counters(engine)
    together = generate_together(engine, jobs)
    for result, reference in zip(together, alone, strict=True):
        assert_same_generation(result, reference)  # type: ignore[arg-type]
    passes, fed = _batch_counters(engine)
    assert passes - passes_before == fed - fed_before


def test_the_batch_metrics_show_the_mean_batch_size(tiny_engine, tiny_model_dir):
    with serve(tiny_engine, settings_for(tiny_model_dir)) as srv:
        labels = {"model": MODEL_NAME}
        passes_before = srv.metric("slm_forward_passes_total", labels)
        fed_before = srv.metric("slm_forward_pass_generations_total", labels)
        body = {"prompt": LONG_PROMPTS[0], "max_tokens": 32, "temperature": 0}
        start = threading.Barrier(4)
        statuses: list[int] = []

        def post() -> None:
            start.wait()
            statuses.append(srv.client.post("/generate", json=body).status_code)

        threads = [threading.Thread(target=post) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert statuses == [200] * 4
        passes = srv.metric("slm_forward_passes_total", labels) - passes_before
        fed = srv.metric("slm_forward_pass_generations_total", labels) - fed_before
        assert fed == srv.metric("slm_generation_tokens_total", {**labels, "endpoint": "/generate"})
        assert fed / passes > 1.5
        assert srv.metric("slm_batch_size", labels) == 0  # nothing runs now


def test_a_generation_whose_token_cannot_be_chosen_fails_alone(tiny_engine, monkeypatch):
    """A sampling error (NaN logits from a broken fp16 model make torch.multinomial raise) fails only
    the generation it happened to."""
    from slm_server.generation import scheduler

    choose = scheduler.choose_token

    def choose_or_fail(logits, params, generator):
        if params.seed == 13:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return choose(logits, params, generator)

    jobs = [(prompt, LONG) for prompt in LONG_PROMPTS[:3]]
    alone = [_alone(tiny_engine, prompt, params) for prompt, params in jobs]
    monkeypatch.setattr(scheduler, "choose_token", choose_or_fail)
    broken = SamplingParams(max_tokens=48, temperature=0.8, seed=13)

    *together, failed = generate_together(tiny_engine, [*jobs, (LONG_PROMPTS[3], broken)])

    assert isinstance(failed, RuntimeError) and "nan" in str(failed)
    for result, reference in zip(together, alone, strict=True):
        assert_same_generation(result, reference)


def test_a_failure_of_the_loop_itself_fails_what_runs_and_the_loop_goes_on(own_engine, monkeypatch, json_records):
    engine = own_engine()
    merge = engine.scheduler._merge
    calls = [0]

    def merge_failing_once(fresh):
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("out of memory joining the batch")
        merge(fresh)

    monkeypatch.setattr(engine.scheduler, "_merge", merge_failing_once)
    results = generate_together(engine, [(prompt, LONG) for prompt in LONG_PROMPTS[:3]])
    assert any(isinstance(r, PassFailed) and "out of memory" in str(r) for r in results), results
    assert all(isinstance(r, PassFailed | GenerationResult) for r in results)
    assert _alone(engine, LONG_PROMPTS[0], LONG).output_tokens == LONG.max_tokens  # served again
    assert [e["message"] for e in json_records("error")] == ["generation loop failed"]


def test_a_generation_cancelled_while_waiting_for_room_returns_at_once(own_engine):
    engine = own_engine(max_batch_size=1)
    long_run = SamplingParams(max_tokens=200, temperature=0)
    pieces = [0]
    holding, release = threading.Event(), threading.Event()

    def count(text: str, _: Any) -> None:  # runs on the scheduler's thread: nothing else runs meanwhile
        pieces[0] += 1
        if not holding.is_set():
            holding.set()
            release.wait(30)

    running: dict[str, GenerationResult] = {}
    a = threading.Thread(
        target=lambda: running.update(a=engine.generate(engine.encode(LONG_PROMPTS[0]), long_run, count))
    )
    a.start()
    cancel = threading.Event()
    waiting: dict[str, Any] = {}
    b = threading.Thread(
        target=lambda: waiting.update(b=engine.generate(engine.encode(LONG_PROMPTS[1]), long_run, None, cancel))
    )
    try:
        assert holding.wait(30)  # A runs, and holds the scheduler at its first piece of text
        b.start()
        wait_for(lambda: engine.scheduler.waiting == 1)  # B waits for A's place
        cancel.set()
    finally:
        release.set()
    b.join(timeout=30)
    pieces_when_b_returned = pieces[0]
    a.join(timeout=60)
    assert waiting["b"].finish_reason == "abort" and waiting["b"].output_tokens == 0
    assert running["a"].output_tokens == 200
    assert pieces_when_b_returned < pieces[0]  # B did not wait for A to end


def test_generations_that_arrive_together_are_prefilled_in_one_padded_pass(tiny_engine):
    """Prompts of different lengths in one prefill: the shorter ones left-padded, the padding masked."""
    prompts = ["A", "The file is", "If the value is not None, the function", "Returns the"]
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=1)
    alone = [_alone(tiny_engine, prompt, params) for prompt in prompts]
    # All four wait while a running generation holds the scheduler: its next loop prefills them in one pass.
    results = HeldRun(tiny_engine).arrive_together(prompts, params)
    for result, reference in zip(results, alone, strict=True):
        assert_same_generation(result, reference)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_generations_joining_and_leaving_at_random_steps_each_get_what_they_get_alone(tiny_engine, seed):
    """Random arrivals (seeded): prompts of 1 to ~40 tokens join the batch at random steps and leave
    after 1 to 40 tokens, so the cache is padded on join and trimmed on leave, on either side, over
    and over. Each generation's tokens and log-probabilities are those it gets alone."""
    rng = random.Random(seed)
    words = ["the", "value", "of", "list", "is", "returned", "to", "caller", "when", "file", "not", "found", "a", "new"]
    jobs = [(LONG_PROMPTS[0], SamplingParams(max_tokens=160, temperature=0, logprobs=0), 0)]  # runs throughout
    for _ in range(10):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
        jobs.append((prompt, random_sampling(rng, 40), rng.randint(0, 100)))
    passes_before, fed_before = _batch_counters(tiny_engine)

    assert_staggered_as_alone(tiny_engine, tiny_engine, jobs)

    passes, fed = _batch_counters(tiny_engine)
    assert passes - passes_before < fed - fed_before  # they did share passes


def test_the_kv_cache_metrics_show_its_bytes_and_the_padding_beside_a_longer_prompt(own_engine, tiny_model_dir):
    """A long prompt joins a short running generation: the batch is left-padded to the longer one."""
    engine = own_engine()
    config = engine.model.config
    per_position = 2 * config.n_layer * config.n_embd * 4  # keys and values, every layer, float32
    labels = {"model": MODEL_NAME}
    with serve(engine, settings_for(tiny_model_dir)) as srv:
        assert srv.metric("slm_kv_cache_bytes", labels) == 0  # nothing runs
        running = HeldRun(engine, holds=2)
        long_prompt = " ".join(LONG_PROMPTS * 3)
        try:
            running.wait_held(0)
            thread, _ = start_generation(engine, long_prompt, SamplingParams(max_tokens=8, temperature=0))
            wait_for(lambda: engine.scheduler.waiting == 1)
            running.release(0)
            running.wait_held(1)  # the two share a decode step now
            held = srv.metric("slm_kv_cache_bytes", labels)
            tokens = srv.metric("slm_kv_cache_positions", {**labels, "kind": "token"})
            padding = srv.metric("slm_kv_cache_positions", {**labels, "kind": "padding"})
        finally:
            running.release_all()
        thread.join(timeout=60)
        running.thread.join(timeout=60)
        assert tokens is not None and padding is not None
        assert tokens >= len(engine.encode(long_prompt)) + len(engine.encode(HeldRun.PROMPT))
        assert 0 < padding < tokens  # the short one's cache is padded to the long one's length
        assert held == per_position * (tokens + padding)
        assert srv.metric("slm_kv_cache_bytes", labels) == 0  # both ended: no cache held
        assert srv.metric("slm_kv_cache_positions", {**labels, "kind": "padding"}) == 0


class _CostlyGrammar:
    """A grammar that allows every token but whose every mask takes `seconds` to compute: what a
    client's grammar may cost within llguidance's per-token limits (~0.1 s), made longer."""

    format = "regex"
    output_type = "text"

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.masks = 0

    def start(self) -> _CostlyGrammar:
        return self

    def refused(self, vocab_size: int) -> np.ndarray:
        time.sleep(self.seconds)  # the cost itself, not a wait for something
        self.masks += 1
        return np.zeros(vocab_size, dtype=bool)

    def advance(self, token: int) -> bool:
        return False

    def complete(self) -> bool:
        return False


def test_a_generation_whose_grammar_masks_are_slow_does_not_hold_back_the_others(tiny_engine):
    """A generation held to a grammar whose masks take 1 s each runs beside back-to-back greedy streams:
    the streams' tokens keep coming (no wait of a mask's second between two of them), and each
    generation, the slow one included, gets the tokens it gets alone."""
    slow_prompt, stream_prompt = "The file is", "Return a new list of the"
    slow_params = SamplingParams(max_tokens=3, temperature=0)
    stream_params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    slow_alone = _alone(tiny_engine, slow_prompt, slow_params).token_ids
    stream_alone = _alone(tiny_engine, stream_prompt, stream_params).token_ids
    grammar = _CostlyGrammar(1.0)
    streams: list[GenerationResult] = []
    done = threading.Event()

    def stream() -> None:
        while not done.is_set():
            streams.append(tiny_engine.generate(tiny_engine.encode(stream_prompt), stream_params))

    streamer = threading.Thread(target=stream)
    streamer.start()
    try:
        wait_for(lambda: streams, 60)  # streams are under way
        started = time.perf_counter()
        slow = tiny_engine.generate(
            tiny_engine.encode(slow_prompt), dataclasses.replace(slow_params, grammar=cast(Any, grammar))
        )
        ended = time.perf_counter()
    finally:
        done.set()
        streamer.join(timeout=120)
    assert slow.token_ids == slow_alone
    assert grammar.masks == 3 and ended - started >= 3.0
    assert all(r.token_ids == stream_alone for r in streams)
    during = sorted(t for r in streams for t in r.token_times if started <= t <= ended)
    assert len(during) >= 30, len(during)  # the streams ran while the slow one did
    gaps = [b - a for a, b in itertools.pairwise([started, *during, ended])]
    assert max(gaps) < 0.6, sorted(gaps)[-3:]
