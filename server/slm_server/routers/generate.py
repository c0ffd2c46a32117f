"""POST /generate — the seed's endpoint, with optional server-sent-event streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from slm_server.errors import ServerError, error_body
from slm_server.generation.types import GenerationResult, SamplingParams
from slm_server.protocol import ERROR_RESPONSES, GenerateRequest, GenerateResponse, stops
from slm_server.routers.common import disconnected, record_of, service_of, sse
from slm_server.service.jobs import RequestRecord
from slm_server.service.streaming import StreamEvent

router = APIRouter(tags=["generate"])
ENDPOINT = "/generate"

_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": 'With `stream: true`: `text/event-stream`, `data: {"text": ...}` events, one event with '
        "the whole GenerateResponse, then `data: [DONE]`. An error after the first byte is an `error` event.",
        "content": {"text/event-stream": {}},
    }
}


def _response(record: RequestRecord, model: str, result: GenerationResult, with_ids: bool) -> GenerateResponse:
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
        token_ids=result.token_ids if with_ids else None,
    )


async def _frames(events: AsyncIterator[StreamEvent], last: Any) -> AsyncIterator[str]:
    try:
        async for text, _, result in events:
            if result is None:
                yield sse({"text": text})
            else:
                yield sse(last(result).model_dump(exclude_none=True))
    except ServerError as exc:
        yield sse(error_body(exc.status, exc.message, exc.type))
    yield "data: [DONE]\n\n"


@router.post(
    ENDPOINT,
    response_model=GenerateResponse,
    responses={**ERROR_RESPONSES, **_STREAM_DOC},
    response_model_exclude_none=True,
)
async def generate(body: GenerateRequest, request: Request):
    """Continue `prompt`; the response carries the token counts and the output's perplexity."""
    service = service_of(request)
    service.check_ready()
    service.check_model(body.model)
    record = record_of(request)
    prompt_ids = await service.encode(body.prompt, record)
    max_tokens = service.resolve_max_tokens(len(prompt_ids), body.max_tokens)
    params = SamplingParams(max_tokens, stop=stops(body.stop), seed=body.seed, **(await service.sampling(body, record)))
    (job,) = service.new_jobs(
        1,
        endpoint=ENDPOINT,
        operation="text_completion",
        prompt_ids=prompt_ids,
        params=params,
        record=record,
        stream=body.stream,
    )
    if body.stream:
        events = await service.start_stream(job)  # admission errors are still plain HTTP errors here

        def last(result: GenerationResult) -> GenerateResponse:
            return _response(record, service.model_name, result, body.return_token_ids)

        return StreamingResponse(
            _frames(events, last), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    (result,) = await service.complete_all([job], disconnected(request))
    return _response(record, service.model_name, result, body.return_token_ids)
