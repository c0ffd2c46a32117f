#!/usr/bin/env bash
# Records what the tests need from TGI's sources at its pinned tag, which no package registry serves:
# the launcher's documented flags and the router's metric definitions. Run by hand with a clone of
# https://github.com/huggingface/text-generation-inference when TGI_VERSION in versions.env changes:
#
#   scripts/tgi_extract.sh /path/to/text-generation-inference
#
# Writes tests/runtimes/data/tgi-<version>-launcher.md (the launcher reference text-generation-inference/docs/source/reference/launcher.md at the tag,
# generated upstream from the launcher's --help) and tests/runtimes/data/tgi-<version>-metrics.txt
# (every metrics::counter!/gauge!/histogram! call in router/ and backends/v3/ at the tag, file:line).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deps/versions.env
source "$here/deps/versions.env"
checkout="$1" tag="v$TGI_VERSION" out="$here/../tests/runtimes/data" reference="source/reference/launcher.md"
commit="$(git -C "$checkout" rev-parse "$tag^{commit}")"
{
  echo "<!-- text-generation-inference/docs/$reference at $tag (commit $commit)."
  echo "     Copied by scripts/tgi_extract.sh; do not edit. -->"
  git -C "$checkout" show "$tag:docs/$reference"
} >"$out/tgi-$TGI_VERSION-launcher.md"
{
  echo "# metrics::counter!/gauge!/histogram! calls in router/ and backends/v3/ of text-generation-inference $tag"
  echo "# (commit $commit). Made by scripts/tgi_extract.sh; do not edit."
  git -C "$checkout" grep -n -E 'metrics::(counter|gauge|histogram)!\(\s*"tgi_' "$tag" -- router backends/v3 |
    sed -E "s/^$tag://; s/^([^:]+:[0-9]+):.*metrics::(counter|gauge|histogram)!\(\s*\"([a-z_]+)\".*/\1 \2 \3/"
} >"$out/tgi-$TGI_VERSION-metrics.txt"
