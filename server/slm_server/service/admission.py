"""Admission: at most `limit` generations at once, at most `queue_limit` waiting, the rest refused
at once (429, with a Retry-After from the recent generation time)."""

from __future__ import annotations

import asyncio
import math
import time

from slm_server.errors import Overloaded, RequestTimeout


class Admission:
    """At most `limit` generations at once; at most `queue_limit` waiting; the rest refused at once."""

    def __init__(self, limit: int, queue_limit: int):
        self.limit = limit
        self.queue_limit = queue_limit
        self.in_flight = 0  # read by the slm_requests_in_flight / _queued gauges when scraped
        self.queued = 0
        self._semaphore = asyncio.Semaphore(limit)
        self._idle = asyncio.Event()
        self._idle.set()
        self.recent_seconds = 1.0  # moving average of generation time, for Retry-After

    async def acquire(self, wait_seconds: float) -> float:
        """Wait for a slot; returns the time waited. Overloaded when the queue is full, RequestTimeout
        after `wait_seconds` in the queue."""
        start = time.perf_counter()
        if self._semaphore.locked():
            if self.queued >= self.queue_limit:
                waits = math.ceil(self.recent_seconds * (self.queued + 1) / self.limit)
                raise Overloaded(
                    f"server overloaded: {self.in_flight} requests running and {self.queued} queued "
                    f"(limits {self.limit} and {self.queue_limit}); retry later",
                    headers={"Retry-After": str(max(1, waits))},
                )
            self.queued += 1
            try:
                await asyncio.wait_for(self._semaphore.acquire(), max(wait_seconds, 0.0))
            except TimeoutError:
                raise RequestTimeout(f"request timed out after {wait_seconds:.1f} s waiting in the queue") from None
            finally:
                self.queued -= 1
        else:
            await self._semaphore.acquire()
        self.in_flight += 1
        self._idle.clear()
        return time.perf_counter() - start

    def release(self, seconds: float | None = None) -> None:
        self.in_flight -= 1
        if seconds is not None:
            self.recent_seconds = 0.8 * self.recent_seconds + 0.2 * seconds
        self._semaphore.release()
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, within_seconds: float) -> bool:
        """Wait until nothing runs; False when `within_seconds` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), within_seconds)
            return True
        except TimeoutError:
            return False
