#!/usr/bin/env bash
# Installs a pinned runtime's Python package (vLLM or SGLang) in a virtual environment of its own in the
# cache, so that tests parse every command line the operator renders with the runtime's own argument
# parser and read its metric definitions from its own code. Keyed by version; a second run with the same
# versions does nothing.
#
#   scripts/deps/runtime-venv.sh vllm      # prints the environment's python
#   scripts/deps/runtime-venv.sh sglang
#
# Not the whole runtime: the package itself without its dependencies, then only what importing its
# argument parser needs, each within the bounds the runtime's own metadata sets (read from the installed
# package and passed to uv as constraints), plus the torch the runtime pins (both import torch at the
# top; torch will not import without its CUDA libraries, which come with it from PyPI). Left out: the
# GPU kernels, attention backends, tokenizer servers, multimodal and serving extras. Never joins the
# project's environment: each runtime pins its own torch and transformers.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
UV_VERSION=0.13.9  # the same uv as scripts/deps/venv.sh, which installs it into the cache
PYTHON="${PYTHON:-python3.11}"

runtime="${1:-}"
case "$runtime" in
  vllm)
    version="$VLLM_VERSION" torch="$VLLM_TORCH_VERSION"
    # What `from vllm.entrypoints.common.cli_args import make_arg_parser` and parsing import.
    needs=(aiohttp blake3 cachetools cbor2 cloudpickle fastapi llguidance msgspec openai orjson oss-harmony
           packaging partial-json-parser pillow prometheus-client psutil py-cpuinfo pybase64 pydantic
           pyzmq regex requests transformers urllib3 uvicorn uvloop watchfiles xgrammar) ;;
  sglang)
    version="$SGLANG_VERSION" torch="$SGLANG_TORCH_VERSION"
    # What `from sglang.srt.server_args import prepare_server_args` and parsing import.
    needs=(aiohttp ipython msgspec numpy orjson packaging pillow psutil pybase64 pydantic pyzmq requests
           starlette tqdm) ;;
  *) echo "usage: $0 vllm|sglang" >&2; exit 2 ;;
esac

cache="${SLM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/slm-monitoring}"
dest="$cache/runtimes/$runtime-$version-torch$torch"
say() { printf '[deps] %s\n' "$*" >&2; }
die() { printf '[deps] ERROR: %s\n' "$*" >&2; exit 1; }

if [ ! -f "$dest/.complete" ]; then
  uv="$cache/uv-$UV_VERSION/bin/uv"
  [ -x "$uv" ] || die "uv $UV_VERSION missing in $cache: run scripts/deps/venv.sh first (make deps does)."
  export UV_CACHE_DIR="${UV_CACHE_DIR:-$cache/uv-cache}"
  say "installing $runtime $version (its argument parser, with torch $torch) into $dest"
  start=$(date +%s)
  rm -rf "$dest"
  "$uv" venv -q --python "$PYTHON" "$dest"
  VIRTUAL_ENV="$dest" "$uv" pip install -q --no-deps "$runtime==$version" ||
    die "installing $runtime $version failed (is PyPI reachable?)"
  # The runtime's own requirements become constraints: whatever we install stays within its bounds.
  "$dest/bin/python" - "$runtime" >"$dest/constraints.txt" <<'EOF'
import sys
from importlib.metadata import requires
for line in requires(sys.argv[1]) or []:
    if "extra ==" not in line:  # the optional extras' requirements are not ours to bound
        print(line)
EOF
  VIRTUAL_ENV="$dest" "$uv" pip install -q -c "$dest/constraints.txt" "torch==$torch" "${needs[@]}" ||
    die "installing what $runtime $version's argument parser imports failed (see above)"
  touch "$dest/.complete"
  say "installed $runtime $version in $(( $(date +%s) - start ))s"
fi
echo "$dest/bin/python"
