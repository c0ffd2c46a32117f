"""OpenAI-compatible POST /v1/completions and POST /v1/chat/completions, with SSE streaming."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from slm_server.engine import GenerationResult, SamplingParams
from slm_server.errors import ServerError, error_body
from slm_server.protocol import (
    ERROR_RESPONSES,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    stops,
)
from slm_server.routers.common import encode, record_of, service_of
from slm_server.service import GenerationService, Job

router = APIRouter(tags=["openai"])

_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events when stream=true"}
}


def _openai_finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _usage(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.output_tokens,
        total_tokens=result.prompt_tokens + result.output_tokens,
    )


def _sse(doc: dict[str, Any]) -> str:
    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"


async def _stream(
    events: AsyncIterator[tuple[str, GenerationResult | None]],
    chunk: Callable[[dict[str, Any] | None, str | None], dict[str, Any]],
    first_delta: dict[str, Any] | None,
    delta_of: Callable[[str], dict[str, Any]],
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE frames: deltas, a last frame with the finish reason, usage if asked, then [DONE].
    An error after the headers went out becomes an `error` event (the OpenAI clients raise it)."""
    try:
        if first_delta is not None:
            yield _sse(chunk(first_delta, None))
        async for text, result in events:
            if result is None:
                yield _sse(chunk(delta_of(text), None))
                continue
            yield _sse(chunk({} if first_delta is not None else delta_of(""), _openai_finish(result.finish_reason)))
            if include_usage:
                doc = chunk(None, None)
                doc["choices"] = []
                doc["usage"] = _usage(result).model_dump()
                yield _sse(doc)
    except ServerError as exc:
        yield _sse(error_body(exc.status, exc.message, exc.type))
    yield "data: [DONE]\n\n"


async def _prepare(
    service: GenerationService,
    request: Request,
    endpoint: str,
    operation: str,
    body,
    prompt_ids: list[int],
    max_tokens: int | None,
) -> Job:
    limit = service.resolve_max_tokens(
        len(prompt_ids),
        max_tokens,
        "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens",
    )
    params = SamplingParams(limit, body.temperature, body.top_p, stops(body.stop), body.seed)
    return service.new_job(
        endpoint=endpoint,
        operation=operation,
        prompt_ids=prompt_ids,
        params=params,
        record=record_of(request),
        stream=body.stream,
    )


@router.post("/v1/completions", response_model=CompletionResponse, responses={**ERROR_RESPONSES, **_STREAM_DOC})
async def completions(body: CompletionRequest, request: Request):
    service = service_of(request)
    service.check_ready()
    service.check_model(body.model)
    prompt_ids = await encode(service, body.prompt_text)
    job = await _prepare(service, request, "/v1/completions", "text_completion", body, prompt_ids, body.max_tokens)
    response_id = f"cmpl-{job.record.request_id}"
    created = int(time.time())
    if body.stream:
        events = await service.start_stream(job)

        def chunk(delta: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
            text = (delta or {}).get("text", "")
            return {
                "id": response_id,
                "object": "text_completion",
                "created": created,
                "model": service.model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = _stream(events, chunk, None, lambda t: {"text": t}, include_usage)
        return StreamingResponse(frames, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    result = await service.complete(job)
    return CompletionResponse(
        id=response_id,
        created=created,
        model=service.model_name,
        choices=[CompletionChoice(text=result.text, finish_reason=_openai_finish(result.finish_reason))],
        usage=_usage(result),
    )


@router.post(
    "/v1/chat/completions", response_model=ChatCompletionResponse, responses={**ERROR_RESPONSES, **_STREAM_DOC}
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """The messages go through the tokenizer's chat template (a plain `Role: text` layout without one)."""
    service = service_of(request)
    service.check_ready()
    service.check_model(body.model)
    messages = [{"role": m.role, "content": m.text} for m in body.messages]
    prompt_ids = service.engine.encode_chat(messages)
    job = await _prepare(service, request, "/v1/chat/completions", "chat", body, prompt_ids, body.token_limit)
    response_id = f"chatcmpl-{job.record.request_id}"
    created = int(time.time())
    if body.stream:
        events = await service.start_stream(job)

        def chunk(delta: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
            return {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": service.model_name,
                "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}],
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = _stream(events, chunk, {"role": "assistant", "content": ""}, lambda t: {"content": t}, include_usage)
        return StreamingResponse(frames, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    result = await service.complete(job)
    return ChatCompletionResponse(
        id=response_id,
        created=created,
        model=service.model_name,
        choices=[
            ChatChoice(
                message=AssistantMessage(content=result.text), finish_reason=_openai_finish(result.finish_reason)
            )
        ],
        usage=_usage(result),
    )
