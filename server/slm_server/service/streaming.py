"""A generation's text as it comes, and the streams of a request's choices merged into one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple

from slm_server.errors import RequestTimeout, ServerError
from slm_server.generation.types import GenerationResult, TokenLogprobs
from slm_server.service.jobs import Job


class StreamEvent(NamedTuple):
    """A piece of a generation's text with its tokens' log-probabilities; the last event has no text
    and the result."""

    text: str
    tokens: list[TokenLogprobs]
    result: GenerationResult | None


class ChoiceEvent(NamedTuple):
    """A `StreamEvent` of one of a request's choices."""

    choice: int  # its index
    text: str
    tokens: list[TokenLogprobs]
    result: GenerationResult | None


class TextPiece(NamedTuple):
    """What a generation's text callback queues for its stream."""

    text: str
    tokens: list[TokenLogprobs]


async def stream_events(
    job: Job,
    queue: asyncio.Queue[TextPiece | None],
    future: asyncio.Future[GenerationResult],
    timed_out: Callable[[], RequestTimeout],
    failure: Callable[[BaseException], ServerError],
) -> AsyncIterator[StreamEvent]:
    """The events of one generation: its pieces of text from `queue` until None (the generation's
    end), then its result. Raises `timed_out()` past the job's deadline, `failure(exc)` when it failed."""
    try:
        while True:
            try:
                piece = await asyncio.wait_for(queue.get(), job.deadline - time.perf_counter())
            except TimeoutError:
                job.timed_out = True
                job.cancel.set()
                raise timed_out() from None
            if piece is None:
                break
            yield StreamEvent(piece.text, piece.tokens, None)
        exc = future.exception()
        if exc is not None:
            raise failure(exc) from exc
        yield StreamEvent("", [], future.result())
    finally:
        job.cancel.set()  # finished, failed, or the client went away: stop the worker


class _End(NamedTuple):
    choice: int


class _Failed(NamedTuple):
    choice: int
    error: Exception


async def merge(streams: list[AsyncIterator[StreamEvent]], jobs: list[Job]) -> AsyncIterator[ChoiceEvent]:
    """The events of the choices' streams in the order they come; the first error is raised, and
    ending (error, or the client gone) stops every choice's generation."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield ChoiceEvent(0, *event)
        return
    queue: asyncio.Queue[ChoiceEvent | _End | _Failed] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[StreamEvent]) -> None:
        try:
            async for event in stream:
                queue.put_nowait(ChoiceEvent(index, *event))
            queue.put_nowait(_End(index))
        except Exception as exc:
            queue.put_nowait(_Failed(index, exc))

    tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if isinstance(item, _End):
                running -= 1
            elif isinstance(item, _Failed):
                raise item.error
            else:
                yield item
    finally:
        for job in jobs:
            job.cancel.set()  # also the workers of streams that never started
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
