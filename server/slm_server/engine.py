"""The model layer: load a causal LM, turn prompts into tokens, generate with a KV cache.

`TransformersEngine` runs its own sampling loop (not `model.generate`) because the loop is where
the monitoring signals are born: each generated token's log-probability under the model (summed
into the request's perplexity — no second forward pass), each token's timestamp (time to first
token, inter-token latency), and text deltas for streaming. The loop itself is
slm_server.batching's scheduler: one thread that runs every generation in flight in the same
forward passes (continuous batching). `generate` blocks its caller (the service's worker thread)
until the generation ends; the service can stop it between two tokens (`cancel`).

`EchoEngine` is a no-op engine (it echoes the prompt's words) for benchmarking the HTTP and
monitoring layers without a model; the tests use it only for pure HTTP/metrics plumbing.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slm_server.settings import Settings

if TYPE_CHECKING:
    from slm_server.batching import Scheduler
    from slm_server.structured import GrammarCompiler, OutputGrammar

log = logging.getLogger("slm_server.engine")

# A generated token with its log-probability and the k most likely (id, log p) at its position.
TokenLogprobs = tuple[int, float, list[tuple[int, float]]]
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
    # Structured output (slm_server.structured): the tokens the grammar refuses are never chosen.
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
    # With SamplingParams.logprobs: log p of each generated token, and the k most likely (id, log p).
    token_logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
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
    # slm_server.batching), "one sequence per pass", or "none" (no model).
    batching: str = "none"
    vocab_size: int = 0  # the model's output vocabulary (logit_bias ids are below it); 0: no model
    # Prompt-prefix KV caching (slm_server.prefix_cache): "on", "off" (the setting), or "unsupported"
    # (a model with sliding-window layers, or without continuous batching).
    prefix_caching: str = "off"
    structured_output: bool = False  # response_format json_schema/json_object (slm_server.structured)


class Engine(ABC):
    """What the service needs from a model."""

    blocking: bool = True  # run `generate` in a worker thread
    info: ModelInfo
    grammars: GrammarCompiler | None = None  # structured output; None: this engine has none

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

    def score(self, ids: list[int], top: int) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
        """Teacher-forced log p of each token of `ids` given the ones before (None for the first),
        and the `top` most likely tokens at each position (echo + logprobs)."""
        raise NotImplementedError

    def batch_stats(self) -> tuple[int, int, int] | None:
        """(generations in the running batch, forward passes, generations fed in them) since load;
        None for an engine without forward passes."""
        return None

    def kv_cache_stats(self) -> tuple[int, int, int] | None:
        """(bytes of the running generations' KV cache, positions it spans, of which padding) now;
        None for an engine without a model cache."""
        return None

    def prefix_cache_stats(self) -> tuple[int, int, int, int] | None:
        """(prompt tokens looked up in the prefix cache, found there, bytes it holds, its capacity)
        since load; zeros with prefix caching off, None for an engine without a model cache."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model (shutdown)."""


def _sampling_defaults(generation_config: Any) -> dict[str, Any]:
    """The temperature, top_p and top_k a model's generation_config.json sets (only those it sets:
    a value left at transformers' default is not the model's advice), when the API accepts them."""
    given = generation_config.to_diff_dict()
    defaults: dict[str, Any] = {}
    for key, field_name, kind, valid in (
        ("temperature", "default_temperature", float, lambda v: 0.0 <= v <= 2.0),
        ("top_p", "default_top_p", float, lambda v: 0.0 < v <= 1.0),
        ("top_k", "default_top_k", int, lambda v: v >= 0 and v == int(v)),
    ):
        value = given.get(key)
        if value is None:  # not set (or set to None: transformers' way of turning top_k off)
            continue
        if isinstance(value, int | float) and not isinstance(value, bool) and valid(value):
            defaults[field_name] = kind(value)
        else:
            log.warning(f"generation_config.json's {key} ({value!r}) is outside the API's range; not a default")
    return defaults


def _plain_chat_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """Used when the tokenizer has no chat template."""
    lines = [f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages]
    return "".join(lines) + "Assistant:"


class _TextTracker:
    """Turns a growing token list into text deltas, holding back what may still change.

    Incremental detokenization, as TGI and vLLM do it: a step decodes a window of the output that
    starts one step back, and the new text is the window's text after the text of its tokens
    already consumed. A step's cost does not grow with the output (decoding the whole output at
    every step cost 350 µs a token by the 2,048th, `bench/bench_detokenize.py`), and starting the
    window at earlier tokens keeps tokenizers that drop a leading space at the start of a decode
    (SentencePiece: Llama 2, Mistral, Phi-3) from dropping it between two steps. Tokens whose text
    ends in U+FFFD (a character whose bytes span tokens) or adds nothing (a skipped special token)
    stay unconsumed until a later token completes them; text that could be the start of a stop
    string is held back until it cannot be.
    """

    __slots__ = ("_decode", "_emitted", "_hold", "_prefix", "_read", "_seen", "_stopped", "_stops", "text")

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...]):
        self._decode = decode
        self._stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._prefix = 0  # the decode window's first token
        self._read = 0  # the tokens before this one are in `text`
        self._seen = 0  # tokens passed to `update`
        self._emitted = 0  # characters of `text` handed out
        self._stopped = False
        self.text = ""  # the text of the consumed tokens, cut before a stop string once one appears

    def update(self, ids: list[int]) -> tuple[str, bool]:
        """Returns (new text safe to emit, whether a stop string was reached)."""
        self._seen = len(ids)
        self._consume(ids, final=False)
        if self._stopped:
            return self._take(len(self.text)), True
        return self._take(len(self.text) - self._hold if self._stops else len(self.text)), False

    def finish(self, ids: list[int]) -> str:
        """The rest of the text, once no token follows (of `ids` up to the last `update`'s length:
        a token after it, the end-of-sequence one, is not text)."""
        if not self._stopped:
            self._consume(ids[: self._seen], final=True)
        return self._take(len(self.text))

    def _consume(self, ids: list[int], final: bool) -> None:
        if self._stopped or len(ids) <= self._read:
            return
        before = self._decode(ids[self._prefix : self._read]) if self._read > self._prefix else ""
        window = self._decode(ids[self._prefix :])
        if final:
            window = window.rstrip("\ufffd")
        elif len(window) <= len(before) or window.endswith("\ufffd"):
            return
        start = len(self.text)
        self.text += window[len(before) :]
        self._prefix, self._read = self._read, len(ids)
        # The stop string that ends first ends the text (one may begin in text consumed before).
        ends = []
        for stop in self._stops:
            at = self.text.find(stop, max(0, start - len(stop) + 1))
            if at >= 0:
                ends.append((at + len(stop), at))
        if ends:
            self.text = self.text[: min(ends)[1]]
            self._stopped = True

    def _take(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        delta = self.text[self._emitted : upto]
        self._emitted = upto
        return delta


class TransformersEngine(Engine):
    """Any Hugging Face causal LM (directory or hub id); CUDA when present, else CPU."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()  # HF tokenizers are not safe to share across threads
        self._scheduler: Scheduler | None = None

    def _resolve_source(self) -> str:
        if not self.settings.model:
            raise ValueError("no model to load: set SLM_MODEL (or --model) to a model directory or hub id")
        return self.settings.model

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # progress bars are not JSON lines
        hf_logging.disable_default_handler()  # transformers' messages go through our JSON handler
        hf_logging.enable_propagation()
        source = self._resolve_source()
        requested = self.settings.device
        device = ("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested
        dtype_name = self.settings.dtype
        if dtype_name == "auto":
            if device.startswith("cuda"):
                dtype_name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
            else:
                dtype_name = "float32"
        dtype = getattr(torch, dtype_name)
        kwargs: dict[str, Any] = {
            "revision": self.settings.revision,
            "trust_remote_code": self.settings.trust_remote_code,
        }
        self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        config = self.model.config
        max_context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if not max_context:
            tok_max = getattr(self.tokenizer, "model_max_length", None)
            max_context = tok_max if tok_max and tok_max < 1_000_000 else 2048
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        # transformers 5.x renamed the KV-cache argument and output `past_key_values` → `cache`.
        forward_params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in forward_params
        from slm_server.batching import Scheduler, cache_support
        from slm_server.prefix_cache import PrefixCache

        batch_size = self.settings.max_batch_size or self.settings.max_concurrent_requests
        batching, prefix_cacheable = cache_support(self)
        prefix_cache, prefix_caching = None, "off"
        if self.settings.prefix_cache_mib:
            if batching and batch_size > 1 and prefix_cacheable:
                prefix_cache, prefix_caching = PrefixCache(self.settings.prefix_cache_mib << 20), "on"
            else:
                prefix_caching = "unsupported"
        scheduler = Scheduler(self, batch_size, batching, self.settings.prefill_chunk_tokens, prefix_cache)
        from slm_server.structured import grammar_compiler

        self.grammars = grammar_compiler(self.tokenizer, self.vocab_size, self.eos_ids)
        self.info = ModelInfo(
            name=self.settings.model_name,
            source=source if Path(source).exists() else f"hub:{source}",
            max_context=int(max_context),
            dtype=dtype_name,
            device=str(self.device),
            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
            parameters=sum(p.numel() for p in self.model.parameters()),
            batching="continuous" if scheduler.batching else "one sequence per pass",
            vocab_size=self.vocab_size,
            prefix_caching=prefix_caching,
            structured_output=self.grammars is not None,
            **_sampling_defaults(self.model.generation_config),
        )
        self._scheduler = scheduler

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return list(self.tokenizer.encode(text, add_special_tokens=True))

    def encode_chat(self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        with self._lock:
            if self.info.has_chat_template:
                prompt = self.tokenizer.apply_chat_template(
                    list(messages), tools=list(tools) if tools else None, add_generation_prompt=True, tokenize=False
                )
                return list(self.tokenizer.encode(prompt, add_special_tokens=False))
            return list(self.tokenizer.encode(_plain_chat_prompt(messages), add_special_tokens=True))

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_text: OnText | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        assert self._scheduler is not None, "load() first"
        return self._scheduler.run(prompt_ids, params, on_text, cancel)

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id])

    def score(self, ids: list[int], top: int) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
        import torch

        if not ids:
            return [], []
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float()
            logprobs = torch.log_softmax(logits[:-1], dim=-1)  # position i predicts token i + 1
            chosen = logprobs.gather(1, torch.tensor(ids[1:], device=self.device).unsqueeze(1)).squeeze(1)
            values: list[float | None] = [None, *chosen.tolist()]
            tops: list[list[tuple[int, float]]] = [[]] + [_top(torch, row, top) for row in logprobs]
        return values, tops

    def batch_stats(self) -> tuple[int, int, int] | None:
        scheduler = self._scheduler
        if scheduler is None:
            return None
        return scheduler.running, scheduler.forward_passes, scheduler.generations_fed

    def kv_cache_stats(self) -> tuple[int, int, int] | None:
        scheduler = self._scheduler
        return None if scheduler is None else scheduler.kv_cache_stats()

    def prefix_cache_stats(self) -> tuple[int, int, int, int] | None:
        scheduler = self._scheduler
        if scheduler is None:
            return None
        cache = scheduler.prefix_cache
        if cache is None:
            return 0, 0, 0, 0
        return (*cache.stats(), cache.capacity_bytes)

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None
        self.model = None


class EchoEngine(Engine):
    """A no-op engine: 'generates' the prompt's own words back, instantly, with perplexity 1.

    For benchmarks of the HTTP + monitoring layers (no model cost hides their overhead) and for
    plumbing tests that are about HTTP and metrics only.
    """

    blocking = False

    def __init__(self, settings: Settings | None = None, *, max_context: int = 2048):
        self._name = settings.model_name if settings else "echo"
        self._max_context = max_context

    def load(self) -> None:
        self.info = ModelInfo(
            name=self._name,
            source="echo",
            max_context=self._max_context,
            dtype="none",
            device="cpu",
            has_chat_template=False,
            parameters=0,
        )

    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))

    def encode_chat(self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.encode(" ".join(m["content"] for m in messages))

    def generate(self, prompt_ids, params, on_text=None, cancel=None) -> GenerationResult:
        words = [f"w{i}" for i in prompt_ids[: params.max_tokens]]
        now = time.perf_counter()
        text = " ".join(words)
        ids = list(prompt_ids[: params.max_tokens])
        result = GenerationResult(
            token_ids=ids,
            text=text,
            finish_reason="length" if len(prompt_ids) >= params.max_tokens else "stop",
            prompt_tokens=len(prompt_ids),
            token_times=[now] * len(words),
        )
        if params.logprobs is not None:  # certain of every word: log p = 0
            result.token_logprobs = [0.0] * len(ids)
            result.top_logprobs = [[(i, 0.0)][: params.logprobs] for i in ids]
        if on_text is not None:
            _emit(on_text, text, result, 0)
        return result

    def token_text(self, token_id: int) -> str:
        return f" w{token_id}"

    def score(self, ids: list[int], top: int) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
        return [None] + [0.0] * (len(ids) - 1), [[]] + [[(i, 0.0)][:top] for i in ids[1:]]


def _emit(on_text: OnText, text: str, result: GenerationResult, reported: int) -> int:
    """Pass `text` and the log-probabilities of the tokens after the first `reported` (when they are
    recorded) to `on_text`; returns how many tokens are reported now."""
    upto = len(result.token_ids)
    tokens: list[TokenLogprobs] = []
    if result.token_logprobs is not None and upto > reported:
        tokens = list(
            zip(
                result.token_ids[reported:upto],
                result.token_logprobs[reported:upto],
                result.top_logprobs[reported:upto],  # type: ignore[index]
                strict=True,
            )
        )
    if text or tokens:
        on_text(text, tokens)
    return upto


def _top(torch, logprobs, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    values, indices = torch.topk(logprobs, k)
    return list(zip(indices.tolist(), values.tolist(), strict=True))


def make_engine(settings: Settings) -> Engine:
    return EchoEngine(settings) if settings.engine == "echo" else TransformersEngine(settings)
