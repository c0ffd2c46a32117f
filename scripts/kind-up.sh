#!/usr/bin/env bash
# A kind cluster for the e2e tests on a laptop with Docker or Podman (neither runs on the CI machine),
# with the project's images built from this checkout and loaded into it, so the chart's defaults
# (`<imageRegistry>/slm-operator:<appVersion>`, the server image likewise) run without a registry.
# The tests add the fake GPU nodes themselves (a local KWOK process); see docs/e2e-on-kind.md.
#
#   make kind-up && make e2e E2E_EXISTING=1 KUBECONFIG=$HOME/.kube/kind-slm-monitoring
#   KIND_UP_SKIP_IMAGES=1 make kind-up     # the cluster only
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
name=slm-monitoring
kubeconfig="$HOME/.kube/kind-$name"

say() { printf '[kind-up] %s\n' "$*"; }
die() { printf '[kind-up] ERROR: %s\n' "$*" >&2; exit 1; }

command -v kind >/dev/null || die "kind is not installed: https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
if command -v docker >/dev/null; then engine=docker
elif command -v podman >/dev/null; then engine=podman
  export KIND_EXPERIMENTAL_PROVIDER=podman  # kind's switch to Podman nodes
else die "kind needs Docker or Podman, and neither 'docker' nor 'podman' is on PATH."
fi
"$engine" info >/dev/null 2>&1 || die "$engine is installed but not running (or not reachable as this user)."

# shellcheck source=deps/versions.env
source "$here/deps/versions.env"
if kind get clusters 2>/dev/null | grep -qx "$name"; then
  say "cluster $name exists; writing its kubeconfig to $kubeconfig"
  kind export kubeconfig --name "$name" --kubeconfig "$kubeconfig"
else
  kind create cluster --name "$name" --image "kindest/node:${KUBERNETES_VERSION}" --kubeconfig "$kubeconfig" --wait 120s
fi

if [ -z "${KIND_UP_SKIP_IMAGES:-}" ]; then
  mapfile -t images < <(CONTAINER_ENGINE="$engine" "$here/images.sh")
  [ ${#images[@]} -gt 0 ] || die "scripts/images.sh built no image."
  archive="$(mktemp -d)"
  trap 'rm -rf "$archive"' EXIT
  for image in "${images[@]}"; do
    # An archive works for both engines (`kind load docker-image` asks Docker only).
    say "loading $image into $name"
    "$engine" save --output "$archive/image.tar" "$image"
    kind load image-archive "$archive/image.tar" --name "$name"
    rm -f "$archive/image.tar"
  done
fi
say "ready. Run: make e2e E2E_EXISTING=1 KUBECONFIG=$kubeconfig"
