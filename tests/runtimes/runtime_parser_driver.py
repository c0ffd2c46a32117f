"""Parses command lines with a runtime's own argument parser. Run by the runtime's Python (the environment
scripts/deps/runtime-venv.sh makes), never imported by the tests' interpreter.

    <runtime python> runtime_parser_driver.py vllm|sglang ARGVS.json RESULTS.json

ARGVS.json: a JSON list of argument lists (what follows `vllm serve` / `python -m sglang.launch_server`),
or ["--list-options"] for every option string the parser knows (argparse keeps them in `_actions`);
RESULTS.json: one JSON object per list, {"ok": true, "parsed": {...}} or {"ok": false, "error": [...]}
(a file, not stdout: the runtimes log to stdout).

vLLM: the `vllm serve` subcommand's parser built exactly as `vllm` builds it (the top-level parser with
the serve subparser, `ServeSubcommand.validate`), then `AsyncEngineArgs.from_cli_args` (the engine's
typed arguments). VLLM_TARGET_DEVICE=cpu, vLLM's own switch, is set by the caller: without a GPU vLLM
cannot infer a device and refuses to build its parser; the flags do not depend on the device.
SGLang: `prepare_server_args`, what `python -m sglang.launch_server` calls (parser, then ServerArgs).
Nothing is stubbed.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from typing import Any


def _vllm() -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    (command,) = serve.cmd_init()
    command.subparser_init(subparsers)

    def parse(argv: list[str]) -> dict[str, Any]:
        if argv == ["--list-options"]:
            serve_parser = subparsers.choices["serve"]
            return {"options": sorted(o for a in serve_parser._actions for o in a.option_strings)}
        args = parser.parse_args(["serve", *argv])
        command.validate(args)
        if args.model_tag is not None:  # as ServeSubcommand.cmd does before starting
            args.model = args.model_tag
        engine = AsyncEngineArgs.from_cli_args(args)
        return {
            "model": engine.model, "revision": engine.revision, "dtype": engine.dtype,
            "max_model_len": engine.max_model_len, "tensor_parallel_size": engine.tensor_parallel_size,
            "served_model_name": engine.served_model_name, "host": args.host, "port": args.port,
        }

    return parse


def _sglang() -> Any:
    import argparse

    from sglang.srt.server_args import ServerArgs, prepare_server_args

    def parse(argv: list[str]) -> dict[str, Any]:
        if argv == ["--list-options"]:  # the parser prepare_server_args builds
            parser = argparse.ArgumentParser(prog="sglang serve")
            ServerArgs.add_cli_args(parser)
            return {"options": sorted(o for a in parser._actions for o in a.option_strings)}
        server = prepare_server_args(argv)
        return {
            "model_path": server.model_path, "revision": server.revision, "dtype": server.dtype,
            "context_length": server.context_length, "tp_size": server.tp_size,
            "served_model_name": server.served_model_name, "host": server.host, "port": server.port,
            "enable_metrics": server.enable_metrics,
        }

    return parse


def main() -> int:
    runtime = sys.argv[1]
    parse = {"vllm": _vllm, "sglang": _sglang}[runtime]()
    results = []
    with open(sys.argv[2]) as argvs:
        todo = json.load(argvs)
    for argv in todo:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parsed = parse(argv)
        except SystemExit:  # argparse's way of refusing a command line
            results.append({"ok": False, "error": stderr.getvalue().strip().splitlines()[-1:]})
        except Exception as error:  # the runtime's own validation after parsing
            results.append({"ok": False, "error": [f"{type(error).__name__}: {error}"]})
        else:
            results.append({"ok": True, "parsed": json.loads(json.dumps(parsed, default=str))})
    with open(sys.argv[3], "w") as out:
        json.dump(results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
