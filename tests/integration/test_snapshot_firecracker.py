# ruff: noqa: F811  (pytest fixtures imported from tests.support are re-declared as arguments)
"""`banger snapshot ...` end to end on the Firecracker backend (the strict double), in a throwaway netns.

The whole product runs: the real CLI in its own processes, real SQLite rows, real
flock, real TAPs from the pool on a real bridge (in the namespace), the double as
Firecracker, banger's real UFFD handler serving the double's real page faults.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from banger.host import procs
from tests.support.fc import FAKE_FC, events, records, running_fc_vm, wait_event
from tests.support.netns import netns  # noqa: F401


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
        left = netns.banger_json("vm", "list", check=False).get("data") or []
        for v in left:
            netns.banger_json("vm", "delete", "-f", v["id"], check=False)
        # independent leak check: no double/handler/supervisor process for this env, no claimed TAP
        deadline = time.monotonic() + 10
        while _our_processes(netns) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _our_processes(netns)
        assert not _claimed_taps(netns)


def _our_processes(ns) -> list[str]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (str(ns.run_dir) in cmd or str(ns.home) in cmd) and "banger.cli.main" not in cmd:
            out.append(cmd[:160])
    return out


def _claimed_taps(ns) -> list[str]:
    with sqlite3.connect(ns.home / "state.db") as c:
        return [r[0] for r in c.execute("SELECT name FROM taps WHERE state = 'claimed'")]


def _handles(ns, vm_id: str) -> dict:
    return json.loads((ns.home / "vms" / vm_id / "handles.json").read_text())


def test_snapshot_create_list_restore_rm(fcns):
    ns = fcns
    src = running_fc_vm(ns, "src-1", ns.shared)
    src_seed = events(ns.rec, src["pid"], "boot")[0]["seed"]

    snap = ns.banger_json("snapshot", "create", "src-1", "snap-1")["data"]
    assert snap["name"] == "snap-1" and snap["vm_name"] == "src-1" and snap["backend"] == "firecracker"
    sdir = Path(snap["dir"])
    assert sorted(p.name for p in sdir.iterdir()) == ["known_hosts", "meta.json", "overlay.ext4", "vm.mem",
                                                      "vm.state", "work.ext4"]
    assert (sdir / "vm.mem").stat().st_size == 128 << 20
    assert (sdir / "overlay.ext4").read_bytes()[:20] == b"overlay.ext4 of src-1"[:20]
    # the source was paused for the snapshot and resumed afterwards
    src_reqs = [(r["method"], r["path"], (r.get("body") or {}).get("state")) for r in events(ns.rec, src["pid"],
                                                                                            "request")]
    i = src_reqs.index(("PUT", "/snapshot/create", None))
    assert ("PATCH", "/vm", "Paused") in src_reqs[:i] and src_reqs[-1] == ("PATCH", "/vm", "Resumed")
    assert ns.banger_json("vm", "show", "src-1")["data"]["state"] == "running"

    listed = ns.banger_json("snapshot", "list")["data"]
    assert [s["name"] for s in listed] == ["snap-1"]
    dup = ns.banger_json("snapshot", "create", "src-1", "snap-1", check=False)
    assert dup["_exit"] == 4 and dup["error"]["code"] == "conflict"

    # restore a clone: its own name, IP, MAC, TAP and disks; the guest is told its new address
    clone = ns.banger_json("snapshot", "restore", "snap-1", "--name", "clone-1", "--no-wait")["data"]
    assert clone["state"] == "running" and clone["restored_from"] == "snap-1"
    assert clone["ip"] != src["ip"] and clone["mac"] != src["mac"]
    assert clone["restore"]["mem_backend"] == "Uffd"
    stages = [s["stage"] for s in clone["stages"] if s["op"] == "restore"]
    assert stages == ["snapshot.check", "snapshot.verify", "prepare", "disk.copy", "net.tap", "net.isolate",
                      "vmm.restore", "snapshot.release", "guest.net", "net.join", "snapshot.verified", "net.unlearn"]
    h = _handles(ns, clone["id"])
    assert h["tap"] != src["tap"] and procs.alive(h["uffd_pid"], h["uffd_pid_start"])
    load = wait_event(ns.rec, h["pid"], "snapshot_load")
    assert load["seed"] == src_seed and load["backend"]["type"] == "Uffd"
    assert load["ifaces"] == [{"iface_id": "eth0", "host_dev_name": h["tap"]}]
    overlay = next(d for d in load["drives"] if d["drive_id"] == "overlay")
    assert overlay["abs_path"] == str(ns.home / "vms" / clone["id"] / "overlay.ext4")
    net = wait_event(ns.rec, h["pid"], "guest_net")
    assert net == {**net, "ip": f"{clone['ip']}/24", "gateway": "172.30.0.1", "mac": clone["mac"],
                   "hostname": "clone-1"}
    mem = wait_event(ns.rec, h["pid"], "memory_verified", timeout=120)
    assert mem["pages"] == 32768 and mem["mismatched_vs_pattern"] == 0 and mem["mismatched_vs_file"] == 0
    # the clone pins the same guest host key at its new address
    kh = (ns.home / "vms" / clone["id"] / "known_hosts").read_text()
    assert kh.startswith(clone["ip"] + " ssh-ed25519 ") and "FakeKeyForsrc-1" in kh

    # circuit breaker: BANGER_UFFD=0 restores through Firecracker's File backend
    env = {**ns.env, "BANGER_UFFD": "0"}
    clone2 = ns.banger_json("snapshot", "restore", "snap-1", "--no-wait", env=env)["data"]
    h2 = _handles(ns, clone2["id"])
    assert clone2["restore"]["mem_backend"] == "File" and not h2.get("uffd_pid")
    assert wait_event(ns.rec, h2["pid"], "snapshot_load")["backend"] == {"type": "File",
                                                                          "path": str(sdir / "vm.mem")}
    assert wait_event(ns.rec, h2["pid"], "memory_verified", timeout=120)["mismatched_vs_pattern"] == 0

    # deleting a clone takes its VMM, handler and supervisor down and hands its TAP back
    ns.banger_json("vm", "delete", "-f", "clone-1")
    for pid, st in ((h["pid"], h["pid_start"]), (h["uffd_pid"], h["uffd_pid_start"]),
                    (h["supervisor_pid"], h["supervisor_pid_start"])):
        # gone by themselves (delete took them down): never signalled here
        deadline = time.monotonic() + 10
        while procs.alive(pid, st) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not procs.alive(pid, st), f"pid {pid} outlived vm delete"
    assert h["tap"] not in _claimed_taps(ns)

    # rm: the clone still running from it is unaffected
    assert ns.banger_json("snapshot", "rm", "snap-1")["data"] == [{"name": "snap-1", "deleted": True}]
    assert not sdir.exists() and ns.banger_json("snapshot", "list")["data"] == []
    assert ns.banger_json("vm", "show", clone2["name"])["data"]["state"] == "running"
    gone = ns.banger_json("snapshot", "restore", "snap-1", "--no-wait", check=False)
    assert gone["_exit"] == 3 and gone["error"]["code"] == "not_found"


def test_failed_restore_leaves_nothing(fcns):
    ns = fcns
    running_fc_vm(ns, "src-2", ns.shared)
    snap = ns.banger_json("snapshot", "create", "src-2")["data"]
    assert snap["name"].startswith("src-2-")
    state = Path(snap["dir"]) / "vm.state"
    state.write_bytes(b"garbage")  # Firecracker cannot deserialize it: the load fails and the VMM exits
    # ...and the manifest agrees with the files (as for a snapshot another Firecracker version wrote), so the
    # restore gets as far as the VMM: this is the VMM-failure path (damage itself: the test further down)
    from banger.snapshots import manifest

    with sqlite3.connect(ns.home / "state.db") as c:
        meta = json.loads(c.execute("SELECT meta FROM snapshots WHERE name = ?", (snap["name"],)).fetchone()[0])
        meta["files"] = manifest.build(Path(snap["dir"]), skip=("meta.json",))
        c.execute("UPDATE snapshots SET meta = ? WHERE name = ?", (json.dumps(meta), snap["name"]))
    before_rows = {v["name"] for v in ns.banger_json("vm", "list")["data"]}
    before_taps = set(_claimed_taps(ns))
    r = ns.banger_json("snapshot", "restore", snap["name"], "--name", "broken-1", "--no-wait", check=False)
    assert r["_exit"] == 8, r
    assert "Failed to restore from snapshot" in r["error"]["message"] and r["error"]["hint"]
    assert {v["name"] for v in ns.banger_json("vm", "list")["data"]} == before_rows
    assert set(_claimed_taps(ns)) == before_taps
    vm_dirs = {p.name for p in (ns.home / "vms").iterdir()}
    assert len(vm_dirs) == 1  # only the source's
    failed = [r for r in records(ns.rec) if r["event"] == "snapshot_load_failed"]
    assert len(failed) == 1
    # the handler and the failed VMM are gone too
    assert len(_our_processes(ns)) == 1  # the source VM's double only


def test_snapshot_needs_a_running_vm(fcns):
    ns = fcns
    running_fc_vm(ns, "src-3", ns.shared)
    ns.banger_json("vm", "stop", "-f", "src-3")
    r = ns.banger_json("snapshot", "create", "src-3", "s3", check=False)
    assert r["_exit"] == 4 and r["error"]["code"] == "invalid_state"
    assert ns.banger_json("snapshot", "list")["data"] == []
    assert not (ns.home / "snapshots" / "s3").exists()
    staging = ns.home / "staging"
    assert not staging.exists() or not any(staging.iterdir())
    bad = ns.banger_json("snapshot", "create", "src-3", "Bad_Name", check=False)
    assert bad["_exit"] == 2


def test_snapshot_of_a_restored_clone(fcns):
    """A clone carries what a snapshot needs (drive layout, memory size) in its handles: snapshots chain."""
    ns = fcns
    src = running_fc_vm(ns, "src-4", ns.shared)
    seed = events(ns.rec, src["pid"], "boot")[0]["seed"]
    ns.banger_json("snapshot", "create", "src-4", "gen-1")
    # the three entry points restore alike: snapshot restore (above), vm restore, vm create --from-snapshot
    c1 = ns.banger_json("vm", "restore", "gen-1", "--name", "gen1-clone", "--no-wait")["data"]
    ns.banger_json("vm", "delete", "-f", "src-4")
    s2 = ns.banger_json("snapshot", "create", "gen1-clone", "gen-2")["data"]
    assert Path(s2["dir"], "vm.mem").stat().st_size == 128 << 20
    c2 = ns.banger_json("vm", "create", "--from-snapshot", "gen-2", "--name", "gen2-clone", "--no-wait")["data"]
    assert c2["restored_from"] == "gen-2"
    h2 = _handles(ns, c2["id"])
    assert wait_event(ns.rec, h2["pid"], "snapshot_load")["seed"] == seed
    assert wait_event(ns.rec, h2["pid"], "guest_net")["hostname"] == "gen2-clone"
    assert wait_event(ns.rec, h2["pid"], "memory_verified", timeout=120)["mismatched_vs_pattern"] == 0
    assert c1["ip"] != src["ip"] and c2["ip"] != c1["ip"]  # (src-4 was deleted: its slot may be reused)


def test_parallel_restores_and_a_racing_rm(fcns):
    """Three clones restored at once from one snapshot (separate processes) get distinct names, addresses and
    TAPs; an `rm` started meanwhile queues on snapshot/<name>: each restore either completes with every byte
    of memory right, or (if rm won the lock first) fails cleanly as not_found. Never anything in between."""
    from tests.support.netns import banger_argv

    ns = fcns
    running_fc_vm(ns, "src-5", ns.shared)
    ns.banger_json("snapshot", "create", "src-5", "fan")
    restores = [ns.spawn(banger_argv("snapshot", "restore", "fan", "--no-wait", "--json")) for _ in range(3)]
    rm = ns.spawn(banger_argv("snapshot", "rm", "fan", "--json"))
    ok, gone = [], 0
    for p in restores:
        out, err = p.communicate(timeout=300)
        doc = json.loads(out)
        if doc["ok"]:
            ok.append(doc["data"])
        else:
            assert doc["error"]["code"] == "not_found", doc
            gone += 1
    out, err = rm.communicate(timeout=300)
    assert json.loads(out)["ok"], err
    assert len(ok) + gone == 3
    assert len({o["name"] for o in ok}) == len(ok) and len({o["ip"] for o in ok}) == len(ok)
    assert len({_handles(ns, o["id"])["tap"] for o in ok}) == len(ok)
    for o in ok:
        h = _handles(ns, o["id"])
        assert wait_event(ns.rec, h["pid"], "guest_net")["ip"] == f"{o['ip']}/24"
        assert wait_event(ns.rec, h["pid"], "memory_verified", timeout=180)["mismatched_vs_pattern"] == 0
        assert ns.banger_json("vm", "show", o["name"])["data"]["state"] == "running"
    # the failed ones left no row behind; only the source and the successful clones exist
    assert len(ns.banger_json("vm", "list")["data"]) == 1 + len(ok)
    assert not (ns.home / "snapshots" / "fan").exists()
    print(f"parallel restores: {len(ok)} completed, {gone} found the snapshot removed")


def _leaves_nothing(ns, before_rows, before_taps):
    assert {v["name"] for v in ns.banger_json("vm", "list")["data"]} == before_rows
    assert set(_claimed_taps(ns)) == before_taps
    assert len({p.name for p in (ns.home / "vms").iterdir()}) == len(before_rows)
    deadline = time.monotonic() + 10
    while len(_our_processes(ns)) > len(before_rows) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_our_processes(ns)) == len(before_rows), _our_processes(ns)  # no clone VMM, handler, supervisor


def test_damaged_and_incomplete_snapshots_are_refused(fcns):
    """The manifest written at create time (sizes + checksums, in the snapshot row) is checked on restore:
    a flipped byte in guest memory -> "snapshot damaged"; a missing file -> "snapshot incomplete"; a
    truncated disk -> damaged before anything is reserved. Each leaves no row, dir, TAP or process."""
    ns = fcns
    running_fc_vm(ns, "src-6", ns.shared)
    snap = ns.banger_json("snapshot", "create", "src-6", "whole")["data"]
    files = ns.banger_json("snapshot", "show", "whole")["data"]["meta"]["files"]
    assert set(files) == {"vm.mem", "vm.state", "overlay.ext4", "work.ext4", "known_hosts"}
    assert files["vm.mem"]["size"] == 128 << 20 and len(files["vm.mem"]["crc32z"]) == 8
    assert len(files["vm.state"]["sha256z"]) == 64
    sdir = Path(snap["dir"])
    before_rows = {v["name"] for v in ns.banger_json("vm", "list")["data"]}
    before_taps = set(_claimed_taps(ns))

    # an intact snapshot restores (and says what verification cost)
    ok = ns.banger_json("snapshot", "restore", "whole", "--name", "intact-1", "--no-wait")["data"]
    assert "verify_s" in ok["restore"], ok["restore"]
    ns.banger_json("vm", "delete", "-f", "intact-1")

    # one flipped byte deep inside the memory file (same size, so only the checksum can tell)
    mem = sdir / "vm.mem"
    with open(mem, "r+b") as f:
        f.seek(77 * 4096 * 100 + 13)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))
    r = ns.banger_json("snapshot", "restore", "whole", "--name", "dmg-1", "--no-wait", check=False)
    assert r["_exit"] == 8 and r["error"]["code"] == "snapshot_damaged", r
    assert "snapshot 'whole' damaged: vm.mem does not match its checksum" in r["error"]["message"]
    assert "banger snapshot rm whole" in r["error"]["hint"]
    _leaves_nothing(ns, before_rows, before_taps)
    with open(mem, "r+b") as f:  # flip it back: whole again
        f.seek(77 * 4096 * 100 + 13)
        f.write(b)

    # a small file changed: refused before anything is reserved
    (sdir / "vm.state").write_bytes((sdir / "vm.state").read_bytes()[:-1] + b"\x00")
    r = ns.banger_json("vm", "restore", "whole", "--name", "dmg-2", "--no-wait", check=False)
    assert r["_exit"] == 8 and r["error"]["code"] == "snapshot_damaged" and "vm.state" in r["error"]["message"]
    _leaves_nothing(ns, before_rows, before_taps)

    # a truncated disk
    snap2 = ns.banger_json("snapshot", "create", "src-6", "trunc")["data"]
    os.truncate(Path(snap2["dir"]) / "work.ext4", 4096)
    r = ns.banger_json("snapshot", "restore", "trunc", "--no-wait", check=False)
    assert r["_exit"] == 8 and "work.ext4 is 4096 bytes" in r["error"]["message"], r
    _leaves_nothing(ns, before_rows, before_taps)

    # a missing file
    snap3 = ns.banger_json("snapshot", "create", "src-6", "partial")["data"]
    (Path(snap3["dir"]) / "vm.mem").unlink()
    r = ns.banger_json("vm", "create", "--from-snapshot", "partial", "--no-wait", check=False)
    assert r["_exit"] == 3 and r["error"]["code"] == "snapshot_incomplete", r
    assert "snapshot 'partial' incomplete: vm.mem is missing" in r["error"]["message"] and r["error"]["hint"]
    _leaves_nothing(ns, before_rows, before_taps)
