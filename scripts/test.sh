#!/usr/bin/env bash
# Run banger's whole test suite (lint, unit, integration, e2e under QEMU, then the smoke suite) as root.
# Installs what the tests need (Debian packages, nox) first; idempotent.
# Arguments go to pytest, e.g. ./scripts/test.sh tests/unit -q
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
as_root "$0" "$@"
apt_ensure "${RUNTIME_PKGS[@]}" e2tools docker-registry
# apt-get download (kernel pulls) needs package lists
compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null || apt-get update -q
TOOLS=${BANGER_TOOLS_VENV:-/opt/banger-tools}
[ -x "$TOOLS/bin/nox" ] || { python3 -m venv "$TOOLS" && "$TOOLS/bin/pip" install -q nox; }
if [ $# -gt 0 ]; then  # a selection of tests: just those
  exec "$TOOLS/bin/nox" -s lint tests -- "$@"
fi
# the whole suite, then the smoke suite (user-level scenarios 4 at a time on one shared home + netns,
# then the global ones alone)
"$TOOLS/bin/nox" -s lint tests
exec "$TOOLS/bin/nox" -s smoke
