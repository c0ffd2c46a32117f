"""Every TGI command line the operator renders uses only flags TGI's launcher documents at the pinned tag,
each with a value where it takes one and a value it accepts where it lists them.

No TGI package or binary can be had here (the launcher is a Rust binary shipped only in its image), so the
judge is the launcher's reference, text-generation-inference/docs/source/reference/launcher.md at tag
v<TGI_VERSION> — generated upstream from `text-generation-launcher --help` (clap) — recorded in tests/runtimes/data/ by
scripts/tgi_extract.sh. A flag renamed or removed in a new version fails here once the pin is bumped and the
file re-extracted; the test refuses a pin without its file.
"""

from __future__ import annotations

import re

import pytest

from slm_devtools.tools import REPO_ROOT, versions
from slm_operator.runtimes import OWNED_FLAGS, PINS, render_runtime
from tests.runtimes.conftest import example_container

FLAG_LINE = re.compile(r"^\s+(?:(-[a-z]), )?(--[a-z0-9-]+)(?: <([A-Z0-9_]+)>)?\s*$")
POSSIBLE = re.compile(r"\[possible values: ([^\]]+)\]")


def launcher_flags() -> dict[str, dict]:
    """{"--port": {"value": True, "choices": None}, ...} from the recorded launcher reference."""
    version = versions()["TGI_VERSION"]
    assert version == PINS["tgi"].version, "versions.env and slm_operator.runtimes.PINS disagree on TGI"
    path = REPO_ROOT / f"tests/runtimes/data/tgi-{version}-launcher.md"
    assert path.is_file(), f"no launcher reference for TGI {version}: run scripts/tgi_extract.sh"
    flags: dict[str, dict] = {}
    current = None
    for line in path.read_text().splitlines():
        match = FLAG_LINE.match(line)
        if match:
            short, long, value = match.groups()
            current = {"value": value is not None, "choices": None}
            flags[long] = current
            if short:
                flags.setdefault(short, current)
            continue
        possible = POSSIBLE.search(line)
        if possible and current is not None:
            current["choices"] = [v.strip() for v in possible.group(1).split(",")]
    return flags


def check(argv: list[str], flags: dict[str, dict]) -> list[str]:
    problems, i = [], 0
    while i < len(argv):
        token = argv[i]
        name, _, inline = token.partition("=")
        spec = flags.get(name)
        if spec is None:
            problems.append(f"{name} is not a flag of the launcher")
            break  # as clap does: the first unknown argument ends the parse
        if spec["value"]:
            value = inline if inline else (argv[i + 1] if i + 1 < len(argv) else None)
            if value is None:
                problems.append(f"{name} needs a value")
            elif spec["choices"] and value not in spec["choices"]:
                problems.append(f"{name} {value}: not one of {spec['choices']}")
            i += 1 if inline else 2
        else:
            if inline:
                problems.append(f"{name} takes no value")
            i += 1
    return problems


RENDERED = [
    render_runtime("tgi", model="Qwen/Qwen2.5-0.5B-Instruct", revision="main", served_model_name="q", port=8080,
                   dtype="bfloat16", max_context=4096, gpus=2)["args"],
    render_runtime("tgi", model="/data/phi-3", served_model_name="phi", port=80, dtype="float16", gpus=1,
                   extra_args=["--max-concurrent-requests", "64", "--quantize", "awq", "--trust-remote-code"])["args"],
    render_runtime("tgi", model="org/m", served_model_name="m", port=3000, gpus=0)["args"],
    example_container("tgi")["args"],  # examples/tgi.yaml, as `kubectl apply` of it renders it
]


@pytest.mark.parametrize("argv", RENDERED, ids=["hub-bf16-tp2", "local-fp16-extra", "defaults", "example"])
def test_rendered_command_line_uses_only_documented_launcher_flags(argv: list[str]):
    assert check(argv, launcher_flags()) == []


def test_every_flag_the_operator_owns_exists_in_the_launcher():
    flags = launcher_flags()
    assert sorted(f for f in OWNED_FLAGS["tgi"] if f not in flags) == []


def test_the_check_refuses_what_the_launcher_would():
    flags = launcher_flags()
    assert check(["--model-name", "x"], flags) == ["--model-name is not a flag of the launcher"]
    assert check(["--dtype", "float32"], flags) == ["--dtype float32: not one of ['float16', 'bfloat16']"]
    assert check(["--port"], flags) == ["--port needs a value"]
