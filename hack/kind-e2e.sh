#!/usr/bin/env bash
# vmha end to end on your machine: a kind cluster (kind-config.yaml: one control plane, two
# workers) with KubeVirt in software emulation and its Sidecar feature gate, vmha's two images
# built and loaded, the chart installed, and examples/ applied: a VMGroup "web"
# (anti-affinity) with two VMs. Then it checks that the VMs run on different nodes, that the
# VMGroup reports both members ready with its policy satisfied, that KubeVirt added the
# channel hook sidecar, and that each node agent connected to its VM's channel socket.
#
# Needs: docker (running), kind, kubectl, helm 3, and internet access (KubeVirt's manifests
# and images, the CirrOS disk image, Python packages for the image builds). Takes 10-20 min.
#
#   hack/kind-e2e.sh             create or reuse the cluster, install, check; keep the cluster
#   hack/kind-e2e.sh --delete    the same, then delete the cluster (also after a failure)
#
# Settings (environment): KUBEVIRT_VERSION, CLUSTER_NAME (vmha), IMAGE_TAG (dev),
# NAMESPACE (vmha-system), DEMO_NAMESPACE (vmha-demo). docs/install.md explains each step.
set -euo pipefail

# The one place KubeVirt's version is pinned (any release with the Sidecar feature gate).
KUBEVIRT_VERSION="${KUBEVIRT_VERSION:-v1.6.0}"
CLUSTER_NAME="${CLUSTER_NAME:-vmha}"
IMAGE_TAG="${IMAGE_TAG:-dev}"
NAMESPACE="${NAMESPACE:-vmha-system}"
DEMO_NAMESPACE="${DEMO_NAMESPACE:-vmha-demo}"
RELEASE=vmha
AGENT_METRICS_PORT=9810

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
context="kind-$CLUSTER_NAME"
operator_image="vmha/operator:$IMAGE_TAG"
agent_image="vmha/node-agent:$IMAGE_TAG"
delete_cluster=false

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'kind-e2e: error: %s\n' "$*" >&2; exit 1; }
k() { kubectl --context "$context" "$@"; }

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

parse_args() {
  while (($#)); do
    case $1 in
      --delete) delete_cluster=true ;;
      -h | --help) usage; exit 0 ;;
      *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
  done
}

require_tools() {
  local tool
  for tool in docker kind kubectl helm; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
  done
  docker info >/dev/null 2>&1 || die "docker is not running (docker info failed)"
}

# Runs "$@" until it succeeds or $1 seconds pass; $2 describes what we wait for.
retry() {
  local timeout=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${timeout} s waiting for $what"
    sleep 5
  done
}

create_cluster() {
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
    log "reusing kind cluster $CLUSTER_NAME"
  else
    log "creating kind cluster $CLUSTER_NAME (kind-config.yaml)"
    kind create cluster --name "$CLUSTER_NAME" --config "$repo_root/kind-config.yaml" --wait 5m
  fi
}

install_kubevirt() {
  local release="https://github.com/kubevirt/kubevirt/releases/download/$KUBEVIRT_VERSION"
  log "installing KubeVirt $KUBEVIRT_VERSION (software emulation, feature gate Sidecar)"
  k apply -f "$release/kubevirt-operator.yaml"
  k wait crd/kubevirts.kubevirt.io --for condition=Established --timeout 2m
  # kind nodes have no /dev/kvm: QEMU emulates the CPU (useEmulation). The Sidecar gate lets
  # the vmha operator add its channel through a hook sidecar.
  k apply -f - <<EOF
apiVersion: kubevirt.io/v1
kind: KubeVirt
metadata:
  name: kubevirt
  namespace: kubevirt
spec:
  configuration:
    developerConfiguration:
      useEmulation: true
      featureGates: [Sidecar]
EOF
  k -n kubevirt wait kubevirt/kubevirt --for condition=Available --timeout 15m
}

build_images() {
  log "building $operator_image and $agent_image"
  docker build -f "$repo_root/images/operator.Dockerfile" -t "$operator_image" "$repo_root"
  docker build -f "$repo_root/images/node-agent.Dockerfile" -t "$agent_image" "$repo_root"
  log "loading the images into the kind nodes"
  kind load docker-image --name "$CLUSTER_NAME" "$operator_image" "$agent_image"
}

install_chart() {
  log "installing the vmha chart into namespace $NAMESPACE"
  k create namespace "$NAMESPACE" --dry-run=client -o yaml | k apply -f -
  # The node agent mounts the kubelet's pod directory (hostPath): privileged Pod Security.
  k label namespace "$NAMESPACE" pod-security.kubernetes.io/enforce=privileged --overwrite
  # Helm installs crds/ only on first install; applying them keeps them current.
  k apply --server-side --force-conflicts -f "$repo_root/charts/vmha/crds/"
  helm upgrade --install "$RELEASE" "$repo_root/charts/vmha" \
    --kube-context "$context" --namespace "$NAMESPACE" \
    --set "operator.image.tag=$IMAGE_TAG" --set "nodeAgent.image.tag=$IMAGE_TAG" \
    --wait --timeout 5m
}

apply_examples() {
  log "applying examples/ in namespace $DEMO_NAMESPACE"
  k create namespace "$DEMO_NAMESPACE" --dry-run=client -o yaml | k apply -f -
  # Files in name order: the VMGroup exists before its VMs ask to join it.
  k -n "$DEMO_NAMESPACE" apply -f "$repo_root/examples/"
}

vmi_node() { k -n "$DEMO_NAMESPACE" get vmi "$1" -o jsonpath='{.status.nodeName}'; }

# The metrics of the node agent on node $1, through the apiserver's pod proxy.
agent_metrics() {
  local pod
  pod="$(k -n "$NAMESPACE" get pods -l app.kubernetes.io/component=node-agent \
    --field-selector "spec.nodeName=$1" -o jsonpath='{.items[0].metadata.name}')"
  k get --raw "/api/v1/namespaces/$NAMESPACE/pods/$pod:$AGENT_METRICS_PORT/proxy/metrics"
}

agent_connected_to() {
  agent_metrics "$1" | grep -Eq "^vmha_channel_connected\{[^}]*vm=\"$2\"[^}]*\} 1(\.0)?$"
}

has_hook_sidecar() {
  local uid
  uid="$(k -n "$DEMO_NAMESPACE" get vmi "$1" -o jsonpath='{.metadata.uid}')"
  k -n "$DEMO_NAMESPACE" get pods -l "kubevirt.io/created-by=$uid" \
    -o jsonpath='{.items[*].spec.containers[*].name}' | grep -qw 'hook-sidecar-0'
}

check() {
  local vm node_1 node_2
  log "waiting for the VMs to run (software emulation is slow)"
  for vm in web-1 web-2; do
    retry 600 "VMI $vm" k -n "$DEMO_NAMESPACE" get vmi "$vm"
    k -n "$DEMO_NAMESPACE" wait "vmi/$vm" --for condition=Ready --timeout 15m
  done

  log "checking placement: anti-affinity puts web-1 and web-2 on different nodes"
  node_1="$(vmi_node web-1)" node_2="$(vmi_node web-2)"
  [[ -n $node_1 && $node_1 != "$node_2" ]] || die "web-1 on '$node_1', web-2 on '$node_2'"
  echo "web-1 on $node_1, web-2 on $node_2"

  log "checking the VMGroup's status"
  k -n "$DEMO_NAMESPACE" wait vmgroup/web --for=jsonpath='{.status.readyMembers}'=2 --timeout 5m
  k -n "$DEMO_NAMESPACE" wait vmgroup/web --for condition=PolicySatisfied --timeout 2m
  k -n "$DEMO_NAMESPACE" wait vmgroup/web --for condition=Ready --timeout 2m

  log "checking the vmha channel: hook sidecar in virt-launcher, node agents connected"
  for vm in web-1 web-2; do
    has_hook_sidecar "$vm" || die "the virt-launcher pod of $vm has no hook-sidecar-0 container"
  done
  retry 300 "the node agent on $node_1 to connect to web-1" agent_connected_to "$node_1" web-1
  retry 300 "the node agent on $node_2 to connect to web-2" agent_connected_to "$node_2" web-2

  k -n "$DEMO_NAMESPACE" get vmgroups -o wide
  k -n "$DEMO_NAMESPACE" get vmis -o wide
  log "all checks passed"
}

diagnose() {
  log "failed; the state of things"
  k get pods -A -o wide || true
  k -n "$DEMO_NAMESPACE" describe vmgroup web || true
  k -n "$DEMO_NAMESPACE" get vms,vmis -o wide || true
  k -n "$NAMESPACE" logs -l app.kubernetes.io/component=operator --tail 50 || true
  k -n "$NAMESPACE" logs -l app.kubernetes.io/component=node-agent --tail 50 --prefix || true
}

finish() {
  local status=$?
  ((status == 0)) || diagnose
  if [[ $delete_cluster == true ]]; then
    log "deleting kind cluster $CLUSTER_NAME"
    kind delete cluster --name "$CLUSTER_NAME" || true
  elif ((status == 0)); then
    printf '\nThe cluster stays: kubectl --context %s ...; delete it with: kind delete cluster --name %s\n' \
      "$context" "$CLUSTER_NAME" >&2
  fi
  exit "$status"
}

main() {
  parse_args "$@"
  require_tools
  trap finish EXIT
  create_cluster
  install_kubevirt
  build_images
  install_chart
  apply_examples
  check
}

main "$@"
