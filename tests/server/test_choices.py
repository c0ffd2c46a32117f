"""Several choices per request (`n`) and log-probabilities in streams, on the OpenAI routes."""

from __future__ import annotations

import hmac
import math
import threading
from typing import Any

import pytest

from .conftest import MODEL_NAME, OUTPUT_HASH_KEY, serve, settings_for, sse_events, wait_for

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "What does open() return?"}]}
COMPLETION = {"model": MODEL_NAME, "prompt": "Return the number of"}


def _events(client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    return sse_events(client, path, body)[0]


def _by_choice(events: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    choices: dict[int, list[dict[str, Any]]] = {}
    for event in events:
        for choice in event["choices"]:
            choices.setdefault(choice["index"], []).append(choice)
    return choices


def test_n_choices_differ_and_come_back_the_same_with_the_same_seed(server):
    body = {**COMPLETION, "max_tokens": 8, "n": 3, "seed": 11, "logprobs": 0}
    r = server.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    choices = doc["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    texts = [c["text"] for c in choices]
    assert len(set(texts)) > 1  # each choice samples with its own seed
    assert doc["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in choices)
    single = server.client.post("/v1/completions", json={**body, "n": 1}).json()
    assert doc["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]  # the prompt counts once
    assert single["choices"][0]["text"] == texts[0]  # choice 0 samples with the seed itself
    again = server.client.post("/v1/completions", json=body).json()
    assert [c["text"] for c in again["choices"]] == texts


def test_a_streamed_chat_of_n_choices_carries_each_choice_and_its_logprobs(server):
    body = {**CHAT, "max_tokens": 8, "n": 2, "seed": 5, "logprobs": True, "top_logprobs": 2}
    events = _events(server.client, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    whole = server.client.post("/v1/chat/completions", json=body).json()
    streamed = _by_choice(events)
    assert sorted(streamed) == [0, 1]
    tokens_streamed = 0
    for index, chunks in streamed.items():
        assert chunks[0]["delta"] == {"role": "assistant", "content": ""}
        finishes = [c["finish_reason"] for c in chunks if c["finish_reason"]]
        assert finishes == [whole["choices"][index]["finish_reason"]]
        content = "".join(c["delta"].get("content", "") for c in chunks)
        assert content == whole["choices"][index]["message"]["content"]
        entries = [e for c in chunks if c["logprobs"] for e in c["logprobs"]["content"]]
        expected = whole["choices"][index]["logprobs"]["content"]
        assert [e["token"] for e in entries] == [e["token"] for e in expected]
        assert [e["logprob"] for e in entries] == pytest.approx([e["logprob"] for e in expected], abs=1e-5)
        assert all(len(e["top_logprobs"]) == 2 for e in entries)
        tokens_streamed += len(entries)
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] == tokens_streamed == whole["usage"]["completion_tokens"]


@pytest.mark.parametrize("extra", [{}, {"echo": True, "n": 2}], ids=["completion", "echo-two-choices"])
def test_streamed_completion_logprobs_add_up_to_the_unstreamed_ones(server, extra):
    """With echo, each choice's first chunk is the prompt with its log-probabilities (the prompt is
    scored before the completion starts), and offsets run on across prompt and completion."""
    body = {**COMPLETION, "max_tokens": 10, "seed": 3, "logprobs": 2, **extra}
    streamed_choices = _by_choice(_events(server.client, "/v1/completions", body))
    whole_choices = server.client.post("/v1/completions", json=body).json()["choices"]
    assert len(streamed_choices) == len(whole_choices) == body.get("n", 1)
    for whole in whole_choices:
        chunks = streamed_choices[whole["index"]]
        assert "".join(c["text"] for c in chunks) == whole["text"]
        streamed = [c["logprobs"] for c in chunks if c["logprobs"]]
        for key in ("tokens", "text_offset"):
            assert [v for lp in streamed for v in lp[key]] == whole["logprobs"][key]
        values = [v for lp in streamed for v in lp["token_logprobs"]]
        assert values == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-5)
        assert [sorted(t or {}) for lp in streamed for t in lp["top_logprobs"]] == [
            sorted(t or {}) for t in whole["logprobs"]["top_logprobs"]
        ]
        if body.get("echo"):
            assert chunks[0]["text"] == COMPLETION["prompt"]
            assert chunks[0]["logprobs"]["token_logprobs"][0] is None  # the first token has no context
            assert len(chunks[0]["logprobs"]["tokens"]) > 1


def test_a_request_of_n_choices_is_one_request_of_n_generations(server, json_records):
    body = {**COMPLETION, "max_tokens": 6, "n": 3, "seed": 2, "logprobs": 0}
    r = server.client.post("/v1/completions", json=body, headers={"x-request-id": "req-n3"})
    assert r.status_code == 200, r.text
    doc = r.json()
    generated = doc["usage"]["completion_tokens"]
    labels = {"model": MODEL_NAME, "endpoint": "/v1/completions"}
    assert server.metric("api_requests_total", {"endpoint": "/v1/completions", "status": "200"}) == 1
    finished = [
        server.metric("slm_request_finish_total", {**labels, "finish_reason": r}) or 0 for r in ("stop", "length")
    ]
    assert sum(finished) == 3
    assert server.metric("slm_generation_tokens_total", labels) == generated
    assert server.metric("slm_request_output_tokens_count", labels) == 3

    line = wait_for(lambda: next((d for d in json_records("request") if d["request_id"] == "req-n3"), None))
    assert line["gen_ai.request.choice.count"] == 3
    assert line["gen_ai.usage.output_tokens"] == generated
    assert line["gen_ai.response.finish_reasons"] == [c["finish_reason"] for c in doc["choices"]]
    logprobs = [v for c in doc["choices"] for v in c["logprobs"]["token_logprobs"]]
    assert line["slm.perplexity"] == pytest.approx(math.exp(-sum(logprobs) / generated), rel=1e-4)
    per_choice = line["slm.choices"]
    assert [c["slm.choice.index"] for c in per_choice] == [0, 1, 2]
    for logged, choice in zip(per_choice, doc["choices"], strict=True):
        assert logged["gen_ai.usage.output_tokens"] == len(choice["logprobs"]["tokens"])
        digest = hmac.new(OUTPUT_HASH_KEY.encode(), choice["text"].encode(), "sha256").hexdigest()
        assert logged["gen_ai.output.hmac_sha256"] == digest
        assert logged["gen_ai.output.length"] == len(choice["text"])


def test_more_choices_than_the_server_runs_at_once_is_400_naming_n(server):
    limit = server.settings.max_concurrent_requests
    r = server.client.post("/v1/chat/completions", json={**CHAT, "n": limit + 1})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "n"
    assert f"at most {limit} generations at once (max_concurrent_requests)" in error["message"]


def test_choices_that_cannot_all_start_are_refused_and_give_back_their_slots(tiny_engine, tiny_model_dir):
    settings = settings_for(
        tiny_model_dir,
        max_concurrent_requests=2,
        max_queued_requests=0,
        fault_injection=True,
        fault_latency_seconds=1.0,
    )
    with serve(tiny_engine, settings) as srv:
        in_flight = {"model": MODEL_NAME}
        busy = threading.Thread(target=srv.client.post, args=("/generate",), kwargs={"json": {"prompt": "x"}})
        busy.start()
        wait_for(lambda: srv.metric("slm_requests_in_flight", in_flight) == 1)
        r = srv.client.post("/v1/completions", json={**COMPLETION, "max_tokens": 2, "n": 2})
        assert r.status_code == 429  # one choice found a slot, the other none: the whole request is refused
        busy.join()
        wait_for(lambda: srv.metric("slm_requests_in_flight", in_flight) == 0)
        srv.client.app.state.service.faults.latency_seconds = 0.0
        r = srv.client.post("/v1/completions", json={**COMPLETION, "max_tokens": 2, "n": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
