"""banger-init applying the `@banger net` control line (what a restored clone receives on its console),
run for real in throwaway UTS + network namespaces (unshare -u -n) with a TAP as eth0: the address, MAC,
route, kernel hostname AND /etc/hostname become the clone's own (before: /etc/hostname kept the source's
name)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

INIT = Path(__file__).resolve().parents[2] / "banger" / "data" / "guest" / "banger-init"

SCRIPT = """
set -e
ip tuntap add dev eth0 mode tap
BANGER_INIT_HOSTNAME_FILE="$1" dash "$2" --apply-net "$3"
echo "kernel=$(cat /proc/sys/kernel/hostname)"
ip -j addr show dev eth0
ip -j route show default
"""


def test_restored_clone_gets_its_own_etc_hostname(tmp_path):
    hf = tmp_path / "hostname"
    hf.write_text("src-1\n")
    hf.chmod(0o644)
    line = "@banger net 172.30.0.9/24 172.30.0.1 06:00:ac:1e:00:09 clone-7"
    cp = subprocess.run(["unshare", "-u", "-n", "sh", "-c", SCRIPT, "sh", str(hf), str(INIT), line],
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr + cp.stdout
    out = cp.stdout.splitlines()
    assert "banger-init: net 172.30.0.9/24" in out
    assert "kernel=clone-7" in out
    assert hf.read_text() == "clone-7\n" and hf.stat().st_mode & 0o777 == 0o644
    addr = json.loads(out[-2])[0]
    assert addr["address"] == "06:00:ac:1e:00:09"
    assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"] if a["family"] == "inet"] == [("172.30.0.9", 24)]
    assert json.loads(out[-1])[0]["gateway"] == "172.30.0.1"


def test_an_invalid_line_changes_nothing(tmp_path):
    hf = tmp_path / "hostname"
    hf.write_text("src-1\n")
    cp = subprocess.run(["unshare", "-u", "-n", "sh", "-c", SCRIPT, "sh", str(hf), str(INIT),
                         "@banger net 172.30.0.9/24 172.30.0.1 06:00:ac:1e:00:09 ../../etc"],
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode != 0 and "invalid" in cp.stdout
    assert hf.read_text() == "src-1\n"
