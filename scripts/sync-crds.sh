#!/usr/bin/env bash
# Copies the CRDs (single source of truth: manifests/crds/) into the Helm chart's crds/ folder.
#
#   scripts/sync-crds.sh           # copy; stale files in the chart's crds/ are removed
#   scripts/sync-crds.sh --check   # change nothing; exit 1 and show the difference when they differ
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$repo/manifests/crds"
dst="$repo/charts/slm-monitoring/crds"

shopt -s nullglob
sources=("$src"/*.yaml)
[ "${#sources[@]}" -gt 0 ] || { echo "sync-crds: no CRDs in $src" >&2; exit 1; }

if [ "${1:-}" = "--check" ]; then
  if ! diff -r -u "$src" "$dst" >&2; then
    echo "sync-crds: charts/slm-monitoring/crds/ differs from manifests/crds/: run scripts/sync-crds.sh" >&2
    exit 1
  fi
  echo "sync-crds: chart CRDs are in step with manifests/crds/"
  exit 0
fi
[ $# -eq 0 ] || { echo "usage: $0 [--check]" >&2; exit 2; }

mkdir -p "$dst"
for stale in "$dst"/*; do
  [ -e "$src/$(basename "$stale")" ] || rm -f -- "$stale"
done
cp -- "${sources[@]}" "$dst/"
echo "sync-crds: copied ${#sources[@]} CRD(s) into charts/slm-monitoring/crds/"
