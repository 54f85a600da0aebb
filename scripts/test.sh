#!/usr/bin/env bash
# Run banger's whole test suite (unit, integration, e2e under QEMU) as root.
# Installs what the tests need (Debian packages, nox) first; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null && exec sudo -E "$0" "$@"
  echo "the tests need root (network namespaces, TAP, loop devices, userfaultfd)" >&2; exit 1
fi
export DEBIAN_FRONTEND=noninteractive
PKGS=(python3 python3-venv python3-dev gcc qemu-system-x86 debootstrap busybox-static e2fsprogs e2tools
      nftables iproute2 cpio zstd lz4 openssh-client ca-certificates docker-registry)
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# apt-get download (kernel pulls) needs package lists
compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null || apt-get update -q
TOOLS=${BANGER_TOOLS_VENV:-/opt/banger-tools}
[ -x "$TOOLS/bin/nox" ] || { python3 -m venv "$TOOLS" && "$TOOLS/bin/pip" install -q nox; }
exec "$TOOLS/bin/nox" -s lint tests -- "$@"
