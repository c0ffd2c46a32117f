"""POST /generate — the seed's route, translated for a runtime that has only OpenAI's.

The request is checked against the built-in server's own model (slm_server.protocol.GenerateRequest: the
same 422 for the same mistakes), sent to the runtime's /v1/completions with the sampled tokens'
log-probabilities asked for, and the reply is the built-in server's GenerateResponse: text, finish reason,
token counts and the output's perplexity. Streamed: `{"text": …}` events as the runtime's chunks come, one
event with the whole response, then `[DONE]`. `return_token_ids` is accepted; the ids are left out (the
runtimes' OpenAI routes do not all give them).
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError

from slm_server.errors import InvalidInput, ServerError
from slm_server.protocol import GenerateRequest, GenerateResponse
from slm_server.service.jobs import RequestRecord
from slm_sidecar.replies import (
    ADDED_COMPLETION_LOGPROBS,
    GENERATE,
    Plan,
    ProxiedResult,
    degrade,
    output_format,
    sampling_of,
)
from slm_sidecar.settings import SidecarSettings

# Fields of GenerateRequest that /v1/completions takes under the same name (vLLM's extensions included).
_SAME = (
    "prompt", "temperature", "top_p", "top_k", "stop", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "min_p", "logit_bias", "response_format", "structured_outputs", "min_tokens", "ignore_eos",
)  # fmt: skip


def plan(raw: bytes, settings: SidecarSettings, *, degraded: bool = False) -> Plan | ServerError:
    """The /v1/completions request for a /generate body, or the error the built-in server would answer."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _unprocessable(f"body: the request body is not JSON ({exc})", "body")
    try:
        GenerateRequest.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "body"
        return _unprocessable("; ".join(_message(e) for e in exc.errors()), field)
    body: dict[str, Any] = {"model": doc.get("model") or settings.model_name}
    body.update({key: doc[key] for key in _SAME if doc.get(key) is not None})
    max_tokens = doc.get("max_tokens", doc.get("max_new_tokens"))
    body["max_tokens"] = max_tokens if max_tokens is not None else settings.default_max_tokens
    stream = doc.get("stream") is True
    if stream:
        body["stream"] = True
    if settings.quality_logprobs:
        body["logprobs"] = ADDED_COMPLETION_LOGPROBS
    params = sampling_of(body)
    if degraded:
        degrade(body, settings.runtime)
    return Plan(
        GENERATE,
        "text_completion",
        orjson.dumps(body),
        stream,
        1,
        params,
        output_format(body),
        added_logprobs=settings.quality_logprobs,
    )


def response(record: RequestRecord, model: str, results: list[ProxiedResult], plan: Plan) -> dict[str, Any]:
    """The built-in server's GenerateResponse, from the runtime's reply."""
    result = results[0] if results else ProxiedResult([], "", "error", 0, count=0, logprobs_known=False)
    return GenerateResponse(
        id=record.request_id,
        model=model,
        text=result.text,
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        cached_prompt_tokens=result.cached_tokens,
        output_tokens=result.output_tokens,
        perplexity=result.perplexity,
        time_to_first_token_seconds=(result.token_times[0] - record.start) if result.token_times else None,
    ).model_dump(exclude_none=True)


def _message(error: Any) -> str:
    field = ".".join(str(p) for p in error.get("loc", ())) or "body"
    return f"{field}: {error.get('msg', 'invalid')}"


def _unprocessable(message: str, field: str) -> ServerError:
    error = InvalidInput(message, param=field)
    error.status = 422
    return error
