"""`EchoEngine`: a no-op engine (it echoes the prompt's words) for benchmarking the HTTP and monitoring
layers without a model; the tests use it only for pure HTTP and metrics plumbing."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from slm_server.generation.detokenize import emit
from slm_server.generation.types import (
    Alternative,
    Engine,
    GenerationResult,
    ModelInfo,
    OnText,
    PromptScores,
    SamplingParams,
)
from slm_server.settings import Settings


class EchoEngine(Engine):
    """'Generates' the prompt's own words back, instantly, with perplexity 1."""

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

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_text: OnText | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
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
            result.top_logprobs = [[Alternative(i, 0.0)][: params.logprobs] for i in ids]
        if on_text is not None:
            emit(on_text, text, result, 0)
        return result

    def token_text(self, token_id: int) -> str:
        return f" w{token_id}"

    def score(self, ids: list[int], top: int) -> PromptScores:
        return PromptScores([None] + [0.0] * (len(ids) - 1), [[]] + [[Alternative(i, 0.0)][:top] for i in ids[1:]])
