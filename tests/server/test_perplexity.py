"""The perplexity the server reports is exp(loss) of a teacher-forced pass over the same tokens."""

from __future__ import annotations

import math

import pytest
import torch

from .conftest import MODEL_NAME


def teacher_forced_perplexity(engine, prompt_ids: list[int], output_ids: list[int]) -> float:
    """exp(mean cross-entropy) of the output tokens given the prompt, in one full forward pass."""
    ids = torch.tensor([prompt_ids + output_ids])
    labels = ids.clone()
    labels[0, : len(prompt_ids)] = -100  # score only the generated tokens
    with torch.no_grad():
        loss = engine.model(input_ids=ids, labels=labels).loss
    return math.exp(loss.item())


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1.0, "seed": 3},
        {"temperature": 0.0},
        {"temperature": 0.7, "top_p": 0.9, "seed": 11},
    ],
)
def test_reported_perplexity_equals_exp_loss_of_a_teacher_forced_pass(server, tiny_engine, sampling):
    prompt = "Return a new list of the items in the order given"
    r = server.client.post("/generate", json={"prompt": prompt, "max_tokens": 40, "return_token_ids": True, **sampling})
    body = r.json()
    output_ids = body["token_ids"]
    assert output_ids, body
    expected = teacher_forced_perplexity(tiny_engine, tiny_engine.encode(prompt), output_ids)

    assert body["perplexity"] == pytest.approx(expected, rel=1e-3)
    # The metric holds the same number: one observation, so its sum is that value.
    labels = {"model": MODEL_NAME, "endpoint": "/generate"}
    assert server.metric("slm_request_perplexity_count", labels) == 1
    assert server.metric("slm_request_perplexity_sum", labels) == pytest.approx(expected, rel=1e-3)


def test_garbage_output_has_a_much_higher_perplexity_than_the_model_own(tiny_engine):
    """Degraded output (the fault that feeds the perplexity-drift alert) stands out."""
    from slm_server.generation.types import SamplingParams

    prompt = tiny_engine.encode("Return the number of items")
    normal = tiny_engine.generate(prompt, SamplingParams(30, temperature=1.0, seed=1))
    garbage = tiny_engine.generate(prompt, SamplingParams(30, temperature=1.0, seed=1, degraded=True))
    assert garbage.perplexity > 10 * normal.perplexity
    assert garbage.perplexity == pytest.approx(
        teacher_forced_perplexity(tiny_engine, prompt, garbage.token_ids), rel=1e-3
    )


# --- log-probabilities in the OpenAI routes: the same numbers the perplexity comes from -------------------------------
def test_completion_logprobs_are_the_ones_the_perplexity_is_made_of(server, tiny_engine):
    prompt = "Return the number of"
    body = server.client.post(
        "/v1/completions",
        json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "seed": 5, "logprobs": 3},
    ).json()
    logprobs = body["choices"][0]["logprobs"]
    n = body["usage"]["completion_tokens"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == n
    assert "".join(logprobs["tokens"]) == body["choices"][0]["text"]
    for value, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert value <= 0 and 1 <= len(top) <= 3
        assert value <= max(top.values()) + 1e-5  # no token is likelier than the likeliest
    # /generate with the same seed samples the same tokens and reports their perplexity.
    same = server.client.post("/generate", json={"prompt": prompt, "max_tokens": 8, "seed": 5}).json()
    mean = sum(logprobs["token_logprobs"]) / n
    assert math.exp(-mean) == pytest.approx(same["perplexity"], rel=1e-4)


def test_echo_with_logprobs_scores_the_prompt_as_a_teacher_forced_pass(server, tiny_engine):
    prompt = "The value of the attribute is returned"
    body = server.client.post(
        "/v1/completions",
        json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0},
    ).json()
    choice = body["choices"][0]
    assert choice["text"].startswith(prompt)
    prompt_ids = tiny_engine.encode(prompt)
    values = choice["logprobs"]["token_logprobs"]
    assert len(values) == len(prompt_ids) + 1 and values[0] is None
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        loss = tiny_engine.model(input_ids=ids, labels=ids).loss.item()  # mean NLL of tokens 2..n
    assert -sum(values[1 : len(prompt_ids)]) / (len(prompt_ids) - 1) == pytest.approx(loss, rel=1e-3)


def test_chat_logprobs_carry_the_top_alternatives_in_openai_shape(server):
    body = server.client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 5,
            "logprobs": True,
            "top_logprobs": 2,
        },
    ).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]


@pytest.mark.parametrize(
    ("route", "extra", "field"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
    ],
)
def test_unsupported_logprob_requests_are_refused_naming_the_field(server, route, extra, field):
    r = server.client.post(route, json={"model": MODEL_NAME, **extra})
    assert r.status_code in (400, 422)
    assert field in r.text
