"""`TransformersEngine`: any Hugging Face causal LM (a directory or a hub id); CUDA when present, else CPU.

It runs its own sampling loop (not `model.generate`) because the loop is where the monitoring
signals are born: each generated token's log-probability under the model (summed into the
request's perplexity — no second forward pass), each token's timestamp (time to first token,
inter-token latency), and text deltas for streaming. The loop itself is the scheduler
(slm_server.generation.scheduler): one thread that runs every generation in flight in the same
forward passes (continuous batching). `generate` blocks its caller (the service's worker thread)
until the generation ends; the service can stop it between two tokens (`cancel`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import torch

from slm_server.generation.prefix_cache import PrefixCache
from slm_server.generation.sampling import top_alternatives
from slm_server.generation.scheduler import ForwardOutput, Scheduler, cache_support
from slm_server.generation.structured import grammar_compiler
from slm_server.generation.types import (
    BatchStats,
    Engine,
    GenerationResult,
    KVCacheStats,
    ModelInfo,
    OnText,
    PrefixCacheStats,
    PromptError,
    PromptScores,
    SamplingParams,
)
from slm_server.settings import Settings

log = logging.getLogger("slm_server.engine")


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


class TransformersEngine(Engine):
    """Any Hugging Face causal LM (directory or hub id); CUDA when present, else CPU."""

    # What the scheduler reads (slm_server.generation.scheduler.BatchableModel), set by `load`.
    device: torch.device
    eos_ids: frozenset[int]
    vocab_size: int
    model: Any  # the transformers model (None once closed)

    def __init__(self, settings: Settings):
        self.settings = settings
        # Held around the tokenizer's use by a slow (Python) tokenizer only; see `load` for a fast one.
        self._lock: contextlib.AbstractContextManager[Any] = threading.Lock()
        self._scheduler: Scheduler | None = None
        self._cache_arg = "past_key_values"
        self._logits_to_keep = False
        self._takes_padding = False
        self._backend: Any = None  # a fast tokenizer's Rust tokenizer

    def _resolve_source(self) -> str:
        if not self.settings.model:
            raise ValueError("no model to load: set SLM_MODEL (or --model) to a model directory or hub id")
        return self.settings.model

    def load(self) -> None:
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
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # A fast tokenizer is shared by the threads that use it (the event loop, the preparation
            # threads, the scheduler's detokenizing) without a lock: a long prompt tokenized in one must
            # not stall the others. Sharing fails only while a call changes the tokenizer ("Already
            # borrowed", huggingface/tokenizers#537), and transformers changes its truncation and
            # padding only when they differ from what a call asks: none, as they are set now, once.
            backend.no_truncation()
            backend.no_padding()
            self._lock = contextlib.nullcontext()
        self._backend = backend
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
        self._takes_padding = "attention_mask" in forward_params and "position_ids" in forward_params
        self._max_context = int(max_context)
        batch_size = self.settings.max_batch_size or self.settings.max_concurrent_requests
        batching, prefix_cacheable = cache_support(self)
        prefix_cache, prefix_caching = None, "off"
        if self.settings.prefix_cache_mib:
            if batching and batch_size > 1 and prefix_cacheable:
                prefix_cache, prefix_caching = PrefixCache(self.settings.prefix_cache_mib << 20), "on"
            else:
                prefix_caching = "unsupported"
        scheduler = Scheduler(self, batch_size, batching, self.settings.prefill_chunk_tokens, prefix_cache)
        self.grammars = grammar_compiler(self.tokenizer, self.vocab_size, self.eos_ids)
        self.info = ModelInfo(
            name=self.settings.model_name,
            source=source if Path(source).exists() else f"hub:{source}",
            max_context=self._max_context,
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

    # --- the model, as the scheduler uses it (BatchableModel) ----------------------------------------------
    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def takes_padding(self) -> bool:
        return self._takes_padding

    def forward(self, input_ids: torch.Tensor, cache: Any, **inputs: torch.Tensor) -> ForwardOutput:
        device = self.device
        kwargs: dict[str, Any] = {"use_cache": True, self._cache_arg: cache}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1  # only the last position's logits are needed
        out = self.model(input_ids=input_ids.to(device), **{k: v.to(device) for k, v in inputs.items()}, **kwargs)
        return ForwardOutput(out.logits, getattr(out, self._cache_arg))

    @property
    def scheduler(self) -> Scheduler:
        """The generation loop (tests and benchmarks watch it: what waits, what is prefilled)."""
        assert self._scheduler is not None, "load() first"
        return self._scheduler

    # --- the service's side (Engine) -----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        with self._lock:
            return self._tokens(text, True, "prompt")

    def encode_chat(self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        with self._lock:
            if not self.info.has_chat_template:
                return self._tokens(_plain_chat_prompt(messages), True, "messages")
            try:
                prompt = self.tokenizer.apply_chat_template(
                    list(messages), tools=list(tools) if tools else None, add_generation_prompt=True, tokenize=False
                )
            except jinja2.TemplateError as exc:  # the template's own checks (roles that must alternate …)
                raise PromptError(f"messages: the model's chat template refused them: {exc}", "messages") from None
            return self._tokens(str(prompt), False, "messages")

    def _tokens(self, text: str, special: bool, param: str) -> list[int]:
        try:
            if self._backend is not None:
                # The Rust tokenizer itself, as transformers' encode calls it, without the lists and
                # dicts transformers makes of its output (a megabyte prompt: ~500,000 ids each, made
                # while holding the GIL). The tokenizing itself lets other threads run.
                return self._backend.encode_batch([text], add_special_tokens=special)[0].ids
            return list(self.tokenizer.encode(text, add_special_tokens=special))
        except (UnicodeError, TypeError) as exc:  # text the tokenizer refuses (the API checks for lone surrogates)
            raise PromptError(f"{param}: the tokenizer refused the text: {exc}", param) from None

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

    def score(self, ids: list[int], top: int) -> PromptScores:
        if not ids:
            return PromptScores([], [])
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float()
            logprobs = torch.log_softmax(logits[:-1], dim=-1)  # position i predicts token i + 1
            chosen = logprobs.gather(1, torch.tensor(ids[1:], device=self.device).unsqueeze(1)).squeeze(1)
            values: list[float | None] = [None, *chosen.tolist()]
            tops = [[], *(top_alternatives(row, top) for row in logprobs)]
        return PromptScores(values, tops)

    def batch_stats(self) -> BatchStats | None:
        scheduler = self._scheduler
        return None if scheduler is None else scheduler.batch_stats()

    def kv_cache_stats(self) -> KVCacheStats | None:
        scheduler = self._scheduler
        return None if scheduler is None else scheduler.kv_cache_stats()

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        scheduler = self._scheduler
        if scheduler is None:
            return None
        cache = scheduler.prefix_cache
        if cache is None:
            return PrefixCacheStats(0, 0, 0, 0)
        queried, hits, held = cache.stats()
        return PrefixCacheStats(queried, hits, held, cache.capacity_bytes)

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None
        self.model = None
