"""POST /tokenize and POST /detokenize (vLLM's): the prompt's tokens as a generation would count
them, so a client can check a prompt against the context before it sends it."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from slm_server import tool_calls
from slm_server.protocol import (
    ERROR_RESPONSES,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChat,
    TokenizeResponse,
    TokenizeText,
)
from slm_server.routers.common import encode, service_of

router = APIRouter(tags=["tokens"])
_ERRORS: dict[int | str, dict[str, Any]] = {code: ERROR_RESPONSES[code] for code in (400, 404, 413, 422, 503)}


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(body: TokenizeText | TokenizeChat, request: Request) -> TokenizeResponse:
    """The token ids of a prompt (`prompt`) or of a chat (`messages`), as the generation routes make them."""
    service = service_of(request)
    service.check_ready()
    service.check_model(body.model)
    if isinstance(body, TokenizeText):
        ids = await encode(service, body.prompt)
    else:
        messages = tool_calls.template_messages(body.messages)
        ids = await asyncio.to_thread(service.engine.encode_chat, messages, tool_calls.template_tools(body.tools))
    return TokenizeResponse(count=len(ids), max_model_len=service.engine.info.max_context, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of token ids (special tokens left out, as generated text is)."""
    service = service_of(request)
    service.check_ready()
    service.check_model(body.model)
    service.check_token_ids(body.tokens, "tokens")
    return DetokenizeResponse(prompt=await asyncio.to_thread(service.engine.decode, body.tokens))
