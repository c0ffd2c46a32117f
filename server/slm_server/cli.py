"""`slm-server` (or `python -m slm_server`): run the server under uvicorn.

Every setting is an environment variable `SLM_<NAME>` (see slm_server.settings); the flags below
override the most used ones. Logs are JSON lines on stdout, uvicorn's included.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from slm_server.settings import Settings

if TYPE_CHECKING:
    import uvicorn


def parse_args(argv: list[str] | None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="slm-server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF model directory or hub id (env SLM_MODEL)")
    parser.add_argument("--served-model-name")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--engine", choices=["transformers", "echo"])
    parser.add_argument("--max-concurrent-requests", type=int)
    parser.add_argument("--max-queued-requests", type=int)
    parser.add_argument("--request-timeout-seconds", type=float)
    parser.add_argument("--max-connections", type=int)
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--no-metrics",
        dest="metrics_enabled",
        action="store_const",
        const=False,
        help="serve without metrics and /metrics (with SLM_LOG_REQUESTS=false: the benchmark baseline)",
    )
    args = vars(parser.parse_args(argv))
    return {k: v for k, v in args.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from slm_server.app import create_app
    from slm_server.logs import configure_logging, flush_before_signals

    try:
        settings = Settings(**parse_args(argv))  # type: ignore[arg-type]
    except ValueError as exc:
        print(f"slm-server: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    flush_before_signals()
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings))
    server.run()
    return 0 if server.started else 3  # uvicorn's exit status for a failed start-up (the log line says why)


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    """How `slm-server` serves the app (tests serve it the same way)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # the app owns logging (slm_server.logs)
        access_log=False,  # the request middleware writes one richer line per request
        timeout_graceful_shutdown=int(settings.drain_timeout_seconds) or None,
        server_header=False,
        # Connections (idle keep-alive ones included) and requests in progress; beyond it, 503.
        limit_concurrency=settings.max_connections,
    )
