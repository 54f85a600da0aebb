"""banger-init's resident perl helper (entropy, clock, address, the standby sshd's FIFO), run for real by
dash through the --check-helper and --check-standby hooks: RNDADDENTROPY + RNDRESEEDCRNG succeed as root and are refused without
CAP_SYS_ADMIN (a user namespace), and the address change (SIOCSIFHWADDR / SIOCSIFADDR / SIOCSIFNETMASK /
SIOCADDRT) is applied to a TAP inside a throwaway network namespace, checked independently with `ip`.
The hook never sets the clock (this runs on a host)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.support.netns import create_netns, delete_netns, run_in_ns

INIT = Path(__file__).resolve().parents[2] / "banger" / "data" / "guest" / "banger-init"
HEX = os.urandom(32).hex()


def _hook(tmp_path, *args, env=None, prefix=()):
    e = {**os.environ, "BANGER_INIT_HELPER_DIR": str(tmp_path / "helper"), **(env or {})}
    cp = subprocess.run([*prefix, shutil.which("dash"), str(INIT), "--check-helper", *args], capture_output=True,
                        text=True,
                        env=e, timeout=30)
    return cp.stdout.splitlines()


def test_helper_reseeds_and_stays_resident(tmp_path):
    out = _hook(tmp_path, HEX)
    assert out == ["first ok reseeded helper=1", "second ok reseeded helper=1"]


def test_helper_refused_without_cap_sys_admin(tmp_path):
    out = _hook(tmp_path, HEX, prefix=("unshare", "-r"))
    assert out[0] == "first error RNDADDENTROPY helper=1"  # reported, never silently "reseeded"


def test_without_perl_the_bytes_are_only_mixed(tmp_path):
    """An image without perl: banger-init says so ("mixed": written to the pool, not credited, no
    immediate reseed). perl is hidden by an empty, non-executable file bound over it in a private mount
    namespace (banger-init sets its own PATH)."""
    perl = shutil.which("perl")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    script = f'mount --bind {empty} {perl} && exec "$@"'
    out = _hook(tmp_path, HEX, prefix=("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"))
    assert out[0] == "no helper" and out[1] == "first ok mixed helper=0", out


def test_helper_readdresses_a_link_in_a_netns(tmp_path):
    ns = create_netns("bgh")
    try:
        for argv in (["ip", "tuntap", "add", "bh0", "mode", "tap"], ["ip", "link", "set", "bh0", "up"],
                     ["ip", "addr", "add", "10.77.0.5/24", "dev", "bh0"],
                     ["ip", "route", "add", "default", "via", "10.77.0.1", "dev", "bh0", "onlink"]):
            run_in_ns(ns, argv, check=True)
        env = {**os.environ, "BANGER_INIT_HELPER_DIR": str(tmp_path / "helper"), "BANGER_INIT_TEST_IFACE": "bh0"}
        cp = run_in_ns(ns, ["dash", str(INIT), "--check-helper", HEX, "10.77.0.42 24 10.77.0.1 06:00:0a:4d:00:2a"],
                       env, check=True)
        assert cp.stdout.splitlines()[-1] == "net ok"
        link = json.loads(run_in_ns(ns, ["ip", "-j", "addr", "show", "dev", "bh0"], check=True).stdout)[0]
        assert link["address"] == "06:00:0a:4d:00:2a"
        assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"] == [("10.77.0.42", 24)]
        routes = json.loads(run_in_ns(ns, ["ip", "-j", "route", "show", "default"], check=True).stdout)
        assert [(r["gateway"], r["dev"]) for r in routes] == [("10.77.0.1", "bh0")]
        bad = run_in_ns(ns, ["dash", str(INIT), "--check-helper", HEX, "10.77.0.42 24 10.77.0.1 06:00:0a:4d:00:2a"],
                        {**env, "BANGER_INIT_TEST_IFACE": "nonexistent0"}, check=True)
        assert bad.stdout.splitlines()[-1] == "net error mac"
    finally:
        delete_netns(ns)


def test_standby_fifo_handover(tmp_path):
    """The standby verbs (banger-init's comments): sbdir makes a FIFO with a second name; sbwait returns once
    the reader sleeps opening the FIFO's first name (here `cat`, standing in for sshd) and turns that name
    into a symlink to the real key (and key.pub); sbfeed hands the key over through the second name; with
    no reader left, sbfeed fails at once instead of blocking the control loop; sbwait on a process that is
    gone fails too, and looking once at a process that sleeps elsewhere fails at once."""
    key = tmp_path / "hostkey"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n")
    (tmp_path / "hostkey.pub").write_text("ssh-ed25519 AAAA root@x\n")
    sb = tmp_path / "sb1"
    e = {**os.environ, "BANGER_INIT_HELPER_DIR": str(tmp_path / "helper")}
    t0 = time.monotonic()
    cp = subprocess.run([shutil.which("dash"), str(INIT), "--check-standby", str(sb), str(key)], capture_output=True,
                        text=True, env=e, timeout=60)
    assert cp.stdout.splitlines() == ["sbdir ok", "sbwait ok", "sbfeed ok", "again error nostandby",
                                      "gone error gone", "once error timeout"], cp.stdout + cp.stderr
    assert time.monotonic() - t0 < 20  # "look once" (a live process that sleeps elsewhere) does not wait
    assert (tmp_path / "sb1.got").read_text() == key.read_text()  # what the reader got through the FIFO
    assert os.readlink(sb / "key") == str(key) and os.readlink(sb / "key.pub") == str(key) + ".pub"
    assert (sb / "w").is_fifo() and (sb / "w").stat().st_mode & 0o777 == 0o600
    assert sb.stat().st_mode & 0o777 == 0o700
