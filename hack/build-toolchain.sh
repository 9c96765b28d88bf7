#!/usr/bin/env bash
# Builds what vmha's local control plane and chart checks need, into a cache keyed by version:
#   $VMHA_CACHE/kube/<version>/bin/{kube-apiserver,kubectl}   built from the Go module proxy
#   $VMHA_CACHE/helm/<version>/bin/helm                       go install from the Go module proxy
#   $VMHA_CACHE/prometheus-operator/<version>/crds/*.yaml     from the prometheus-operator module
#   $VMHA_CACHE/cert-manager/<version>/crds/*.yaml            from the cert-manager module
# VMHA_CACHE defaults to ~/.cache/vmha. Versions: hack/kube-toolchain/versions.env.
# Idempotent (skips what exists) and safe to run concurrently (one build at a time holds a lock).
# Each result is assembled in a temporary directory and renamed into place, so an interrupted
# build never leaves something a later run would mistake for finished.
set -euo pipefail

module_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/kube-toolchain"

# versions.env holds plain KEY=VALUE lines (Python reads it too), so it is parsed, not sourced.
KUBE_VERSION='' HELM_VERSION='' PROMETHEUS_OPERATOR_VERSION='' CERT_MANAGER_VERSION=''
while IFS='=' read -r key value; do
  case $key in
    KUBE_VERSION | HELM_VERSION | PROMETHEUS_OPERATOR_VERSION | CERT_MANAGER_VERSION)
      printf -v "$key" '%s' "$value"
      ;;
  esac
done <"$module_dir/versions.env"
for key in KUBE_VERSION HELM_VERSION PROMETHEUS_OPERATOR_VERSION CERT_MANAGER_VERSION; do
  [[ -n ${!key} ]] || { echo "build-toolchain: $key missing in $module_dir/versions.env" >&2; exit 1; }
done

cache="${VMHA_CACHE:-$HOME/.cache/vmha}"
kube_dir="$cache/kube/$KUBE_VERSION/bin"
helm_dir="$cache/helm/$HELM_VERSION/bin"
prometheus_crd_dir="$cache/prometheus-operator/$PROMETHEUS_OPERATOR_VERSION/crds"
cert_manager_crd_dir="$cache/cert-manager/$CERT_MANAGER_VERSION/crds"

# Static binaries, as Kubernetes and Helm release them: no C toolchain needed.
export CGO_ENABLED=0

log() { printf 'build-toolchain: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

staging=()
cleanup() { ((${#staging[@]} == 0)) || rm -rf "${staging[@]}"; }
trap cleanup EXIT

# Prints a fresh temporary directory next to $1 (same file system, so the final mv is a rename).
new_staging_dir() {
  local dir
  mkdir -p "$(dirname "$1")"
  dir="$(mktemp -d "$1.tmp.XXXXXX")"
  chmod 0755 "$dir" # mktemp makes it private; the published directory should not be
  printf '%s\n' "$dir"
}

# Moves a finished staging directory to its final place.
publish() {
  local staged=$1 final=$2
  rm -rf "$final"
  mv -T "$staged" "$final"
}

# The wrapper module's go.mod must pin the same Kubernetes release as versions.env, with every
# staging module replaced by the matching v0.Y.Z.
check_go_mod() {
  local staging_version="v0.${KUBE_VERSION#v1.}" wrong
  grep -Eq "^[[:space:]]*k8s\.io/kubernetes $KUBE_VERSION\b" "$module_dir/go.mod" ||
    die "hack/kube-toolchain/go.mod does not require k8s.io/kubernetes $KUBE_VERSION (versions.env)"
  wrong="$(grep -E '=> k8s\.io/[a-z0-9-]+ v' "$module_dir/go.mod" | grep -v " $staging_version\$" || true)"
  [[ -z $wrong ]] || die "staging replaces in hack/kube-toolchain/go.mod not at $staging_version: $wrong"
}

# -X flags that make `kubectl version` report $KUBE_VERSION for client and server, as
# Kubernetes' own hack/lib/version.sh does. There is no git commit in a module download.
kube_version_ldflags() {
  local minor="${KUBE_VERSION#v1.}" build_date pkg flags=()
  minor="${minor%%.*}"
  build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=(
      "-X $pkg.gitVersion=$KUBE_VERSION"
      "-X $pkg.gitMajor=1"
      "-X $pkg.gitMinor=$minor"
      "-X $pkg.gitCommit="
      "-X $pkg.gitTreeState="
      "-X $pkg.buildDate=$build_date"
    )
  done
  printf '%s ' -s -w "${flags[@]}"
}

build_kube() {
  if [[ -x $kube_dir/kube-apiserver && -x $kube_dir/kubectl ]]; then
    return
  fi
  check_go_mod
  log "building kube-apiserver and kubectl $KUBE_VERSION from the Go module proxy (minutes when the Go caches are cold)"
  local start=$SECONDS out
  out="$(new_staging_dir "$kube_dir")"
  staging+=("$out")
  (cd "$module_dir" && go build -trimpath -ldflags "$(kube_version_ldflags)" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl)
  publish "$out" "$kube_dir"
  log "built kube-apiserver and kubectl $KUBE_VERSION in $((SECONDS - start)) s -> $kube_dir"
}

build_helm() {
  if [[ -x $helm_dir/helm ]]; then
    return
  fi
  log "building helm $HELM_VERSION from the Go module proxy"
  local start=$SECONDS out
  out="$(new_staging_dir "$helm_dir")"
  staging+=("$out")
  GOBIN="$out" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  publish "$out" "$helm_dir"
  log "built helm $HELM_VERSION in $((SECONDS - start)) s -> $helm_dir"
}

# Copies CRD manifests out of a Go module (the projects publish them there):
#   fetch_module_crds <what> <module@version> <glob inside the module> <destination dir>
fetch_module_crds() {
  local what=$1 module=$2 pattern=$3 dest=$4
  if compgen -G "$dest/*.yaml" >/dev/null; then
    return
  fi
  log "fetching the $what CRDs from $module"
  local start=$SECONDS out source_dir
  out="$(new_staging_dir "$dest")"
  staging+=("$out")
  # Run outside any Go module: the download must not touch a go.mod/go.sum.
  source_dir="$(cd "$out" && GOWORK=off go mod download -json "$module" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
  [[ -n $source_dir ]] || die "go mod download printed no Dir for $module"
  # shellcheck disable=SC2086 # $pattern is a glob, expanded here on purpose
  compgen -G "$source_dir/"$pattern >/dev/null || die "no $pattern in $module"
  # Module cache files are read-only; copies should be ordinary files.
  # shellcheck disable=SC2086
  install -m 0644 "$source_dir/"$pattern "$out/"
  publish "$out" "$dest"
  log "fetched the $what CRDs in $((SECONDS - start)) s -> $dest"
}

main() {
  command -v go >/dev/null || die "Go is needed to build the toolchain (https://go.dev/dl/)"
  mkdir -p "$cache"
  exec 9>"$cache/.build-toolchain.lock"
  if ! flock -n 9; then
    log "another build holds $cache/.build-toolchain.lock; waiting for it"
    flock 9
  fi
  build_kube
  build_helm
  fetch_module_crds "Prometheus Operator" \
    "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
    "example/prometheus-operator-crd/*.yaml" "$prometheus_crd_dir"
  fetch_module_crds "cert-manager" "github.com/cert-manager/cert-manager@$CERT_MANAGER_VERSION" \
    "deploy/crds/cert-manager.io_*.yaml" "$cert_manager_crd_dir"
}

main "$@"
