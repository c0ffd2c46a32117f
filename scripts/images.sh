#!/usr/bin/env bash
# Builds the project's images with Docker or Podman (whichever is found, Docker first), tagged as the
# chart references them by default: <imageRegistry>/slm-operator:<appVersion> from operator/, and
# <imageRegistry>/slm-server:<appVersion> from server/ (both read from charts/slm-monitoring).
#
#   scripts/images.sh                     # both (make images)
#   scripts/images.sh operator            # one of them
#   IMAGE_REGISTRY=registry.example.com/ml IMAGE_TAG=0.1.0-rc.1 CONTAINER_ENGINE=podman scripts/images.sh
#   IMAGE_PUSH=1 scripts/images.sh        # and push them (a release: docs/release.md)
#
# Prints each reference it built on stdout, one a line (scripts/kind-up.sh loads them); with IMAGE_PUSH=1,
# as pushed: `<image>:<tag>@sha256:<digest>`, the digest the chart is then pinned to. The engine's output
# goes to stderr. The locks are resolved for x86_64 Linux, so the images are linux/amd64.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
chart="$repo/charts/slm-monitoring"

say() { printf '[images] %s\n' "$*" >&2; }
die() { printf '[images] ERROR: %s\n' "$*" >&2; exit 1; }

engine="${CONTAINER_ENGINE:-}"
if [ -z "$engine" ]; then
  if command -v docker >/dev/null; then engine=docker
  elif command -v podman >/dev/null; then engine=podman
  else die "building the images needs Docker or Podman, and neither 'docker' nor 'podman' is on PATH (https://docs.docker.com/engine/install/ or https://podman.io/docs/installation)."
  fi
fi
command -v "$engine" >/dev/null || die "CONTAINER_ENGINE=$engine is not on PATH."
"$engine" info >/dev/null 2>&1 || die "$engine is installed but does not answer ('$engine info' fails): is its daemon running, and may this user reach it?"

registry="${IMAGE_REGISTRY:-$(sed -n 's/^imageRegistry: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$chart/values.yaml")}"
tag="${IMAGE_TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$chart/Chart.yaml")}"
[ -n "$registry" ] && [ -n "$tag" ] || die "could not read imageRegistry and appVersion from $chart (set IMAGE_REGISTRY and IMAGE_TAG)."

components=("$@")
[ ${#components[@]} -gt 0 ] || components=(operator server)
for component in "${components[@]}"; do
  case "$component" in
    operator|server) ;;
    *) die "unknown image '$component': operator or server." ;;
  esac
  ref="$registry/slm-$component:$tag"
  say "$engine build $ref from $component/"
  "$engine" build --platform linux/amd64 --tag "$ref" --file "$repo/$component/Dockerfile" "$repo/$component" >&2
  if [ -z "${IMAGE_PUSH:-}" ]; then
    echo "$ref"
    continue
  fi
  say "$engine push $ref"
  if [ "$engine" = podman ]; then
    digestfile="$(mktemp)"
    podman push --digestfile "$digestfile" "$ref" >&2
    digest="$(cat "$digestfile")"
    rm -f "$digestfile"
  else
    "$engine" push "$ref" >&2
    # The registry's digest of what was just pushed, as recorded by the engine for this repository.
    digest="$("$engine" inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$ref" |
              sed -n "s|^${ref%:*}@||p" | head -n 1)"
  fi
  [[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]] || die "no digest for $ref after pushing it (got '$digest')."
  echo "$ref@$digest"
done
