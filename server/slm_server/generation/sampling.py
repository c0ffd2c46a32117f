"""The choice of the next token from one position's logits, and the most likely alternatives."""

from __future__ import annotations

import torch

from slm_server.generation.types import Alternative, SamplingParams


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token from one position's logits (penalties, biases and grammar already applied) under
    `params`."""
    if params.degraded:  # uniformly among the tokens still allowed (a grammar's, min_tokens' refusals are -inf)
        return int(torch.multinomial(torch.isfinite(logits).float(), 1, generator=generator))
    if params.temperature <= 1e-5:
        return int(torch.argmax(logits))
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        keep = cumulative - sorted_probs < params.top_p
        keep[0] = True  # the most likely token always stays (a top_p below float32's range keeps none)
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def top_alternatives(logprobs: torch.Tensor, k: int) -> list[Alternative]:
    """The `k` most likely tokens of one position's log-probabilities."""
    if k <= 0:
        return []
    values, indices = torch.topk(logprobs, k)
    return [Alternative(token, value) for token, value in zip(indices.tolist(), values.tolist(), strict=True)]
