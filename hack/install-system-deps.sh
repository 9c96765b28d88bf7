#!/usr/bin/env bash
# Installs the Debian packages that the tests and the demo need, if any is missing.
# Idempotent and quick when everything is present; needs root (or sudo) to install.
set -euo pipefail

packages=(
  qemu-system-x86      # the end-to-end tier boots real guests under TCG
  linux-image-amd64    # the guests' kernel and virtio modules
  busybox-static       # the guests' userland
  kmod binutils        # module dependencies; strip to keep the guest image small
  etcd-server          # the integration tier's control plane
  prometheus           # promtool and a real Prometheus for alert tests
  shellcheck
)

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
((${#missing[@]} == 0)) && exit 0

echo "installing system packages: ${missing[*]}" >&2
sudo=()
if ((EUID != 0)); then
  command -v sudo >/dev/null || { echo "run as root: apt-get install ${missing[*]}" >&2; exit 1; }
  sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
