"""OpenAI-compatible POST /v1/completions and POST /v1/chat/completions, with SSE streaming."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from slm_server.engine import Engine, GenerationResult, SamplingParams
from slm_server.errors import InvalidInput, ServerError, error_body
from slm_server.protocol import (
    ERROR_RESPONSES,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    TokenLogprob,
    TopLogprob,
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
    logprobs: int | None = None,
    score_prompt: int | None = None,
) -> Job:
    limit = service.resolve_max_tokens(
        len(prompt_ids),
        max_tokens,
        "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens",
    )
    if logprobs is not None and body.stream:
        raise InvalidInput("logprobs are not supported with stream=true; ask without streaming", param="logprobs")
    params = SamplingParams(limit, body.temperature, body.top_p, stops(body.stop), body.seed, logprobs=logprobs)
    return service.new_job(
        endpoint=endpoint,
        operation=operation,
        prompt_ids=prompt_ids,
        params=params,
        record=record_of(request),
        stream=body.stream,
        score_prompt=score_prompt,
    )


def _completion_logprobs(
    engine: Engine, result: GenerationResult, prompt_ids: list[int] | None, top: int
) -> CompletionLogprobs:
    """OpenAI's legacy shape; with echo (prompt_ids given) the prompt's tokens come first."""
    ids: list[int] = []
    values: list[float | None] = []
    tops: list[list[tuple[int, float]]] = []
    if prompt_ids is not None:
        ids += prompt_ids
        values += result.prompt_logprobs or []
        tops += result.prompt_top_logprobs or []
    ids += result.token_ids
    values += result.token_logprobs or []
    tops += result.top_logprobs or []
    tokens = [engine.token_text(i) for i in ids]
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    top_dicts = [{engine.token_text(i): v for i, v in alternatives} or None for alternatives in tops] if top else None
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=top_dicts, text_offset=offsets)


def _chat_logprobs(engine: Engine, result: GenerationResult) -> ChatLogprobs:
    def entry(token_id: int, value: float) -> TopLogprob:
        text = engine.token_text(token_id)
        return TopLogprob(token=text, logprob=value, bytes=list(text.encode()))

    content = []
    for token_id, value, alternatives in zip(
        result.token_ids, result.token_logprobs or [], result.top_logprobs or [], strict=True
    ):
        chosen = entry(token_id, value)
        content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=[entry(i, v) for i, v in alternatives]))
    return ChatLogprobs(content=content)


@router.post("/v1/completions", response_model=CompletionResponse, responses={**ERROR_RESPONSES, **_STREAM_DOC})
async def completions(body: CompletionRequest, request: Request):
    service = service_of(request)
    service.check_ready()
    service.check_model(body.model)
    prompt_ids = await encode(service, body.prompt_text)
    job = await _prepare(
        service,
        request,
        "/v1/completions",
        "text_completion",
        body,
        prompt_ids,
        body.max_tokens,
        logprobs=body.logprobs,
        score_prompt=body.logprobs if body.echo and body.logprobs is not None else None,
    )
    response_id = f"cmpl-{job.record.request_id}"
    created = int(time.time())
    echoed = body.prompt_text if body.echo else ""
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
        first = {"text": echoed} if echoed else None
        frames = _stream(events, chunk, first, lambda t: {"text": t}, include_usage)
        return StreamingResponse(frames, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    result = await service.complete(job)
    logprobs = None
    if body.logprobs is not None:  # token texts: one decode per token, off the event loop
        prompt = prompt_ids if body.echo else None
        logprobs = await asyncio.to_thread(_completion_logprobs, service.engine, result, prompt, body.logprobs)
    choice = CompletionChoice(
        text=echoed + result.text, logprobs=logprobs, finish_reason=_openai_finish(result.finish_reason)
    )
    return CompletionResponse(
        id=response_id, created=created, model=service.model_name, choices=[choice], usage=_usage(result)
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
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidInput("top_logprobs needs logprobs=true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    job = await _prepare(
        service, request, "/v1/chat/completions", "chat", body, prompt_ids, body.token_limit, logprobs=logprobs
    )
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
    chat_logprobs = await asyncio.to_thread(_chat_logprobs, service.engine, result) if body.logprobs else None
    choice = ChatChoice(
        message=AssistantMessage(content=result.text),
        logprobs=chat_logprobs,
        finish_reason=_openai_finish(result.finish_reason),
    )
    return ChatCompletionResponse(
        id=response_id, created=created, model=service.model_name, choices=[choice], usage=_usage(result)
    )
