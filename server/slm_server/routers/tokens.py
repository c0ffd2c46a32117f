"""POST /tokenize and POST /detokenize (vLLM's): the prompt's tokens as a generation would count
them, so a client can check a prompt against the context before it sends it."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from slm_server.errors import InvalidInput
from slm_server.protocol import (
    ERROR_RESPONSES,
    DetokenizeRequest,
    DetokenizeResponse,
    TextPart,
    TokenizeChat,
    TokenizeResponse,
    TokenizeText,
)
from slm_server.routers.common import record_of, service_of

router = APIRouter(tags=["tokens"])
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: ERROR_RESPONSES[code] for code in (400, 404, 408, 413, 422, 429, 503, 504)
}
# Responses with more token ids than this are made into JSON in a preparation thread (a megabyte
# prompt is ~500,000 ids: tens of milliseconds the event loop would stall).
_INLINE_IDS = 4096
# No tokenizer in use averages more than this many characters per token on text: a longer prompt
# cannot fit the context, and encoding it only to say so would hold the event loop's GIL for a
# tenth of a second per megabyte (building the list of ids), stalling every other request.
_MAX_CHARS_PER_TOKEN = 32


def _check_fits(characters: int, max_context: int, param: str) -> None:
    limit = max_context * _MAX_CHARS_PER_TOKEN
    if characters > limit:
        raise InvalidInput(
            f"{param} has {characters} characters: more than fits the model's context of {max_context} tokens "
            f"(/tokenize counts prompts of up to {limit} characters, {_MAX_CHARS_PER_TOKEN} per token of context)",
            param=param,
        )


def _tokenized(ids: list[int], max_context: int) -> bytes:
    """A TokenizeResponse's JSON (orjson: the ids are the tokenizer's ints, nothing to validate)."""
    return orjson.dumps({"count": len(ids), "max_model_len": max_context, "tokens": ids})


def _characters(content: str | list[TextPart] | None) -> int:
    if isinstance(content, list):
        return sum(len(part.text) for part in content)
    return len(content or "")


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(body: TokenizeText | TokenizeChat, request: Request) -> Response:
    """The token ids of a prompt (`prompt`) or of a chat (`messages`), as the generation routes make them."""
    service = service_of(request)
    service.check_ready()
    service.check_model(body.model)
    record = record_of(request)
    max_context = service.engine.info.max_context
    if isinstance(body, TokenizeText):
        _check_fits(len(body.prompt), max_context, "prompt")
        ids = await service.encode(body.prompt, record)
    else:
        _check_fits(sum(_characters(m.content) for m in body.messages), max_context, "messages")
        ids = await service.encode_chat(body.messages, body.tools, record)
    if len(ids) <= _INLINE_IDS:
        content = _tokenized(ids, max_context)
    else:
        content = await service.prepare(service.deadline(record), _tokenized, ids, max_context)
    return Response(content, media_type="application/json")


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of token ids (special tokens left out, as generated text is)."""
    service = service_of(request)
    service.check_ready()
    service.check_model(body.model)
    service.check_token_ids(body.tokens, "tokens")
    text = await service.prepare(service.deadline(record_of(request)), service.engine.decode, body.tokens)
    return DetokenizeResponse(prompt=text)
