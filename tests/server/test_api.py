"""API behaviour with the real tiny model, in process (the lifespan runs)."""

from __future__ import annotations

import json
import math
import os
import threading
import time

import pytest
import torch

from slm_server.generation.echo_engine import EchoEngine
from slm_server.middleware import _new_request_id

from .conftest import MODEL_NAME, serve, settings_for, sse_events


def test_generate_returns_text_token_counts_and_perplexity(server):
    r = server.client.post("/generate", json={"prompt": "Return the number of items", "max_tokens": 12, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODEL_NAME
    assert body["prompt_tokens"] > 0
    assert 1 <= body["output_tokens"] <= 12
    assert body["finish_reason"] in ("stop", "length")
    assert body["perplexity"] > 1.0
    assert body["time_to_first_token_seconds"] > 0
    assert r.headers["x-request-id"] == body["id"]


def test_same_seed_same_text_and_greedy_is_repeatable(server):
    def text(**kw):
        return server.client.post("/generate", json={"prompt": "The file", "max_tokens": 10, **kw}).json()["text"]

    assert text(seed=5) == text(seed=5)
    assert text(temperature=0) == text(temperature=0)


def test_max_new_tokens_is_accepted_as_the_seed_spelling(server):
    body = server.client.post("/generate", json={"prompt": "A", "max_new_tokens": 3, "temperature": 0}).json()
    assert body["output_tokens"] <= 3


def test_stop_string_ends_the_text_before_it(server):
    greedy = server.client.post(
        "/generate", json={"prompt": "Return the", "max_tokens": 30, "temperature": 0, "return_token_ids": True}
    ).json()
    text = greedy["text"]
    assert len(text) > 8, text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = server.client.post(
        "/generate", json={"prompt": "Return the", "max_tokens": 30, "temperature": 0, "stop": [stop]}
    ).json()
    assert stopped["finish_reason"] == "stop"
    assert stop not in stopped["text"]
    assert text.startswith(stopped["text"])


def test_a_client_request_id_is_kept(server):
    r = server.client.post("/generate", json={"prompt": "x", "max_tokens": 1}, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert r.json()["id"] == "abc-123"


def test_completions_follow_the_openai_shape(server):
    r = server.client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Return the", "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 5


def test_chat_uses_the_tokenizer_chat_template(server, tiny_engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    r = server.client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": messages, "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    templated = tiny_engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert body["usage"]["prompt_tokens"] == len(tiny_engine.tokenizer.encode(templated, add_special_tokens=False))


def test_chat_accepts_content_parts_and_max_completion_tokens(server):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]}]
    r = server.client.post(
        "/v1/chat/completions", json={"model": MODEL_NAME, "messages": messages, "max_completion_tokens": 2}
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2


def test_streamed_chat_arrives_as_server_sent_events(server):
    with server.client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        frames = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "data: [DONE]"
    assert '"role":"assistant"' in frames[0]
    assert any('"finish_reason":"' in f for f in frames)
    assert '"usage"' in frames[-2]


def _generate_stream(client, **body):
    events, headers = sse_events(client, "/generate", body)
    return events, headers["x-request-id"]


def test_generate_streams_text_then_the_whole_response(server):
    body = {"prompt": "Return the number of", "max_tokens": 10, "seed": 7}
    events, request_id = _generate_stream(server.client, **body)
    *deltas, last = events
    assert deltas and all(set(d) == {"text"} for d in deltas)
    assert "".join(d["text"] for d in deltas) == last["text"]
    assert last["id"] == request_id and last["model"] == MODEL_NAME
    assert last["finish_reason"] in ("stop", "length") and 1 <= last["output_tokens"] <= 10
    assert last["perplexity"] > 1 and last["time_to_first_token_seconds"] > 0
    # The same request without streaming gives the same text (same seed).
    assert server.client.post("/generate", json=body).json()["text"] == last["text"]
    assert server.metric("api_requests_total", {"endpoint": "/generate", "status": "200"}) == 2


def test_a_streamed_generate_is_logged_as_streamed(server, json_records):
    _, request_id = _generate_stream(server.client, prompt="Return", max_tokens=3)
    line = next(d for d in json_records("request") if d["request_id"] == request_id)
    assert line["slm.stream"] is True and line["gen_ai.usage.output_tokens"] >= 1


def test_a_streamed_generate_refused_before_the_first_byte_is_a_plain_error(server):
    r = server.client.post("/generate", json={"prompt": "x", "max_tokens": 100_000, "stream": True})
    assert r.status_code == 400 and "maximum is 512" in r.json()["error"]["message"]


def test_models_lists_the_served_model_with_its_context(server):
    body = server.client.get("/v1/models").json()
    assert body["object"] == "list"
    assert body["data"][0]["id"] == MODEL_NAME
    assert body["data"][0]["max_model_len"] == 256


def test_openapi_document_lists_every_route(server):
    paths = server.client.get("/openapi.json").json()["paths"]
    for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz", "/readyz"):
        assert path in paths
    assert "/admin/faults" not in paths  # fault injection cannot be reached in the default configuration


def test_health_and_readiness(server):
    assert server.client.get("/healthz").json() == {"status": "ok"}
    assert server.client.get("/readyz").json() == {"status": "ready", "model": MODEL_NAME}


class _SlowLoadingEngine(EchoEngine):
    """Plumbing only (readiness before load): an engine whose load waits for the test's signal."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def load(self) -> None:
        self.release.wait(10)
        super().load()


def test_readiness_is_503_until_the_model_is_loaded(tiny_model_dir):
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    from slm_server.app import create_app

    engine = _SlowLoadingEngine()
    app = create_app(settings_for(tiny_model_dir), engine=engine, registry=CollectorRegistry())
    with TestClient(app) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.headers["retry-after"]
        assert client.get("/healthz").status_code == 200  # alive while loading
        gen = client.post("/generate", json={"prompt": "x"})
        assert gen.status_code == 503 and "not loaded" in gen.json()["error"]["message"]
        engine.release.set()
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_a_model_that_fails_to_load_fails_liveness(tiny_model_dir, tmp_path, json_records):
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    from slm_server.app import create_app
    from slm_server.settings import Settings

    app = create_app(
        Settings(model=str(tmp_path / "no-such-model"), served_model_name="x"), registry=CollectorRegistry()
    )
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/healthz").status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/readyz").json()["status"] == "failed"
    failed = json_records("model_load_failed")
    assert len(failed) == 1 and failed[0]["exception.stacktrace"]


def test_concurrent_requests_all_complete(tiny_engine, tiny_model_dir):
    with serve(tiny_engine, settings_for(tiny_model_dir, max_concurrent_requests=2, max_queued_requests=8)) as srv:
        results: list[int] = []

        def call():
            results.append(srv.client.post("/generate", json={"prompt": "The", "max_tokens": 5}).status_code)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [200] * 6
        assert srv.metric("slm_requests_in_flight", {"model": MODEL_NAME}) == 0
        assert srv.metric("slm_requests_queued", {"model": MODEL_NAME}) == 0


def test_a_vanishing_top_p_keeps_the_most_likely_token(server):
    """Found by the fuzzer: top_p=5e-324 is 0 in float32, which once left no token to sample (500)."""
    greedy = server.client.post("/generate", json={"prompt": "asgi", "max_tokens": 5, "temperature": 0}).json()
    tiny = server.client.post("/generate", json={"prompt": "asgi", "max_tokens": 5, "top_p": 5e-324}).json()
    assert tiny["text"] == greedy["text"]


@pytest.mark.parametrize(
    "penalties",
    [{"frequency_penalty": 1.5}, {"presence_penalty": 2.0}, {"presence_penalty": 0.5, "frequency_penalty": 0.5}],
)
def test_penalties_change_each_choice_as_openai_defines_them_and_never_the_perplexity(server, tiny_engine, penalties):
    """Each greedy token is the most likely after subtracting, from the teacher-forced logits, the
    penalties of the tokens before it in the output; the perplexity stays the model's own."""
    prompt = "Return the number of items in the list"
    body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "return_token_ids": True}
    plain = server.client.post("/generate", json=body).json()
    penalized = server.client.post("/generate", json={**body, **penalties}).json()
    completion = server.client.post("/v1/completions", json={**body, "model": MODEL_NAME, **penalties}).json()
    output = penalized["token_ids"]
    assert output != plain["token_ids"]
    assert completion["choices"][0]["text"] == penalized["text"]

    prompt_ids = tiny_engine.encode(prompt)
    with torch.no_grad():
        logits = tiny_engine.model(input_ids=torch.tensor([prompt_ids + output])).logits[0].float()
    counts = torch.zeros(logits.shape[-1])
    for i, token in enumerate(output):
        step = logits[len(prompt_ids) - 1 + i]
        step = (
            step - penalties.get("frequency_penalty", 0) * counts - penalties.get("presence_penalty", 0) * (counts > 0)
        )
        assert step[token] >= step.max() - 1e-3, f"token {i} is not the penalized greedy choice"
        counts[token] += 1
    logprobs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    model_perplexity = math.exp(-logprobs.gather(1, torch.tensor(output).unsqueeze(1)).mean().item())
    assert penalized["perplexity"] == pytest.approx(model_perplexity, rel=1e-3)


def test_a_prompt_of_token_ids_is_the_prompt_those_ids_encode(server, tiny_engine):
    text = "Return the number of items in the list"
    ids = tiny_engine.encode(text)
    body = {"model": MODEL_NAME, "max_tokens": 12, "temperature": 0, "logprobs": 1}
    as_text = server.client.post("/v1/completions", json={**body, "prompt": text}).json()
    for prompt in (ids, [ids]):
        as_ids = server.client.post("/v1/completions", json={**body, "prompt": prompt}).json()
        assert as_ids["choices"] == as_text["choices"]
        assert as_ids["usage"] == as_text["usage"]
    echoed = server.client.post("/v1/completions", json={**body, "prompt": ids, "echo": True}).json()
    assert echoed["choices"][0]["text"] == text + as_text["choices"][0]["text"]


def test_a_repetition_penalty_chooses_what_transformers_own_generate_chooses(server, tiny_engine):
    """vLLM's and transformers' repetition_penalty (the prompt's tokens count too): greedy tokens equal
    transformers' `generate(repetition_penalty=...)` on the same model; the perplexity stays the model's."""
    prompt = "Return the number of items in the list"
    body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "return_token_ids": True}
    plain = server.client.post("/generate", json=body).json()
    penalized = server.client.post("/generate", json={**body, "repetition_penalty": 1.3}).json()
    chat_body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": 40}
    chat = server.client.post("/v1/chat/completions", json={**chat_body, "temperature": 0, "repetition_penalty": 1.3})

    prompt_ids = tiny_engine.encode(prompt)
    with torch.no_grad():
        reference = tiny_engine.model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=40, do_sample=False, repetition_penalty=1.3,
            eos_token_id=sorted(tiny_engine.eos_ids), pad_token_id=0,
        )[0, len(prompt_ids) :].tolist()  # fmt: skip
    assert penalized["token_ids"] == reference
    assert penalized["token_ids"] != plain["token_ids"]
    assert chat.status_code == 200, chat.text
    with torch.no_grad():
        logits = tiny_engine.model(input_ids=torch.tensor([prompt_ids + reference])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    model_perplexity = math.exp(-logprobs.gather(1, torch.tensor(reference).unsqueeze(1)).mean().item())
    assert penalized["perplexity"] == pytest.approx(model_perplexity, rel=1e-3)


def test_logit_bias_bans_and_forces_tokens_as_openai_defines_it(server):
    body = {"model": MODEL_NAME, "prompt": "Return the number of items in the list", "max_tokens": 12,
            "temperature": 0, "return_token_ids": True}  # fmt: skip
    plain = server.client.post("/generate", json={**body, "model": None}).json()["token_ids"]
    banned = {str(token): -100 for token in set(plain)}
    without = server.client.post("/generate", json={**body, "model": None, "logit_bias": banned}).json()
    assert without["token_ids"] and not set(without["token_ids"]) & set(plain)
    forced = server.client.post("/v1/completions", json={**body, "logit_bias": {"42": 100}})
    assert forced.status_code == 200, forced.text
    assert (
        forced.json()["choices"][0]["text"]
        == server.client.post(
            "/generate", json={"prompt": body["prompt"], "max_tokens": 12, "temperature": 0, "logit_bias": {"42": 100}}
        ).json()["text"]
    )
    forced_ids = server.client.post("/generate", json={**body, "model": None, "logit_bias": {"42": 100}}).json()
    assert forced_ids["token_ids"] == [42] * 12


@pytest.mark.parametrize(
    ("logit_bias", "status", "says"),
    [
        ({"999999": 5}, 400, "token id 999999 is not in the model's vocabulary (ids 0 to 2047)"),
        ({"the": 5}, 422, "logit_bias"),
        ({"-1": 5}, 422, "logit_bias"),
        ({"7": 100.5}, 422, "less than or equal to 100"),
    ],
)
def test_a_logit_bias_the_model_cannot_take_is_refused_naming_it(server, logit_bias, status, says):
    for path, extra in (("/generate", {}), ("/v1/completions", {"model": MODEL_NAME})):
        r = server.client.post(path, json={"prompt": "The", "max_tokens": 2, "logit_bias": logit_bias, **extra})
        assert r.status_code == status, r.text
        assert says in r.text and "logit_bias" in r.text


def test_min_p_samples_only_tokens_near_the_most_likely(server, tiny_engine):
    prompt = "Return the number of items in the list"
    body = {"prompt": prompt, "max_tokens": 30, "temperature": 1.5, "seed": 11, "return_token_ids": True}
    with_min_p = server.client.post("/generate", json={**body, "min_p": 0.2}).json()["token_ids"]
    without = server.client.post("/generate", json=body).json()["token_ids"]

    def worst_share(output: list[int]) -> float:
        """The lowest, over the output, of a token's probability over the most likely one's (at temperature)."""
        prompt_ids = tiny_engine.encode(prompt)
        with torch.no_grad():
            logits = tiny_engine.model(input_ids=torch.tensor([prompt_ids + output])).logits[0].float()
        probs = torch.softmax(logits[len(prompt_ids) - 1 : -1] / body["temperature"], dim=-1)
        return min(float(p[t] / p.max()) for p, t in zip(probs, output, strict=True))

    assert worst_share(with_min_p) >= 0.2 - 1e-4
    assert worst_share(without) < 0.2  # the same seed without min_p goes below it


def test_top_k_samples_only_among_the_k_most_likely_tokens(server, tiny_engine):
    prompt = "Return the number of items in the list"
    body = {"prompt": prompt, "max_tokens": 30, "temperature": 1.0, "seed": 5, "return_token_ids": True}
    greedy = server.client.post("/generate", json={**body, "temperature": 0}).json()
    top_1 = server.client.post("/generate", json={**body, "top_k": 1}).json()
    top_3 = server.client.post("/generate", json={**body, "top_k": 3}).json()["token_ids"]
    unrestricted = server.client.post("/generate", json=body).json()["token_ids"]
    assert top_1["token_ids"] == greedy["token_ids"]

    def ranks(output: list[int]) -> list[int]:
        """Each token's rank among the teacher-forced logits at its position (0 = the most likely)."""
        prompt_ids = tiny_engine.encode(prompt)
        with torch.no_grad():
            logits = tiny_engine.model(input_ids=torch.tensor([prompt_ids + output])).logits[0].float()
        steps = logits[len(prompt_ids) - 1 : -1]
        return [int((step > step[token] + 1e-3).sum()) for step, token in zip(steps, output, strict=True)]

    assert max(ranks(top_3)) < 3
    assert max(ranks(unrestricted)) >= 3  # without top_k the same seed goes further down the list
    # vLLM's spelling of "all tokens", and a value that means nothing.
    assert server.client.post("/generate", json={**body, "top_k": -1}).json()["token_ids"] == unrestricted
    refused = server.client.post("/generate", json={**body, "top_k": -2})
    assert refused.status_code == 422 and "top_k" in refused.text


def test_request_ids_are_unique_and_a_forked_worker_never_repeats_its_parent(server):
    ids = [
        server.client.post("/generate", json={"prompt": "x", "max_tokens": 1}).headers["x-request-id"] for _ in range(5)
    ]
    assert len(set(ids)) == 5 and all(len(i) == 24 for i in ids)
    # Made in batches: a worker forked with part of a batch left (uvicorn --workers, gunicorn) must not
    # hand out what the parent hands out next.
    parent_next = [_new_request_id() for _ in range(3)]
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids to the parent, then leave at once
        os.write(writer, json.dumps([_new_request_id() for _ in range(3)]).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        child_ids = json.loads(pipe.read())
    os.waitpid(pid, 0)
    parent_ids = parent_next + [_new_request_id() for _ in range(3)]
    assert not set(child_ids) & set(parent_ids)
    assert {i[:16] for i in child_ids} != {i[:16] for i in parent_ids}


def test_tokenize_counts_a_prompt_and_a_chat_as_their_generations_count_them(server):
    text = "Return the number of items in the list"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does it return?"}]
    as_text = server.client.post("/tokenize", json={"prompt": text}).json()
    as_chat = server.client.post("/tokenize", json={"model": MODEL_NAME, "messages": messages}).json()
    completion = server.client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": text, "max_tokens": 1})
    chat = server.client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": messages, "max_tokens": 1})
    assert as_text["count"] == len(as_text["tokens"]) == completion.json()["usage"]["prompt_tokens"]
    assert as_chat["count"] == len(as_chat["tokens"]) == chat.json()["usage"]["prompt_tokens"]
    assert as_text["max_model_len"] == 256
    by_ids = {"model": MODEL_NAME, "prompt": as_text["tokens"], "max_tokens": 1}
    assert server.client.post("/v1/completions", json=by_ids).json()["usage"] == completion.json()["usage"]
    assert server.client.post("/detokenize", json={"tokens": as_text["tokens"]}).json() == {"prompt": text}


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/tokenize", {}, 422, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 422, "messages"),
        ("/tokenize", {"model": "gpt-17", "prompt": "x"}, 404, "gpt-17"),
        # 256 tokens of context x 32 characters: a longer prompt cannot fit, and is not encoded to say so.
        ("/tokenize", {"prompt": "ab " * 2731}, 400, "prompt has 8193 characters: more than fits the model's context"),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 5000}] * 2}]},
            400,
            "messages has 10000 characters",
        ),
        ("/detokenize", {"tokens": [5, 4096]}, 400, "tokens: token id 4096 is not in the model's vocabulary"),
        ("/detokenize", {"tokens": [-1]}, 422, "tokens"),
    ],
)
def test_tokenize_and_detokenize_refuse_what_they_cannot_take_saying_why(server, path, body, status, says):
    r = server.client.post(path, json=body)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]


def test_min_tokens_and_ignore_eos_hold_off_the_end_of_text(server, tiny_engine):
    """vLLM's: min_tokens keeps the end-of-text token from being chosen until the output is that long;
    ignore_eos lets the generation run through it to max_tokens (fixed-length load tests)."""
    prompt = "The file"  # greedy, the tiny model ends it after 14 tokens
    eos = next(iter(tiny_engine.eos_ids))
    free = server.client.post(
        "/generate", json={"prompt": prompt, "max_tokens": 200, "temperature": 0, "return_token_ids": True}
    ).json()
    assert free["finish_reason"] == "stop" and free["output_tokens"] < 100
    held = server.client.post(
        "/generate",
        json={
            "prompt": prompt,
            "max_tokens": 200,
            "temperature": 0,
            "min_tokens": free["output_tokens"] + 5,
            "return_token_ids": True,
        },
    ).json()
    assert held["output_tokens"] >= free["output_tokens"] + 5
    assert eos not in held["token_ids"][: free["output_tokens"] + 5]
    forced = server.client.post(
        "/v1/completions",
        json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 120, "temperature": 0, "ignore_eos": True},
    ).json()
    assert forced["choices"][0]["finish_reason"] == "length" and forced["usage"]["completion_tokens"] == 120
