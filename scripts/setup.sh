#!/usr/bin/env bash
# Set up banger on a Debian machine (as root): Debian packages, a virtualenv with
# banger in /opt/banger, and /usr/local/bin/banger. With --run, then boot a VM
# and open a shell in it (kernel and image are pulled/built on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
as_root "$0" "$@"
apt_ensure "${RUNTIME_PKGS[@]}"
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
