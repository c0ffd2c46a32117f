"""The admin listener: the admin API (routers/admin.py) on its own address and port, apart from the
serving port that users (and any CR editor's clients) reach. Loopback by default, so only what runs
in the pod can reach it; another address needs SLM_ADMIN_TOKEN (slm_server.settings refuses
otherwise). Started and stopped by the app's lifespan, in the serving event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from slm_server.errors import install_error_handlers
from slm_server.routers import admin
from slm_server.service.serving import GenerationService
from slm_server.settings import Settings

log = logging.getLogger("slm_server.admin")


def admin_app(service: GenerationService, settings: Settings) -> FastAPI:
    app = FastAPI(title="slm-server admin", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.service = service
    install_error_handlers(app)
    app.include_router(admin.router)
    return app


class _Server(uvicorn.Server):
    """uvicorn without signal handling: the serving listener handles the process's signals, and the
    lifespan stops this one."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AdminListener:
    def __init__(self, app: FastAPI, settings: Settings):
        self.host, self.port = settings.admin_address, settings.admin_port
        self.token_required = settings.admin_token is not None
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            limit_concurrency=16,  # a handful of operators, never a crowd
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen, or raise OSError saying why not (the address in use, not this host's)."""
        family, kind, proto, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            message = f"the admin listener cannot listen on {self.host}:{self.port}: {exc.strerror}"
            raise OSError(exc.errno, message) from exc
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # what stopped it
                raise RuntimeError("the admin listener stopped while starting")
            await asyncio.sleep(0.01)
        log.warning(
            "admin API listening: fault injection can be changed at run time",
            extra={
                "fields": {
                    "event": "admin_listening",
                    "server.address": self.host,
                    "server.port": self.port,
                    "slm.admin_token_required": self.token_required,
                }
            },
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._server.should_exit = True
            await self._task
