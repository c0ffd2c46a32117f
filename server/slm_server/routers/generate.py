"""POST /generate — the seed's endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request

from slm_server.engine import SamplingParams
from slm_server.protocol import ERROR_RESPONSES, GenerateRequest, GenerateResponse, stops
from slm_server.routers.common import encode, record_of, service_of

router = APIRouter(tags=["generate"])
ENDPOINT = "/generate"


@router.post(ENDPOINT, response_model=GenerateResponse, responses=ERROR_RESPONSES, response_model_exclude_none=True)
async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
    """Continue `prompt`; the response carries the token counts and the output's perplexity."""
    service = service_of(request)
    service.check_ready()
    service.check_model(body.model)
    record = record_of(request)
    prompt_ids = await encode(service, body.prompt)
    max_tokens = service.resolve_max_tokens(len(prompt_ids), body.max_tokens)
    params = SamplingParams(max_tokens, body.temperature, body.top_p, stops(body.stop), body.seed)
    job = service.new_job(
        endpoint=ENDPOINT, operation="text_completion", prompt_ids=prompt_ids, params=params, record=record
    )
    result = await service.complete(job)
    return GenerateResponse(
        id=record.request_id,
        model=service.model_name,
        text=result.text,
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        output_tokens=result.output_tokens,
        perplexity=result.perplexity,
        time_to_first_token_seconds=(result.token_times[0] - record.start) if result.token_times else None,
        token_ids=result.token_ids if body.return_token_ids else None,
    )
