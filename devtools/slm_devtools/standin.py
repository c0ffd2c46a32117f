"""Stand-ins for the runtimes that cannot run on this machine (vLLM, SGLang, TGI: GPU images), for local pods.

    python -m slm_devtools.standin vllm <the container's args…>

A stand-in is NOT the runtime. It reads from the container's rendered arguments only where to listen (the
runtime's host and port flags) and the name it serves, then answers over HTTP what the pod's wiring needs:

- the runtime's health path (`/health` for all three, as slm_operator.runtimes renders their probes): 200,
  so the container's own readiness probe and the sidecar's /readyz (which asks the runtime) pass;
- `/v1/models`: the served name, so a request through the sidecar proves it forwards to the runtime's port;
- `/metrics`: an empty exposition (no engine, no series);
- anything else: 501 with a JSON error saying it is a stand-in.

What it proves, used by LocalKubelet (`LocalKubelet(programs=STAND_INS)`): the pod's ports, probes, and the
sidecar in front of the runtime on loopback, as rendered. What it does not: that the runtime accepts its flags
(tests/runtimes judges them with vLLM's and SGLang's own parsers and TGI's launcher reference) or serves.
llama.cpp needs no stand-in: the real llama-server runs (slm_devtools.localpods.RUNTIMES).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from slm_devtools.localpods import Runtime

# runtime -> (host flag, port flag, served-name flags in order of preference)
FLAGS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "vllm": ("--host", "--port", ("--served-model-name",)),
    "sglang": ("--host", "--port", ("--served-model-name", "--model-path")),
    "tgi": ("--hostname", "--port", ("--model-id",)),
}
HEALTH_PATH = "/health"



def _program(runtime: str) -> Callable[[], list[str]]:
    return lambda: [sys.executable, "-m", "slm_devtools.standin", runtime]


# For LocalKubelet(programs=...): the runtime's container runs this module with the pod's own args.
STAND_INS: dict[str, Runtime] = {
    runtime: Runtime(_program(runtime), host_flags=(flags[0],)) for runtime, flags in FLAGS.items()
}


def listen_address(runtime: str, args: Sequence[str]) -> tuple[str, int, str]:
    """(host, port, served name) from a runtime's rendered arguments; the rest is ignored."""
    host_flag, port_flag, name_flags = FLAGS[runtime]
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument(host_flag, dest="host", required=True)
    parser.add_argument(port_flag, dest="port", type=int, required=True)
    for flag in name_flags:
        parser.add_argument(flag, dest=flag.lstrip("-").replace("-", "_"))
    known, _ = parser.parse_known_args(list(args))
    served = next((getattr(known, f.lstrip("-").replace("-", "_")) for f in name_flags
                   if getattr(known, f.lstrip("-").replace("-", "_"))), None)
    if runtime == "vllm" and served is None and args and not args[0].startswith("-"):
        served = args[0]  # `vllm serve MODEL`
    return known.host, known.port, served or "model"


def serve(runtime: str, args: Sequence[str]) -> None:
    host, port, served = listen_address(runtime, args)

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == HEALTH_PATH:
                self._reply(200, b"{}")
            elif path == "/v1/models":
                self._reply(200, json.dumps({"object": "list", "data": [
                    {"id": served, "object": "model", "owned_by": f"{runtime}-stand-in"}]}).encode())
            elif path == "/metrics":
                self._reply(200, b"", "text/plain; version=0.0.4")
            else:
                self._unsupported()

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._unsupported()

        def _unsupported(self) -> None:
            self._reply(501, json.dumps({"error": {
                "message": f"a stand-in for {runtime} (slm_devtools.standin): no engine behind it",
                "type": "not_implemented"}}).encode())

        def log_message(self, format: str, *values: object) -> None:
            sys.stderr.write(f"{runtime}-stand-in {self.address_string()} {format % values}\n")

    server = ThreadingHTTPServer((host, port), Handler)
    print(f"{runtime} stand-in (not the runtime) listening on {host}:{port}, serving {served!r}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in FLAGS:
        print(f"usage: python -m slm_devtools.standin {{{','.join(FLAGS)}}} <the container's args...>", file=sys.stderr)
        return 2
    serve(argv[0], argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
