#!/usr/bin/env bash
# Set up banger on a Debian machine (as root): Debian packages, a virtualenv with
# banger in /opt/banger, and /usr/local/bin/banger. With --run, then boot a VM
# and open a shell in it (kernel and image are pulled/built on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null && exec sudo -E "$0" "$@"
  echo "run as root" >&2; exit 1
fi
export DEBIAN_FRONTEND=noninteractive
PKGS=(python3 python3-venv python3-dev gcc qemu-system-x86 debootstrap busybox-static e2fsprogs
      nftables iproute2 cpio zstd lz4 openssh-client ca-certificates)
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
VENV=${BANGER_VENV:-/opt/banger}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q .
ln -sf "$VENV/bin/banger" /usr/local/bin/banger
banger doctor || true
if [ "${1:-}" = "--run" ]; then
  shift
  exec banger vm run --rm "$@"
fi
