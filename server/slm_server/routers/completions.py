"""OpenAI-compatible POST /v1/completions and POST /v1/chat/completions, with SSE streaming."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from slm_server import tool_calls
from slm_server.errors import InvalidInput, ServerError, error_body
from slm_server.generation.structured import OutputGrammar
from slm_server.generation.types import Engine, GenerationResult, PromptToken, SamplingParams, TokenLogprobs
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
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
    stops,
)
from slm_server.routers.common import disconnected, record_of, service_of, sse
from slm_server.service.jobs import Job
from slm_server.service.serving import GenerationService
from slm_server.service.streaming import ChoiceEvent

router = APIRouter(tags=["openai"])

_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events when stream=true"}
}


def _openai_finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _usage(results: list[GenerationResult]) -> Usage:
    """The prompt once, the completion tokens of every choice (as OpenAI counts n > 1); the prompt's
    cached tokens as the choice that found the most of it in the prefix cache."""
    completion = sum(r.output_tokens for r in results)
    prompt = results[0].prompt_tokens if results else 0
    cached = max((r.cached_tokens for r in results), default=0)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


# A streamed chunk of one choice: (index, text, its tokens' log-probabilities, finish reason or None);
# None to send nothing for it.
Frame = Callable[[int, str, list[TokenLogprobs], str | None], dict[str, Any] | None]
# The chunks that end a choice, from its result (instead of the frame with its finish reason).
Finish = Callable[[int, GenerationResult], list[dict[str, Any]]]


async def _stream(
    events: AsyncIterator[ChoiceEvent],
    frame: Frame,
    first: Callable[[int], dict[str, Any]] | None,
    n: int,
    usage: Callable[[Usage], dict[str, Any]] | None,
    finish: Finish | None = None,
) -> AsyncIterator[str]:
    """SSE frames: `first` for each choice, the choices' deltas as they come, a frame with each
    choice's finish reason (or `finish`'s frames), usage if asked, then [DONE]. An error after the
    headers went out becomes an `error` event (the OpenAI clients raise it)."""
    try:
        if first is not None:
            for index in range(n):
                yield sse(first(index))
        results = []
        async for index, text, tokens, result in events:
            if result is None:
                doc = frame(index, text, tokens, None)
                if doc is not None:
                    yield sse(doc)
                continue
            results.append(result)
            if finish is not None:
                docs = finish(index, result)
            else:
                last = frame(index, "", [], _openai_finish(result.finish_reason))
                docs = [last] if last is not None else []
            for doc in docs:
                yield sse(doc)
        if usage is not None:
            yield sse(usage(_usage(results)))
    except ServerError as exc:
        yield sse(error_body(exc.status, exc.message, exc.type))
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
    tool_plan: tool_calls.ToolPlan | None = None,
) -> list[Job]:
    """The request's jobs; a tool plan's schema holds the output instead of a response_format's. The
    grammar is compiled last, once the cheaper checks have passed."""
    record = record_of(request)
    service.check_choices(body.n)
    limit = service.resolve_max_tokens(
        len(prompt_ids),
        max_tokens,
        "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens",
    )
    grammar: OutputGrammar | None = None
    if tool_plan is not None:
        grammar = await service.output_grammar(tool_calls.FORMAT, tool_plan.schema, "tools", record)
    params = SamplingParams(
        limit, stop=stops(body.stop), seed=body.seed, logprobs=logprobs, **(await service.sampling(body, record))
    )
    if grammar is not None:
        params.grammar = grammar
    return service.new_jobs(
        body.n,
        endpoint=endpoint,
        operation=operation,
        prompt_ids=prompt_ids,
        params=params,
        record=record,
        stream=body.stream,
    )


def _completion_logprobs(
    engine: Engine, entries: Sequence[TokenLogprobs | PromptToken], top: int, offset: int = 0
) -> CompletionLogprobs:
    """OpenAI's legacy shape; `offset` is where the first token's text starts in the choice's text."""
    tokens = [engine.token_text(token_id) for token_id, _, _ in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    top_dicts = [{engine.token_text(i): v for i, v in alternatives} or None for _, _, alternatives in entries]
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[value for _, value, _ in entries],
        top_logprobs=top_dicts if top else None,
        text_offset=offsets,
    )


def _chat_logprobs(engine: Engine, entries: list[TokenLogprobs]) -> ChatLogprobs:
    def entry(token_id: int, value: float) -> TopLogprob:
        text = engine.token_text(token_id)
        return TopLogprob(token=text, logprob=value, bytes=list(text.encode()))

    content = []
    for token_id, value, alternatives in entries:
        chosen = entry(token_id, value)
        content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=[entry(i, v) for i, v in alternatives]))
    return ChatLogprobs(content=content)


def _usage_frame(base: dict[str, Any]) -> Callable[[Usage], dict[str, Any]]:
    return lambda usage: {**base, "choices": [], "usage": usage.model_dump()}


@router.post("/v1/completions", response_model=CompletionResponse, responses={**ERROR_RESPONSES, **_STREAM_DOC})
async def completions(body: CompletionRequest, request: Request):
    """OpenAI's legacy completions: continue the prompt (text or token ids)."""
    service = service_of(request)
    service.check_ready()
    service.check_model(body.model)
    text, prompt_ids = body.prompt_text, body.prompt_token_ids
    if prompt_ids is None:
        assert text is not None
        prompt_ids = await service.encode(text, record_of(request))
    else:
        service.check_token_ids(prompt_ids, "prompt")
        if body.echo:
            text = await service.prepare(service.deadline(record_of(request)), service.engine.decode, prompt_ids)
    jobs = await _prepare(
        service,
        request,
        "/v1/completions",
        "text_completion",
        body,
        prompt_ids,
        body.max_tokens,
        logprobs=body.logprobs,
    )
    response_id, created = f"cmpl-{jobs[0].request_id}", int(time.time())
    base = {"id": response_id, "object": "text_completion", "created": created, "model": service.model_name}
    echoed = (text or "") if body.echo else ""
    top = body.logprobs
    # echo + logprobs: the prompt's tokens and log-probabilities, scored before the choices generate
    # (streamed, they go out first), once for all of them.
    prompt = await service.score_prompt(jobs[0], top) if body.echo and top is not None else []
    if body.stream:
        echo_logprobs = None
        if prompt and top is not None:
            echo_logprobs = await asyncio.to_thread(_completion_logprobs, service.engine, prompt, top)
        events = await service.start_streams(jobs)
        # Where each choice's next token starts in its text: after the prompt's tokens when they were
        # scored (as in the unstreamed response), else after the echoed prompt.
        end = len(echoed)
        if echo_logprobs is not None and echo_logprobs.tokens:
            end = echo_logprobs.text_offset[-1] + len(echo_logprobs.tokens[-1])
        offsets = [end] * body.n

        def frame(index: int, text: str, tokens: list[TokenLogprobs], finish: str | None) -> dict[str, Any]:
            doc = None
            if top is not None and tokens:
                logprobs = _completion_logprobs(service.engine, tokens, top, offsets[index])
                offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                doc = logprobs.model_dump()
            return {**base, "choices": [{"index": index, "text": text, "logprobs": doc, "finish_reason": finish}]}

        def first(index: int) -> dict[str, Any]:
            doc = frame(index, echoed, [], None)
            if echo_logprobs is not None:
                doc["choices"][0]["logprobs"] = echo_logprobs.model_dump()
            return doc

        usage = _usage_frame(base) if body.stream_options and body.stream_options.include_usage else None
        frames = _stream(events, frame, first if echoed else None, body.n, usage)
        return StreamingResponse(frames, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    results = await service.complete_all(jobs, disconnected(request))

    def choices() -> list[CompletionChoice]:  # with logprobs: one decode per token, so off the event loop
        return [
            CompletionChoice(
                index=index,
                text=echoed + result.text,
                logprobs=None
                if top is None
                else _completion_logprobs(service.engine, [*prompt, *result.logprob_entries()], top),
                finish_reason=_openai_finish(result.finish_reason),
            )
            for index, result in enumerate(results)
        ]

    return CompletionResponse(
        id=response_id,
        created=created,
        model=service.model_name,
        choices=await asyncio.to_thread(choices) if top is not None else choices(),
        usage=_usage(results),
    )


@router.post(
    "/v1/chat/completions", response_model=ChatCompletionResponse, responses={**ERROR_RESPONSES, **_STREAM_DOC}
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """The messages go through the tokenizer's chat template (a plain `Role: text` layout without one)."""
    service = service_of(request)
    service.check_ready()
    service.check_model(body.model)
    tool_plan = tool_calls.plan(body.tools, body.tool_choice, body.parallel_tool_calls)
    tools = None
    if tool_plan is not None:
        if body.structured_outputs is not None or (
            body.response_format is not None and body.response_format.type != "text"
        ):
            raise InvalidInput(
                "tool_choice and a response_format or structured_outputs both say what the output must be: give one",
                param="tool_choice",
            )
        tools = body.tools
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidInput("top_logprobs needs logprobs=true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    prompt_ids = await service.encode_chat(body.messages, tools, record_of(request))
    jobs = await _prepare(
        service, request, "/v1/chat/completions", "chat", body, prompt_ids, body.token_limit, logprobs, tool_plan
    )

    def reply(result: GenerationResult) -> tuple[AssistantMessage, str]:
        """The message and finish reason of a choice: its tool calls when it made whole ones."""
        calls = tool_calls.calls_of(tool_plan, result) if tool_plan is not None else None
        if calls:
            return AssistantMessage(content=None, tool_calls=calls), "tool_calls"
        return AssistantMessage(content=result.text), _openai_finish(result.finish_reason)

    response_id, created = f"chatcmpl-{jobs[0].request_id}", int(time.time())
    if body.stream:
        events = await service.start_streams(jobs)
        base = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": service.model_name}

        def frame(index: int, text: str, tokens: list[TokenLogprobs], finish: str | None) -> dict[str, Any] | None:
            if tool_plan is not None:
                return None  # a call goes out whole, once it is (`ended`)
            delta = {} if finish else {"content": text}
            chunk_logprobs = _chat_logprobs(service.engine, tokens).model_dump() if logprobs is not None else None
            choice = {"index": index, "delta": delta, "logprobs": chunk_logprobs, "finish_reason": finish}
            return {**base, "choices": [choice]}

        def ended(index: int, result: GenerationResult) -> list[dict[str, Any]]:
            """A tool-call choice's last chunks: its calls whole (or its text, cut short), with the
            log-probabilities of all its tokens when asked, then its finish reason."""
            message, reason = reply(result)
            if message.tool_calls is not None:
                calls = [{"index": i, **call.model_dump()} for i, call in enumerate(message.tool_calls)]
                delta: dict[str, Any] = {"tool_calls": calls}
            else:
                delta = {"content": message.content}
            chosen = None
            if logprobs is not None:
                chosen = _chat_logprobs(service.engine, result.logprob_entries()).model_dump()
            whole = {"index": index, "delta": delta, "logprobs": chosen, "finish_reason": None}
            last = {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
            return [{**base, "choices": [whole]}, {**base, "choices": [last]}]

        def first(index: int) -> dict[str, Any]:
            choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
            return {**base, "choices": [{**choice, "finish_reason": None}]}

        usage = _usage_frame(base) if body.stream_options and body.stream_options.include_usage else None
        frames = _stream(events, frame, first, body.n, usage, ended if tool_plan is not None else None)
        return StreamingResponse(frames, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    results = await service.complete_all(jobs, disconnected(request))

    def choices() -> list[ChatChoice]:
        made = []
        for index, result in enumerate(results):
            message, reason = reply(result)
            chosen = _chat_logprobs(service.engine, result.logprob_entries()) if logprobs is not None else None
            made.append(ChatChoice(index=index, message=message, logprobs=chosen, finish_reason=reason))
        return made

    return ChatCompletionResponse(
        id=response_id,
        created=created,
        model=service.model_name,
        choices=await asyncio.to_thread(choices) if logprobs is not None else choices(),
        usage=_usage(results),
    )
