"""`slm-sidecar` (or `python -m slm_sidecar`): run the sidecar under uvicorn, as `slm-server` runs the server.

Every setting is an environment variable `SLM_<NAME>` (slm_sidecar.settings); the flags below override the
most used ones. Logs are JSON lines on stdout: the built-in server's request line, one per request.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from slm_sidecar.settings import SidecarSettings

if TYPE_CHECKING:
    import uvicorn


def parse_args(argv: list[str] | None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="slm-sidecar", description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream-url", help="the runtime's base URL (env SLM_UPSTREAM_URL)")
    parser.add_argument("--runtime", choices=["openai", "builtin", "vllm", "sglang", "tgi", "llamacpp"])
    parser.add_argument("--served-model-name")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--request-timeout-seconds", type=float)
    parser.add_argument("--max-connections", type=int)
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    args = vars(parser.parse_args(argv))
    return {k: v for k, v in args.items() if v is not None}


def sidecar_config(app: object, settings: SidecarSettings) -> uvicorn.Config:
    """How `slm-sidecar` serves the app: as `slm-server` serves its own (slm_server.cli.uvicorn_config), less
    uvicorn's X-Forwarded-For handling, a wrapper around every request for a client address the sidecar
    never reads."""
    from slm_server.cli import uvicorn_config

    config = uvicorn_config(app, settings)
    config.proxy_headers = False
    return config


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from slm_server.logs import configure_logging, flush_before_signals
    from slm_sidecar.app import create_app

    try:
        settings = SidecarSettings(**parse_args(argv))  # type: ignore[arg-type]
    except ValueError as exc:
        print(f"slm-sidecar: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    flush_before_signals()
    server = uvicorn.Server(sidecar_config(create_app(settings), settings))
    server.run()
    return 0 if server.started else 3
