"""The connections to the runtime: HTTP/1.1 over asyncio, kept alive and reused, the responses parsed by
httptools (the C parser uvicorn already runs for the sidecar's own side).

Why not httpx for this hop: with httpx (and httpcore, h11, anyio under it) the proxied request cost the
sidecar ~2.4 ms of CPU on the project's 2-core VM, ~70 % of it in the client (bench/bench_sidecar.py, a
cProfile of the sidecar); this client writes a request in one call and parses the response in C. It speaks
only what the sidecar needs of one runtime on loopback: a request with a body of known length, a response
of any framing (content-length, chunked, or until close), read whole or piece by piece as it arrives. The
sidecar still uses httpx where speed does not matter (readiness, /v1/models).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator

import httptools

# A connection idle longer than this is not reused: runtimes close idle keep-alive connections after ~5 s
# (uvicorn's default, which vLLM, SGLang and the built-in server run; llama.cpp's too), and a request sent
# as the runtime closes would fail.
IDLE_REUSE_SECONDS = 2.0
# Above this much unread body, the connection stops reading (the runtime's writes then wait: backpressure).
HIGH_WATER = 1 << 20


class UpstreamError(ConnectionError):
    """The runtime could not be reached, or broke the connection before its response was whole."""


class Unreachable(UpstreamError):
    """No connection to the runtime: nothing was sent."""


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.received = False  # any byte of the response
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False

    # --- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = UpstreamError(f"the runtime's response is not HTTP: {exc}")
            self._close()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            if self.head_done and self.parser.get_status_code() and not _has_length(self.headers):
                self.complete = True  # a body delimited by the end of the connection
            else:
                self.error = UpstreamError(
                    "the runtime closed the connection"
                    + (f" ({exc})" if exc else "")
                    + " before its response was whole"
                )
        self._wake()

    # --- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # (once the parser is past the message, it says False)
        self.complete = True

    # --- the reader's side
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def take(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _has_length(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name in (b"content-length", b"transfer-encoding") for name, _ in headers)


class Reply:
    """A response of the runtime: its status and headers at once, its body whole (`read`) or as it arrives
    (`pieces`). `aclose()` hands the connection back when the response was whole, else closes it."""

    __slots__ = ("_connection", "_pool", "headers", "status")

    def __init__(self, pool: Upstream, connection: _Connection):
        self._pool = pool
        self._connection = connection
        self.status = connection.status
        self.headers = connection.headers

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def pieces(self) -> AsyncIterator[bytes]:
        connection = self._connection
        while True:
            if connection.chunks:
                yield connection.take()
                continue
            if connection.error is not None:
                raise connection.error
            if connection.complete:
                return
            await connection.wait()

    async def read(self) -> bytes:
        # The loop of `pieces` without an async generator (each one costs its registration with the loop).
        connection = self._connection
        parts = []
        while True:
            if connection.chunks:
                parts.append(connection.take())
            elif connection.error is not None:
                raise connection.error
            elif connection.complete:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            else:
                await connection.wait()

    async def aclose(self) -> None:
        connection = self._connection
        if connection.complete and not connection.closed and connection.error is None and not connection.chunks:
            self._pool.release(connection)
        else:
            connection.abort()


class Upstream:
    """Keep-alive connections to one runtime (`host`, `port`); as many as requests in progress (the
    sidecar's own connection limit, max_connections, bounds them)."""

    def __init__(self, host: str, port: int, *, connect_timeout: float):
        self.host, self.port = host, port
        self.connect_timeout = connect_timeout
        self._host_header = f"{host}:{port}".encode()
        self._idle: list[_Connection] = []
        self.opened = 0  # connections made (tests, the bench)

    async def request(self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> Reply:
        """Send the request; return once the response's status and headers are in. UpstreamError when the
        runtime cannot be reached or breaks off before them (Unreachable when nothing was sent)."""
        head = [method, b" ", path, b" HTTP/1.1\r\nhost: ", self._host_header, b"\r\n"]
        for name, value in headers:
            head += [name, b": ", value, b"\r\n"]
        if body or method == b"POST":
            head += [b"content-length: ", str(len(body)).encode(), b"\r\n"]
        head.append(b"\r\n")
        message = b"".join(head) + body
        while True:
            connection, reused = await self._connection()
            connection._reset()
            assert connection.transport is not None
            connection.transport.write(message)
            try:
                while not connection.head_done:
                    if connection.error is not None:
                        raise connection.error
                    await connection.wait()
            except UpstreamError:
                connection.abort()
                if reused and not connection.received:
                    continue  # the runtime had closed the idle connection as the request went: a new one
                raise
            except BaseException:
                connection.abort()
                raise
            return Reply(self, connection)

    async def _connection(self) -> tuple[_Connection, bool]:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            transport = connection.transport
            if connection.closed or transport is None or transport.is_closing():
                continue
            if now - connection.idle_since > IDLE_REUSE_SECONDS:
                connection.abort()
                continue
            return connection, True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(_Connection, self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise Unreachable(f"cannot connect to {self.host}:{self.port}: {type(exc).__name__}: {exc}") from exc
        self.opened += 1
        return protocol, False

    def release(self, connection: _Connection) -> None:
        if not connection.keep_alive:
            connection.abort()
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    def close(self) -> None:
        for connection in self._idle:
            connection.abort()
        self._idle.clear()
