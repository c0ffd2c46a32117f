#!/usr/bin/env bash
# Installs checkov (the security scanner run on the rendered Helm chart by tests/chart/) in a virtual
# environment of its own in the cache: its dependencies clash with the project's, so it never joins
# the project's environment. Keyed by version; a second run with the same version does nothing.
#
#   scripts/deps/checkov.sh        # prints the path of the checkov executable
set -euo pipefail

CHECKOV_VERSION=3.3.30
UV_VERSION=0.13.9  # the same uv as scripts/deps/venv.sh, which installs it into the cache
PYTHON="${PYTHON:-python3.11}"

cache="${SLM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/slm-monitoring}"
dest="$cache/checkov-$CHECKOV_VERSION"
say() { printf '[deps] %s\n' "$*" >&2; }
die() { printf '[deps] ERROR: %s\n' "$*" >&2; exit 1; }

if [ ! -f "$dest/.complete" ]; then
  uv="$cache/uv-$UV_VERSION/bin/uv"
  [ -x "$uv" ] || die "uv $UV_VERSION missing in $cache: run scripts/deps/venv.sh first (make deps does)."
  export UV_CACHE_DIR="${UV_CACHE_DIR:-$cache/uv-cache}"
  say "installing checkov $CHECKOV_VERSION into $dest"
  rm -rf "$dest"
  "$uv" venv -q --python "$PYTHON" "$dest"
  VIRTUAL_ENV="$dest" "$uv" pip install -q "checkov==$CHECKOV_VERSION" ||
    die "installing checkov $CHECKOV_VERSION failed (is PyPI reachable?)"
  "$dest/bin/checkov" --version >/dev/null || die "checkov $CHECKOV_VERSION does not start"
  touch "$dest/.complete"
fi
echo "$dest/bin/checkov"
