#!/usr/bin/env bash
# Creates the Python environment: the locked dependencies live in a virtual environment in the
# cache, keyed by the hash of requirements.lock (torch alone is gigabytes: a fresh clone, CI's
# included, reuses it), and the checkout gets a light .venv that sees those packages through a
# .pth file and holds only the project itself (editable), so two checkouts never fight.
#
#   scripts/deps/venv.sh          # create or reuse
#   scripts/deps/venv.sh --lock   # re-resolve requirements.lock from pyproject.toml, then create
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${SLM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/slm-monitoring}"
UV_VERSION=0.13.9
PYTHON="${PYTHON:-python3.11}"

say() { printf '[deps] %s\n' "$*"; }
die() { printf '[deps] ERROR: %s\n' "$*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install Python 3.11 (or set PYTHON=python3.x, >= 3.11)."

# uv (pinned) in its own small environment.
uvdir="$cache/uv-$UV_VERSION"
if [ ! -x "$uvdir/bin/uv" ]; then
  say "installing uv $UV_VERSION"
  rm -rf "$uvdir"
  "$PYTHON" -m venv "$uvdir" || die "could not create a virtual environment: install python3-venv."
  "$uvdir/bin/pip" install -q "uv==$UV_VERSION" || die "pip could not install uv $UV_VERSION: is PyPI reachable?"
fi
uv="$uvdir/bin/uv"
export UV_CACHE_DIR="${UV_CACHE_DIR:-$cache/uv-cache}"

# One lock for the development environment (the three distributions and the test tools together),
# and one per product image, constrained by it so every image runs the versions the tests ran.
# All with hashes: the image builds install with --require-hashes.
if [ "${1:-}" = "--lock" ] || [ ! -f "$repo/requirements.lock" ]; then
  say "resolving requirements.lock, operator/requirements.lock, server/requirements.lock, sidecar/requirements.lock"
  compile() { (cd "$repo" && "$uv" pip compile -q --generate-hashes --python-version 3.11 \
                 --python-platform x86_64-manylinux_2_28 "$@"); }
  compile pyproject.toml operator/pyproject.toml server/pyproject.toml --all-extras -o requirements.lock
  compile operator/pyproject.toml -c requirements.lock -o operator/requirements.lock
  compile server/pyproject.toml --extra engine -c requirements.lock -o server/requirements.lock
  # The sidecar needs slm-server's base install (no engine extra); slm-server itself comes from the
  # checkout (sidecar/pyproject.toml's tool.uv.sources), so the lock leaves it out.
  compile sidecar/pyproject.toml -c requirements.lock --no-emit-package slm-server -o sidecar/requirements.lock
fi

key="$("$PYTHON" -c 'import sys;print(f"py{sys.version_info[0]}{sys.version_info[1]}")')-$(sha256sum "$repo/requirements.lock" | cut -c1-16)"
deps="$cache/venvs/$key"
if [ ! -f "$deps/.complete" ]; then
  say "creating the dependency environment $deps (first time on this machine: torch is large, several minutes)"
  rm -rf "$deps"
  "$uv" venv -q --python "$PYTHON" "$deps"
  VIRTUAL_ENV="$deps" "$uv" pip sync -q "$repo/requirements.lock" ||
    die "installing requirements.lock failed; see the messages above (is PyPI reachable? disk space: $(df -h "$cache" | tail -1 | awk '{print $4}') free)."
  touch "$deps/.complete"
else
  say "dependency environment: cached ($key)"
fi

venv="$repo/.venv"
site_of() { "$1/bin/python" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])'; }
if [ ! -x "$venv/bin/python" ] || ! grep -qs "$deps" "$(site_of "$venv")/_slm_deps.pth"; then
  rm -rf "$venv"
  "$uv" venv -q --python "$PYTHON" "$venv"
  echo "import site; site.addsitedir('$(site_of "$deps")')" >"$(site_of "$venv")/_slm_deps.pth"
fi
# The deps' console scripts (pytest, ruff, mypy, kopf…) are reached through .venv/bin too.
for tool in "$deps"/bin/*; do
  name="$(basename "$tool")"
  case "$name" in python*|activate*|pip*|deactivate|slm-*) continue ;; esac
  if head -n 1 "$tool" | grep -q '^#!.*python'; then
    target="$venv/bin/$name"
    [ -L "$target" ] && rm -f "$target"
    printf '#!/bin/sh\nexec "%s/bin/python" "%s" "$@"\n' "$venv" "$tool" >"$target.tmp" && mv "$target.tmp" "$target"
    chmod +x "$target"
  else
    ln -sfn "$tool" "$venv/bin/$name"   # native binaries (ruff)
  fi
done
VIRTUAL_ENV="$venv" "$uv" pip install -q --no-deps -e "$repo/operator" -e "$repo/server" -e "$repo/sidecar" -e "$repo" ||
  die "installing the project (editable: operator, server, sidecar, devtools) failed."
# Each product's own lock installs hash-checked from uv's cache (tests/packaging installs them
# offline, as an air-gapped image build would). A package first cached by an install without hashes
# (checkov's, say) is not trusted by --require-hashes offline: install each lock once here, online.
for lock in operator/requirements.lock sidecar/requirements.lock; do
  [ -f "$repo/$lock" ] || continue
  mark="$cache/venvs/.hashed-$(sha256sum "$repo/$lock" | cut -c1-16)"
  [ -f "$mark" ] && continue
  scratch="$(mktemp -d)"
  "$uv" venv -q --python "$PYTHON" "$scratch/venv"
  "$uv" pip install -q --python "$scratch/venv/bin/python" --require-hashes -r "$repo/$lock" ||
    die "installing $lock with its hashes failed; see the messages above."
  rm -rf "$scratch"; touch "$mark"
done
say "python environment ready: $venv (packages from $deps)"
