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
    from slm_server.engine import SamplingParams

    prompt = tiny_engine.encode("Return the number of items")
    normal = tiny_engine.generate(prompt, SamplingParams(30, temperature=1.0, seed=1))
    garbage = tiny_engine.generate(prompt, SamplingParams(30, temperature=1.0, seed=1, degraded=True))
    assert garbage.perplexity > 10 * normal.perplexity
    assert garbage.perplexity == pytest.approx(
        teacher_forced_perplexity(tiny_engine, prompt, garbage.token_ids), rel=1e-3
    )
