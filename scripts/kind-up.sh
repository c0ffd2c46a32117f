#!/usr/bin/env bash
# A kind cluster for the e2e tests on a laptop with Docker (it cannot run on the Docker-less CI machine).
# The tests add fake GPU nodes themselves (a local KWOK process), so a plain kind cluster is enough:
#   make kind-up && make e2e E2E_EXISTING=1 KUBECONFIG=$HOME/.kube/kind-slm-monitoring
set -euo pipefail
command -v kind >/dev/null || { echo "kind is not installed: https://kind.sigs.k8s.io/docs/user/quick-start/#installation" >&2; exit 1; }
command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "kind needs a running Docker engine." >&2; exit 1; }
source "$(dirname "$0")/deps/versions.env"
kubeconfig="$HOME/.kube/kind-slm-monitoring"
kind create cluster --name slm-monitoring --image "kindest/node:${KUBERNETES_VERSION}" --kubeconfig "$kubeconfig" --wait 120s
echo "kind cluster ready. Run: make e2e E2E_EXISTING=1 KUBECONFIG=$kubeconfig"
