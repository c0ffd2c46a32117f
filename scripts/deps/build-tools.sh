#!/usr/bin/env bash
# Builds every binary the tests and the demo need from the Go module proxy, into a cache
# outside the checkout keyed by tool name and version, then links them into <repo>/.bin.
#
#   scripts/deps/build-tools.sh            # build what is missing, link into .bin
#   SLM_CACHE_DIR=/somewhere scripts/...   # another cache (default $XDG_CACHE_HOME/slm-monitoring)
#
# A tool is rebuilt only when its pinned version in versions.env changes. `go install pkg@v`
# refuses modules whose go.mod has replace/exclude directives (Kubernetes, etcd, Prometheus),
# so each tool is built from a small wrapper module of our own that requires it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${SLM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/slm-monitoring}"
tools="$cache/tools"
links="${SLM_BIN_DIR:-$repo/.bin}"
mkdir -p "$tools" "$cache/src" "$cache/logs" "$links"

say() { printf '[deps] %s\n' "$*"; }
die() { printf '[deps] ERROR: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null || die "Go is not installed. Install Go >= 1.25 (https://go.dev/dl) and re-run 'make deps'."
go_minor="$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')"
[ "${go_minor:-0}" -ge 25 ] || die "Go $(go env GOVERSION) is too old: Kubernetes ${KUBERNETES_VERSION} needs Go >= 1.25."

export CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false" GOTOOLCHAIN=local
export build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

# run_logged NAME VERSION FUNCTION: runs FUNCTION with its output in a log, printing a heartbeat,
# and on failure the log's tail and what to do.
run_logged() {
  local name="$1" version="$2" fn="$3" log="$cache/logs/$1-$2.log" start pid rc=0
  start=$(date +%s)
  say "building $name $version (log: $log)"
  # /usr/bin/time reports the peak RSS of the largest process the build ran (compiler or linker).
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -f "peak-rss-kib %M" bash -c "set -euo pipefail; $(declare -f "$fn" wrapper prom_ldflags); $fn" >"$log" 2>&1 &
  else
    ( "$fn" ) >"$log" 2>&1 &
  fi
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && say "  … $name still building ($(( $(date +%s) - start ))s)"
  done
  wait "$pid" || rc=$?
  if [ "$rc" -ne 0 ]; then
    tail -n 40 "$log" >&2
    die "building $name $version failed (exit $rc). Full log: $log. Check that the Go module proxy is reachable (GOPROXY=$(go env GOPROXY)) and that there is free disk space; then re-run 'make deps'."
  fi
  local peak
  peak="$(sed -n 's/^peak-rss-kib \([0-9]*\)$/\1/p' "$log" | tail -1)"
  say "built $name $version in $(( $(date +%s) - start ))s${peak:+, peak memory $(( peak / 1024 )) MiB}"
}

# wrapper DIR MODULE VERSION [REPLACES...]: a go.mod that requires MODULE@VERSION.
wrapper() {
  local dir="$1" module="$2" version="$3"; shift 3
  rm -rf "$dir"; mkdir -p "$dir"
  {
    echo "module slm-monitoring.local/deps"
    echo "go 1.25"
    echo "require $module $version"
    for r in "$@"; do echo "replace $r"; done
  } >"$dir/go.mod"
}

# tool NAME VERSION FUNCTION: build into $tools/NAME-VERSION unless already complete.
tool() {
  local name="$1" version="$2" fn="$3"
  export DEST="$tools/$name-$version" SRC="$cache/src/$name-$version" VERSION="$version"
  if [ -f "$DEST/.complete" ]; then
    say "$name $version: cached"
    return
  fi
  # Several checkouts may run `make deps` at once: one builds, the others wait for it.
  mkdir -p "$tools"
  exec {lockfd}>"$tools/.$name-$version.lock"
  flock "$lockfd"
  if [ -f "$DEST/.complete" ]; then
    say "$name $version: built by another checkout meanwhile"
    exec {lockfd}>&-
    return
  fi
  rm -rf "$DEST"; mkdir -p "$DEST"
  run_logged "$name" "$version" "$fn"
  touch "$DEST/.complete"
  exec {lockfd}>&-
}

build_etcd() {
  wrapper "$SRC" go.etcd.io/etcd/server/v3 "$VERSION"
  cd "$SRC"
  go build -trimpath -o "$DEST/etcd" go.etcd.io/etcd/server/v3
}

build_kubernetes() {
  # Every staging module k8s.io/<name> is replaced by its v0.<minor>.<patch> release, generated
  # from the release's own go.mod so the list never drifts from upstream.
  local modfile staging_version minor replaces=()
  modfile="$(cd /tmp && go mod download -json "k8s.io/kubernetes@$VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  [ -f "$modfile" ] || { echo "cannot download k8s.io/kubernetes@$VERSION"; return 1; }
  staging_version="v0.${VERSION#v1.}"
  while read -r mod; do replaces+=("$mod => $mod $staging_version"); done < <(
    awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' "$modfile")
  [ "${#replaces[@]}" -gt 10 ] || { echo "found no staging replaces in $modfile"; return 1; }
  wrapper "$SRC" k8s.io/kubernetes "$VERSION" "${replaces[@]}"
  cd "$SRC"
  minor="${VERSION#v1.}"; minor="${minor%%.*}"
  local ld="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date -X $pkg.gitCommit=0000000000000000000000000000000000000000"
  done
  go build -trimpath -ldflags "-s -w $ld" -o "$DEST/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl
}

build_kwok() {
  wrapper "$SRC" sigs.k8s.io/kwok "$VERSION"
  cd "$SRC"
  go build -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$VERSION" -o "$DEST/kwok" sigs.k8s.io/kwok/cmd/kwok
}

build_helm() {
  wrapper "$SRC" helm.sh/helm/v3 "$HELM_VERSION"
  cd "$SRC"
  # Helm's built-in default cluster version (used by `helm template` and client dry runs) is set
  # to the pinned Kubernetes, as Helm's own Makefile does; else charts with kubeVersion >=1.29 fail.
  local k8s_minor="${KUBERNETES_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
  go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$k8s_minor" \
    -o "$DEST/helm" helm.sh/helm/v3/cmd/helm
}

# Prometheus' and Alertmanager's version strings (3.x for prometheus v0.3MM.P).
prom_ldflags() {
  local v="$1"
  echo "-s -w -X github.com/prometheus/common/version.Version=$v -X github.com/prometheus/common/version.Revision=module -X github.com/prometheus/common/version.Branch=release -X github.com/prometheus/common/version.BuildUser=slm-monitoring -X github.com/prometheus/common/version.BuildDate=$build_date"
}

build_prometheus() {
  local semver
  semver="$(echo "$VERSION" | sed -E 's/^v0\.3([0-9][0-9])\.([0-9]+)$/3.\1.\2/; s/^3\.0([0-9])/3.\1/')"
  wrapper "$SRC" github.com/prometheus/prometheus "$VERSION"
  cd "$SRC"
  go build -trimpath -ldflags "$(prom_ldflags "$semver")" -o "$DEST/" \
    github.com/prometheus/prometheus/cmd/prometheus github.com/prometheus/prometheus/cmd/promtool
}

build_promtool2() {
  wrapper "$SRC" github.com/prometheus/prometheus "$VERSION"
  cd "$SRC"
  go build -trimpath -ldflags "$(prom_ldflags "2.${VERSION#v0.}")" -o "$DEST/promtool2" github.com/prometheus/prometheus/cmd/promtool
}

build_alertmanager() {
  wrapper "$SRC" github.com/prometheus/alertmanager "$VERSION"
  cd "$SRC"
  go build -trimpath -ldflags "$(prom_ldflags "${VERSION#v}")" -o "$DEST/" \
    github.com/prometheus/alertmanager/cmd/alertmanager github.com/prometheus/alertmanager/cmd/amtool
}

build_kubeconform() {
  wrapper "$SRC" github.com/yannh/kubeconform "$VERSION"
  cd "$SRC"
  go build -trimpath -ldflags "-s -w" -o "$DEST/kubeconform" github.com/yannh/kubeconform/cmd/kubeconform
}

build_prometheus_operator() {
  # The operator and its config reloader, as kube-prometheus-stack runs them (one module, one build).
  # The release's go.mod replaces its two API submodules with local folders; outside the repository
  # they are required at the same version, as published.
  wrapper "$SRC" github.com/prometheus-operator/prometheus-operator "$VERSION"
  {
    echo "require github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring $VERSION"
    echo "require github.com/prometheus-operator/prometheus-operator/pkg/client $VERSION"
  } >>"$SRC/go.mod"
  cd "$SRC"
  go build -trimpath -ldflags "$(prom_ldflags "${VERSION#v}")" -o "$DEST/" \
    github.com/prometheus-operator/prometheus-operator/cmd/operator \
    github.com/prometheus-operator/prometheus-operator/cmd/prometheus-config-reloader
  mv "$DEST/operator" "$DEST/prometheus-operator"
}

fetch_kwok_stages() {
  # KWOK fakes nothing without stages: the upstream "fast" node/pod lifecycle, from the pinned module.
  local dir
  dir="$(cd /tmp && go mod download -json "sigs.k8s.io/kwok@$VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  mkdir -p "$DEST"
  for f in node/fast/node-initialize.yaml node/heartbeat/node-heartbeat.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [ -f "$dir/kustomize/stage/$f" ] || { echo "missing $f in $dir"; return 1; }
    { echo "---"; cat "$dir/kustomize/stage/$f"; } >>"$DEST/stages.yaml"
  done
}

fetch_prometheus_operator_crds() {
  # The CRDs exactly as the pinned release ships them (never written by hand).
  local dir
  dir="$(cd /tmp && go mod download -json "github.com/prometheus-operator/prometheus-operator@$VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  [ -d "$dir/example/prometheus-operator-crd" ] || { echo "no example/prometheus-operator-crd in $dir"; return 1; }
  mkdir -p "$DEST/crds"
  cp "$dir"/example/prometheus-operator-crd/*.yaml "$DEST/crds/"
  chmod -R u+w "$DEST/crds"
}

fetch_prometheus_operator_rbac() {
  # The RBAC the pinned release ships for itself and for Prometheus (example/rbac), applied by the
  # test harness as kube-prometheus-stack applies its own copy: never written by hand.
  local dir
  dir="$(cd /tmp && go mod download -json "github.com/prometheus-operator/prometheus-operator@$VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  mkdir -p "$DEST/rbac"
  for f in prometheus-operator/prometheus-operator-service-account.yaml \
           prometheus-operator/prometheus-operator-cluster-role.yaml \
           prometheus-operator/prometheus-operator-cluster-role-binding.yaml \
           prometheus/prometheus-service-account.yaml prometheus/prometheus-cluster-role.yaml \
           prometheus/prometheus-cluster-role-binding.yaml; do
    [ -f "$dir/example/rbac/$f" ] || { echo "missing example/rbac/$f in $dir"; return 1; }
    cp "$dir/example/rbac/$f" "$DEST/rbac/"
  done
  chmod -R u+w "$DEST/rbac"
}

# ---- the log plane (issue 27): the OpenTelemetry Collector and VictoriaLogs -------------------------

build_otelcol() {
  # The OpenTelemetry Collector Builder generates a collector from the manifest (only the components
  # listed there) and compiles it; both the builder and the components come from the Go module proxy.
  mkdir -p "$SRC"
  GOBIN="$SRC/bin" go install "go.opentelemetry.io/collector/cmd/builder@$OTELCOL_BUILDER_VERSION"
  "$SRC/bin/builder" --config "$OTELCOL_MANIFEST" --output-path "$SRC/dist" --ldflags "-s -w"
  cp "$SRC/dist/otelcol-slm" "$DEST/otelcol-slm"
}

build_victorialogs() {
  wrapper "$SRC" github.com/VictoriaMetrics/VictoriaLogs "$VERSION"
  cd "$SRC"
  go build -trimpath -ldflags "-s -w -X github.com/VictoriaMetrics/VictoriaMetrics/lib/buildinfo.Version=victoria-logs-$VERSION" \
    -o "$DEST/victoria-logs" github.com/VictoriaMetrics/VictoriaLogs/app/victoria-logs
}

only="${1:-all}"
want() { [ "$only" = all ] || [[ ",$only," == *",$1,"* ]]; }

want etcd && tool etcd "$ETCD_VERSION" build_etcd
want kwok && tool kwok "$KWOK_VERSION" build_kwok
want kwok && tool kwok-stages "$KWOK_VERSION" fetch_kwok_stages
# Helm's key names the Kubernetes version too: it is compiled in as Helm's default cluster version.
export KUBERNETES_VERSION HELM_VERSION
want helm && tool helm "$HELM_VERSION-k8s$KUBERNETES_VERSION" build_helm
want prometheus-operator-crds && tool prometheus-operator-crds "$PROMETHEUS_OPERATOR_VERSION" fetch_prometheus_operator_crds
want prometheus-operator && tool prometheus-operator "$PROMETHEUS_OPERATOR_VERSION" build_prometheus_operator
want prometheus-operator && tool prometheus-operator-rbac "$PROMETHEUS_OPERATOR_VERSION" fetch_prometheus_operator_rbac
want alertmanager && tool alertmanager "$ALERTMANAGER_VERSION" build_alertmanager
want prometheus && tool prometheus "$PROMETHEUS_VERSION" build_prometheus
want promtool2 && tool promtool2 "$PROMETHEUS2_VERSION" build_promtool2
want kubeconform && tool kubeconform "$KUBECONFORM_VERSION" build_kubeconform
want kubernetes && tool kubernetes "$KUBERNETES_VERSION" build_kubernetes
# The log plane: the collector's key names the builder and a hash of its manifest's lines (comments
# left out), so a component added or bumped there rebuilds it.
export OTELCOL_BUILDER_VERSION OTELCOL_MANIFEST="$here/otelcol-builder.yaml"
otelcol_key="$OTELCOL_BUILDER_VERSION-$(grep -v '^ *#' "$OTELCOL_MANIFEST" | sha256sum | cut -c1-12)"
want otelcol && tool otelcol "$otelcol_key" build_otelcol
want victorialogs && tool victorialogs "$VICTORIALOGS_VERSION" build_victorialogs

# Link the pinned versions into the checkout (.bin is git-ignored); other checkouts keep theirs.
link() { [ -e "$tools/$1/$2" ] && ln -sfn "$tools/$1/$2" "$links/$2"; }
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do link "kubernetes-$KUBERNETES_VERSION" "$b" || true; done
link "etcd-$ETCD_VERSION" etcd || true
link "kwok-$KWOK_VERSION" kwok || true
[ -f "$tools/kwok-stages-$KWOK_VERSION/stages.yaml" ] &&
  ln -sfn "$tools/kwok-stages-$KWOK_VERSION/stages.yaml" "$links/kwok-stages.yaml"
link "helm-$HELM_VERSION-k8s$KUBERNETES_VERSION" helm || true
for b in prometheus promtool; do link "prometheus-$PROMETHEUS_VERSION" "$b" || true; done
for b in alertmanager amtool; do link "alertmanager-$ALERTMANAGER_VERSION" "$b" || true; done
link "promtool2-$PROMETHEUS2_VERSION" promtool2 || true
for b in prometheus-operator prometheus-config-reloader; do link "prometheus-operator-$PROMETHEUS_OPERATOR_VERSION" "$b" || true; done
link "kubeconform-$KUBECONFORM_VERSION" kubeconform || true
[ -d "$tools/prometheus-operator-crds-$PROMETHEUS_OPERATOR_VERSION/crds" ] &&
  ln -sfn "$tools/prometheus-operator-crds-$PROMETHEUS_OPERATOR_VERSION/crds" "$links/prometheus-operator-crds"
[ -d "$tools/prometheus-operator-rbac-$PROMETHEUS_OPERATOR_VERSION/rbac" ] &&
  ln -sfn "$tools/prometheus-operator-rbac-$PROMETHEUS_OPERATOR_VERSION/rbac" "$links/prometheus-operator-rbac"
link "otelcol-$otelcol_key" otelcol-slm || true
link "victorialogs-$VICTORIALOGS_VERSION" victoria-logs || true
say "tools ready in $links ($(du -sh "$tools" 2>/dev/null | cut -f1) in $tools)"
