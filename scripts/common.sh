# Sourced by setup.sh and test.sh: run as root (re-exec with sudo), install missing Debian packages.
as_root() {  # as_root "$0" "$@"
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null && exec sudo -E "$@"
    echo "run as root (banger needs network namespaces, TAP, loop devices, userfaultfd)" >&2; exit 1
  fi
}

apt_ensure() {  # apt_ensure PKG...: install those not installed yet (idempotent)
  export DEBIAN_FRONTEND=noninteractive
  local missing=() p
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

# What banger needs at run time (doctor --fix installs the same set).
RUNTIME_PKGS=(python3 python3-venv python3-dev gcc qemu-system-x86 debootstrap busybox-static e2fsprogs
              nftables iproute2 cpio zstd lz4 openssh-client ca-certificates)
