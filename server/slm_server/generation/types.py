"""What a generation is made of, and what the service needs of a model (`Engine`).

Plain data and one abstract class, no torch: the service, the routers, the metrics and the no-op
engine use these without the model's libraries.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from slm_server.generation.structured import GrammarCompiler, OutputGrammar


class PromptError(ValueError):
    """A prompt the model cannot take: text its tokenizer refuses, a chat its template refuses.
    `param` names the request field (a 400 that says what is wrong, not a 500)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class Alternative(NamedTuple):
    """One of the most likely tokens at a position, with its log-probability."""

    token_id: int
    logprob: float


class TokenLogprobs(NamedTuple):
    """A generated token with its log-probability and the k most likely tokens at its position."""

    token_id: int
    logprob: float
    top: list[Alternative]


# Called with each piece of text as it becomes final, and (with SamplingParams.logprobs) the log-
# probabilities of the tokens generated since the previous call (empty otherwise). Tokens that make
# no text yet (part of a character, a possible stop string, the end-of-text token) come with a later
# piece, or with the last call, whose text may be empty.
OnText = Callable[[str, list[TokenLogprobs]], None]


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # sample among the k most likely tokens only; 0: among all
    stop: tuple[str, ...] = ()
    seed: int | None = None
    degraded: bool = False  # fault injection: sample uniformly instead of from the model
    # OpenAI's: subtracted from the logit of each token the output already holds, once (presence)
    # and once per occurrence (frequency). They change the choice, never the reported log-probabilities.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's and transformers': the logit of each token the prompt or output holds, divided by it when
    # positive, multiplied when negative (1.0: off).
    repetition_penalty: float = 1.0
    # OpenAI's: (token id, bias) added to the token's logit before the choice.
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_p: float = 0.0  # sampling keeps the tokens at least min_p times as likely as the most likely one
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the k most likely
    # Structured output (slm_server.generation.structured): the tokens the grammar refuses are never chosen.
    grammar: OutputGrammar | None = None
    min_tokens: int = 0  # vLLM's: no end-of-text token before this many tokens
    ignore_eos: bool = False  # vLLM's: an end-of-text token does not end the generation


@dataclass(slots=True)
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # stop | length | abort
    prompt_tokens: int
    logprob_sum: float = 0.0  # sum of log p(token | prefix) of the generated tokens, under the model
    token_times: list[float] = field(default_factory=list)  # perf_counter() when each token was ready
    # With SamplingParams.logprobs: log p of each generated token, and the k most likely at its position.
    token_logprobs: list[float] | None = None
    top_logprobs: list[list[Alternative]] | None = None
    cached_tokens: int = 0  # prompt tokens whose KV cache came from the prefix cache (not fed to the model)
    # With SamplingParams.grammar: whether the output is a whole document its schema accepts.
    structured_complete: bool | None = None

    @property
    def output_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def perplexity(self) -> float | None:
        """exp of the mean negative log-likelihood of the generated tokens; None when none were."""
        if not self.token_ids:
            return None
        return math.exp(-self.logprob_sum / len(self.token_ids))

    def logprob_entries(self, reported: int = 0) -> list[TokenLogprobs]:
        """The generated tokens after the first `reported`, with their log-probabilities (empty when
        they were not recorded)."""
        if self.token_logprobs is None or self.top_logprobs is None:
            return []
        return [
            TokenLogprobs(token, logprob, top)
            for token, logprob, top in zip(
                self.token_ids[reported:], self.token_logprobs[reported:], self.top_logprobs[reported:], strict=True
            )
        ]


@dataclass(slots=True, frozen=True)
class ModelInfo:
    name: str
    source: str
    max_context: int
    dtype: str
    device: str
    has_chat_template: bool
    parameters: int
    # Sampling when a request leaves it out: the model's generation_config.json when it sets them
    # (as vLLM does by default), else 1.0, 1.0 and 0 (all tokens).
    default_temperature: float = 1.0
    default_top_p: float = 1.0
    default_top_k: int = 0
    # How concurrent generations share the model: "continuous" (one forward pass for all, see
    # slm_server.generation.scheduler), "one sequence per pass", or "none" (no model).
    batching: str = "none"
    vocab_size: int = 0  # the model's output vocabulary (logit_bias ids are below it); 0: no model
    # Prompt-prefix KV caching (slm_server.generation.prefix_cache): "on", "off" (the setting), or
    # "unsupported" (a model with sliding-window layers, or without continuous batching).
    prefix_caching: str = "off"
    structured_output: bool = False  # response_format json_schema/json_object (slm_server.generation.structured)


class PromptToken(NamedTuple):
    """A prompt's token scored by the model: its log-probability given the ones before (None for the
    first) and the most likely tokens at its position."""

    token_id: int
    logprob: float | None
    top: list[Alternative]


class PromptScores(NamedTuple):
    """A prompt scored by the model (echo + logprobs): per token, its log-probability given the ones
    before (None for the first) and the most likely tokens at its position (none for the first)."""

    logprobs: list[float | None]
    top: list[list[Alternative]]


class BatchStats(NamedTuple):
    """How generations share forward passes, since the model loaded."""

    running: int  # generations in the running batch now
    forward_passes: int
    generations_fed: int  # generations fed in those passes (per pass: the batch size)


class KVCacheStats(NamedTuple):
    """The running generations' KV cache, now."""

    nbytes: int
    positions: int  # the positions their batches' caches span
    padding: int  # of which padding


class PrefixCacheStats(NamedTuple):
    """The prompt-prefix cache, since the model loaded (zeros with prefix caching off)."""

    queried_tokens: int  # prompt tokens looked up
    hit_tokens: int  # of them, found
    nbytes: int  # KV cache bytes it holds now
    capacity_bytes: int  # its budget; 0: off


class Engine(ABC):
    """What the service needs from a model."""

    blocking: bool = True  # run `generate` in a worker thread
    info: ModelInfo
    grammars: GrammarCompiler | None = None  # structured output; None: this engine has none

    @property
    def loaded(self) -> bool:
        return getattr(self, "info", None) is not None

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def encode_chat(self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The prompt of a chat: its messages and tools (OpenAI's shapes) through the model's chat template."""

    @abstractmethod
    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_text: OnText | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult: ...

    def token_text(self, token_id: int) -> str:
        """The text of one token, for log-probability listings."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """The text of token ids (a prompt given as ids, echoed)."""
        return "".join(self.token_text(token_id) for token_id in ids)

    def score(self, ids: list[int], top: int) -> PromptScores:
        """Teacher-forced log p of each token of `ids` given the ones before, and the `top` most likely
        tokens at each position (echo + logprobs)."""
        raise NotImplementedError

    def batch_stats(self) -> BatchStats | None:
        """None for an engine without forward passes."""
        return None

    def kv_cache_stats(self) -> KVCacheStats | None:
        """None for an engine without a model cache."""
        return None

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """None for an engine without a model cache."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model (shutdown)."""
