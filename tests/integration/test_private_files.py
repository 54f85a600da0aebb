"""Other local users get nothing: after a create, a snapshot and a restore (the Firecracker double, the
real CLI in its own processes, in a throwaway netns) no file or directory under BANGER_HOME or BANGER_RUN
is readable, writable or enterable by group or other; `doctor` reports a home left open (0755 dirs, 0644
files) and `doctor --fix` closes it; a command on an existing 0755 home tightens the top directories."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.fc import FAKE_FC, running_fc_vm, wait_event
from tests.support.netns import netns  # noqa: F401


def offenders(*roots: Path) -> list[str]:
    """Independent walk (not banger's own doctor code): every path with a group/other bit, symlinks aside."""
    bad = []
    for root in roots:
        for d, _dirs, files in os.walk(root):
            for p in [d, *(os.path.join(d, f) for f in files)]:
                st = os.lstat(p)
                if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                    bad.append(f"{p} {stat.S_IMODE(st.st_mode):04o}")
    return bad


@pytest.fixture
def fcns(netns, tmp_path):
    rec = tmp_path / "fc-record"
    rec.mkdir()
    conf = tmp_path / "config.toml"
    conf.write_text(f'firecracker_bin = "{FAKE_FC}"\nbackend = "firecracker"\n')
    netns.env.update(BANGER_CONFIG=str(conf), FAKE_FIRECRACKER_RECORD=str(rec))
    netns.rec = rec
    netns.shared = tmp_path / "shared"
    try:
        yield netns
    finally:
        for v in netns.banger_json("vm", "list", check=False).get("data") or []:
            netns.banger_json("vm", "delete", "-f", v["id"], check=False)


def test_nothing_under_the_homes_is_open_to_others(fcns):
    ns = fcns
    ns.banger_json("pool", "warm", "2")
    src = running_fc_vm(ns, "priv-src", ns.shared)
    snap = ns.banger_json("snapshot", "create", "priv-src", "priv-snap")["data"]
    clone = ns.banger_json("snapshot", "restore", "priv-snap", "--name", "priv-clone", "--no-wait")["data"]
    h = json.loads((ns.home / "vms" / clone["id"] / "handles.json").read_text())
    wait_event(ns.rec, h["pid"], "memory_verified", timeout=120)  # the UFFD handler has written its log
    # what we walk really holds the private things: disks, guest memory, keys, the database, logs, sockets
    names = {p.name for p in ns.home.rglob("*")} | {p.name for p in ns.run_dir.rglob("*")}
    assert {"vm.mem", "vm.state", "overlay.ext4", "work.ext4", "state.db", "known_hosts", "serial.log",
            "handles.json", "meta.json"} <= names, names
    assert Path(snap["dir"], "vm.mem").stat().st_size == 128 << 20
    ns.banger_json("vm", "stop", "-f", "priv-clone")
    ns.banger_json("vm", "start", "priv-clone", "--no-wait")  # a cold boot of the restored clone's disks
    assert offenders(ns.home, ns.run_dir) == []
    assert src["id"] != clone["id"]


def _banger(env, *args):
    cp = subprocess.run([sys.executable, "-m", "banger.cli.main", *args, "--json"], env=env, capture_output=True,
                        text=True, timeout=300)
    return cp.returncode, json.loads(cp.stdout)


def _private_check(doc):
    return next(c for c in doc["data"]["checks"] if c["name"] == "private-files")


def test_doctor_flags_an_open_home_and_fix_closes_it(banger_env):
    env, home, run = banger_env["env"], banger_env["home"], banger_env["run"]
    assert _banger(env, "snapshot", "list")[0] == 0  # creates state.db, locks/...
    (home / "vms" / "abc").mkdir(parents=True)
    disk = home / "vms" / "abc" / "overlay.ext4"
    disk.write_bytes(b"\0" * 4096)
    # a home laid out by an older banger (umask 022): every dir 0755, every file 0644
    for d, _dirs, files in os.walk(home):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    os.chmod(run, 0o755)
    (home / "staging" / "build-1" / "tree" / "etc").mkdir(parents=True)
    guest_file = home / "staging" / "build-1" / "tree" / "etc" / "passwd"
    guest_file.write_text("root:x:0:0::/root:/bin/sh\n")
    os.chmod(guest_file, 0o644)
    os.chmod(home / "staging" / "build-1", 0o755)
    before = offenders(home, run)
    assert f"{home} 0755" in before and f"{disk} 0644" in before and f"{run} 0755" in before

    rc, doc = _banger(env, "doctor")
    c = _private_check(doc)
    assert rc == 6 and c["status"] == "fail" and "doctor --fix" in c["hint"], c
    assert str(disk) in c["detail"] or "more" in c["detail"]
    assert oct(os.stat(home).st_mode & 0o777) == "0o755"  # doctor itself reports, it does not tighten

    rc, doc = _banger(env, "doctor", "--fix")
    assert _private_check(doc)["status"] == "ok", doc
    assert doc["data"]["installed"] == [] and str(disk) in doc["data"]["tightened"]
    left = offenders(home, run)
    # only the guest tree inside a staging build dir keeps its guest modes (its 0700 parent guards it)
    assert all("/staging/build-1/" in p for p in left), left
    assert stat.S_IMODE(guest_file.stat().st_mode) == 0o644
    assert stat.S_IMODE((home / "staging" / "build-1").stat().st_mode) == 0o700
    assert stat.S_IMODE(disk.stat().st_mode) == 0o600


def test_any_command_tightens_the_top_dirs_of_an_existing_home(banger_env):
    env, home, run = banger_env["env"], banger_env["home"], banger_env["run"]
    os.chmod(home, 0o755)
    os.chmod(run, 0o755)
    assert _banger(env, "vm", "list")[0] == 0  # the typer-free fast path
    assert stat.S_IMODE(home.stat().st_mode) == 0o700 and stat.S_IMODE(run.stat().st_mode) == 0o700
    os.chmod(home, 0o711)
    assert _banger(env, "image", "list")[0] == 0
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_a_fresh_home_is_private_from_the_start(tmp_path):
    home, run = tmp_path / "new" / "home", Path(f"/tmp/bgr-new-{os.getpid()}-{time.monotonic_ns()}")
    env = {**os.environ, "BANGER_HOME": str(home), "BANGER_RUN": str(run)}
    try:
        assert _banger(env, "snapshot", "list")[0] == 0
        assert _banger(env, "vm", "show", "nope")[0] == 3
        assert (home / "state.db").exists()
        assert offenders(home) == []
    finally:
        subprocess.run(["rm", "-rf", str(run)], check=False)
