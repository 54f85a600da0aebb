# ruff: noqa: F811  (pytest fixtures imported from tests.support are re-declared as arguments)
"""Templates, the warm VM pool, claims and forks on the Firecracker backend (the strict double), whole
product in a throwaway netns: the real CLI in its own processes, real SQLite and flock, real TAPs on a
real bridge, the double as Firecracker with banger's real UFFD handler serving its real page faults
(and Firecracker's File backend with BANGER_UFFD=0), real ext4 disks.

The double cannot run a guest, so nothing here waits for SSH (the e2e tier does, on QEMU): template
builds and pool fills run with ``wait_ssh=False``, creates with ``--no-wait``.  The double answers
banger-init's ``@banger set`` control line the way banger-init does (same validation), so identities,
claims and their answers are real protocol exchanges.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from banger.host import procs
from tests.support.e2e import wait_for
from tests.support.fc import FAKE_FC, events, records, running_fc_vm, wait_event
from tests.support.netns import banger_argv, netns  # noqa: F401

SETUP = r"""
import json, sys, tempfile
from pathlib import Path
from banger.context import Ctx
from banger.host import ext4
from banger.images import service as images
from banger.kernels import service as kernels
from tests.support.kernels import fake_elf_kernel
ctx = Ctx()
shared = Path(sys.argv[1]); shared.mkdir(parents=True, exist_ok=True)
tree = shared / "tree"; (tree / "sbin").mkdir(parents=True, exist_ok=True)
(tree / "sbin" / "banger-init").write_text("#!/bin/sh\n")
ctx.cfg.staging_dir.mkdir(parents=True, exist_ok=True)
st = Path(tempfile.mkdtemp(dir=ctx.cfg.staging_dir))
ext4.mkfs(st / "rootfs.ext4", 16, src_dir=tree, label="fake-root")
images.publish(ctx, "fake-img", st, kind="register", source="test", digest=None, kernel="fake-kernel",
               init="/sbin/banger-init", meta={"has_sshd": True})
k = shared / "vmlinux"
k.write_bytes(fake_elf_kernel())
(shared / "initrd.img").write_bytes(b"\x1f\x8b" + b"\0" * 200)
kernels.import_kernel(ctx, "fake-kernel", k, initrd=shared / "initrd.img")
print(json.dumps({"ok": True}))
"""

T = "__import__('banger.templates.service', fromlist=['x'])"
P = "__import__('banger.vmpool.service', fromlist=['x'])"


def _spec_expr() -> str:
    return f"{T}.resolve_spec(ctx, image='fake-img')"


@pytest.fixture
def fcpool(netns, tmp_path):
    rec = tmp_path / "fc-record"
    rec.mkdir()
    conf = tmp_path / "config.toml"
    conf.write_text(f'firecracker_bin = "{FAKE_FC}"\nbackend = "firecracker"\ndefault_image = "fake-img"\n'
                    'default_kernel = "fake-kernel"\nmemory_mib = 128\noverlay_size_mib = 64\n'
                    'work_disk_size_mib = 64\n')
    root = str(Path(__file__).resolve().parents[2])
    netns.env.update(BANGER_CONFIG=str(conf), FAKE_FIRECRACKER_RECORD=str(rec),
                     PYTHONPATH=root + os.pathsep + netns.env.get("PYTHONPATH", ""),
                     FAKE_FIRECRACKER_TOUCH="64")
    netns.rec = rec
    netns.shared = tmp_path / "shared"
    assert netns.py(SETUP, netns.shared)["ok"]
    try:
        yield netns
    finally:
        left = netns.banger_json("vm", "list", "--all", check=False).get("data") or []
        for v in left:
            netns.banger_json("vm", "delete", "-f", v["id"], check=False)
        netns.banger_json("gc", check=False)
        deadline = time.monotonic() + 15
        while _our_processes(netns) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _our_processes(netns), _our_processes(netns)
        assert not _claimed_taps(netns)
        assert not _rows(netns, "SELECT name FROM vms")


def _our_processes(ns) -> list[str]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (str(ns.run_dir) in cmd or str(ns.home) in cmd) and "banger.cli.main" not in cmd \
                and "pytest" not in cmd:
            out.append(cmd[:160])
    return out


def _rows(ns, sql, params=()):
    with sqlite3.connect(ns.home / "state.db") as c:
        return c.execute(sql, params).fetchall()


def _claimed_taps(ns) -> list[str]:
    return [r[0] for r in _rows(ns, "SELECT name FROM taps WHERE state = 'claimed'")]


def _handles(ns, vm_id: str) -> dict:
    return json.loads((ns.home / "vms" / vm_id / "handles.json").read_text())


def _pooled(ns) -> list[dict]:
    return [{"id": r[0], "name": r[1], "key": r[2]}
            for r in _rows(ns, "SELECT id, name, pool_key FROM vms WHERE state = 'pooled' ORDER BY created_at")]


def _warm(ns, n: int, env=None, check=True):
    expr = f"{P}.warm(ctx, {n}, image='fake-img', wait_ssh=False)"
    if env is None:
        r = ns.call(expr)
    else:
        from tests.support.netns import _CALL, py_argv

        cp = ns.run(py_argv(_CALL, expr), env=env)
        r = json.loads(cp.stdout.strip().splitlines()[-1])
    if check:
        assert "error" not in r, r
    return r.get("value", r)


def test_template_pool_claim_fork_through_the_double(fcpool):
    ns = fcpool
    # --- template: built once (a cold boot of the double + the control-line check + a Full snapshot)
    t = ns.call(f"{T}.ensure(ctx, {_spec_expr()}, wait_ssh=False)")["value"]
    assert t["built"] and not t["stale"] and t["damaged"] is None and t["backend"] == "firecracker"
    assert sorted(p.name for p in Path(t["dir"]).iterdir()) == ["known_hosts", "meta.json", "overlay.ext4",
                                                                  "vm.mem", "vm.state", "work.ext4"]
    again = ns.call(f"{T}.ensure(ctx, {_spec_expr()}, wait_ssh=False)")["value"]
    assert not again["built"] and again["key"] == t["key"]
    listed = ns.banger_json("template", "list")["data"]
    assert [x["id"] for x in listed] == [t["id"]] and listed[0]["stale"] is False
    assert ns.banger_json("snapshot", "list")["data"] == []  # templates are not user snapshots
    assert not ns.banger_json("vm", "list", "--all")["data"]  # the builder is gone

    # --- pool fill: restored through the real UFFD handshake, given an identity, paused
    w = _warm(ns, 2)
    assert len(w["created"]) == 2 and w["pooled"] == 2 and not w["template"]["built"]
    pool = _pooled(ns)
    assert len(pool) == 2 and {p["key"] for p in pool} == {t["key"]}
    fills = []
    for p in pool:
        h = _handles(ns, p["id"])
        assert h["mem_backend"] == "Uffd" and procs.alive(h["uffd_pid"], h["uffd_pid_start"])
        assert wait_event(ns.rec, h["pid"], "uffd_handshake")["backend_path"] == h["uffd_sock"]
        ident = wait_event(ns.rec, h["pid"], "guest_set")
        vm = ns.banger_json("vm", "show", p["name"])["data"]
        assert ident["host"] == p["name"] and ident["net"] == f"{vm['ip']}/24,172.30.0.1,{vm['mac']}"
        assert len(ident["mid"]) == 32 and ident["rng_bytes"] == 32 and ident["key_sha256"]
        assert abs(float(ident["clock"]) - time.time()) < 60
        reqs = [(r["method"], r["path"], (r.get("body") or {}).get("state"))
                for r in events(ns.rec, h["pid"], "request")]
        assert reqs[-1] == ("PATCH", "/vm", "Paused")  # pooled = paused
        kh = (ns.home / "vms" / p["id"] / "known_hosts").read_text().split()
        assert kh[0] == vm["ip"] and kh[2] == ident["pub"]  # its own key, pinned
        fills.append(ident)
    assert fills[0]["key_sha256"] != fills[1]["key_sha256"] and fills[0]["mid"] != fills[1]["mid"]
    assert ns.banger_json("vm", "list")["data"] == []  # pooled clones are not user VMs
    assert {v["state"] for v in ns.banger_json("vm", "list", "--all")["data"]} == {"pooled"}
    assert ns.banger_json("pool", "status")["data"]["vms"]["pooled"] == 2
    assert _warm(ns, 2)["noop"]  # idempotent

    # --- claim: one row update, renamed, clock + entropy, resumed
    c = ns.banger_json("vm", "create", "--name", "claimed-1", "--no-wait")["data"]
    assert c["made"]["how"] == "pool" and c["made"]["template"] == t["id"] and c["state"] == "running"
    assert c["id"] == pool[0]["id"]  # the oldest clone
    assert [s["stage"] for s in c["stages"] if s["op"] == "claim"] == ["clone.check", "vmm.resume",
                                                                          "guest.identity"]
    h = _handles(ns, c["id"])
    sets = events(ns.rec, h["pid"], "guest_set")
    assert sets[-1]["host"] == "claimed-1" and sets[-1]["rng_bytes"] == 32 and "key_sha256" not in sets[-1]
    assert sets[-1]["state"] == "Running"
    assert wait_event(ns.rec, h["pid"], "memory_verified", timeout=120)["mismatched_vs_pattern"] == 0
    assert len(_pooled(ns)) == 1
    # --cold boots even though a clone is there
    cold = ns.banger_json("vm", "create", "--cold", "--no-wait")["data"]
    assert cold["made"]["how"] == "cold" and len(_pooled(ns)) == 1
    # flags the pool cannot honour boot cold too
    other = ns.banger_json("vm", "create", "--no-wait", "--memory", "256")["data"]
    assert other["made"]["how"] == "cold" and len(_pooled(ns)) == 1

    # --- fork: snapshot of the running claimed clone, 3 clones restored with UFFD, the source keeps running
    f = ns.banger_json("vm", "fork", "claimed-1", "--count", "3", "--name", "fk", "--no-wait")["data"]
    assert [x["name"] for x in f["clones"]] == ["fk-1", "fk-2", "fk-3"] and not f["failed"]
    assert "not shared" in f["memory"]  # UFFD: each handler copies pages into its clone
    src_reqs = [(r["method"], r["path"], (r.get("body") or {}).get("state")) for r in events(ns.rec, h["pid"],
                                                                                            "request")]
    assert src_reqs[-1] == ("PATCH", "/vm", "Resumed")
    assert ns.banger_json("vm", "show", "claimed-1")["data"]["state"] == "running"
    keys = set()
    for x in f["clones"]:
        hx = _handles(ns, x["id"])
        assert x["made"] == {**x["made"], "how": "fork", "source": "claimed-1"}
        assert hx["mem_backend"] == "Uffd" and wait_event(ns.rec, hx["pid"], "uffd_handshake")
        s = wait_event(ns.rec, hx["pid"], "guest_set")
        assert s["host"] == x["name"] and s["net"].startswith(x["ip"] + "/")
        keys.add(s["key_sha256"])
        assert wait_event(ns.rec, hx["pid"], "memory_verified", timeout=120)["mismatched_vs_pattern"] == 0
    assert len(keys) == 3 and len({x["ip"] for x in f["clones"]}) == 3
    assert not (ns.home / "staging").exists() or not any((ns.home / "staging").iterdir())

    # --- the File backend when BANGER_UFFD=0: fill and fork map the memory file privately
    env = {**ns.env, "BANGER_UFFD": "0"}
    w2 = _warm(ns, 2, env=env)
    new = [p for p in _pooled(ns) if p["id"] in {x["id"] for x in w2["created"]}]
    assert len(new) == 1
    hn = _handles(ns, new[0]["id"])
    assert hn["mem_backend"] == "File" and not hn.get("uffd_pid")
    assert wait_event(ns.rec, hn["pid"], "snapshot_load")["backend"]["type"] == "File"
    f2 = ns.banger_json("vm", "fork", "fk-1", "--count", "2", "--no-wait", env=env)["data"]
    assert "File backend" in f2["memory"]
    for x in f2["clones"]:
        hx = _handles(ns, x["id"])
        assert hx["mem_backend"] == "File"
        assert wait_event(ns.rec, hx["pid"], "memory_verified", timeout=120)["mismatched_vs_pattern"] == 0

    # --- drain removes the pooled clones only
    d = ns.banger_json("pool", "drain", "--vms")["data"]
    assert len(d["drained"]) == 2 and _pooled(ns) == []
    names = sorted(v["name"] for v in ns.banger_json("vm", "list")["data"])
    assert len(names) == 1 + 2 + 3 + 2, " ".join(names)  # claimed-1, 2 cold, 3 + 2 forks


def test_stale_template_is_not_claimed_and_warm_replaces_it(fcpool):
    ns = fcpool
    _warm(ns, 1)
    old = _pooled(ns)[0]
    # the image is rebuilt: its rootfs is a new file (new fingerprint) -> new key
    rootfs = ns.home / "images" / "fake-img" / "rootfs.ext4"
    tmp = rootfs.with_name("rootfs.new")
    tmp.write_bytes(rootfs.read_bytes())
    os.replace(tmp, rootfs)
    lst = ns.banger_json("template", "list")["data"]
    assert len(lst) == 1 and lst[0]["stale"] is True
    c = ns.banger_json("vm", "create", "--no-wait")["data"]
    assert c["made"]["how"] == "cold"  # the stale clone was not used
    assert _pooled(ns) == [old]
    st = ns.banger_json("pool", "status")["data"]["vms"]
    assert st["groups"][0]["current"] is False
    w = _warm(ns, 1)
    assert w["dropped"] == [{"name": old["name"], "reason": "stale template"}] and w["template"]["built"]
    new = _pooled(ns)
    assert len(new) == 1 and new[0]["key"] != old["key"]
    assert ns.banger_json("vm", "create", "--no-wait")["data"]["made"]["how"] == "pool"
    rm = ns.banger_json("template", "rm", "--stale")["data"]
    assert [x["key"] for x in rm] == [old["key"]]
    assert [x["key"] for x in ns.banger_json("template", "list")["data"]] == [new[0]["key"]]


def test_damaged_template_is_rebuilt(fcpool):
    ns = fcpool
    t = ns.call(f"{T}.ensure(ctx, {_spec_expr()}, wait_ssh=False)")["value"]
    (Path(t["dir"]) / "vm.state").unlink()
    assert "missing" in ns.banger_json("template", "list")["data"][0]["damaged"]
    t2 = ns.call(f"{T}.ensure(ctx, {_spec_expr()}, wait_ssh=False)")["value"]
    assert t2["built"] and t2["damaged"] is None and t2["key"] == t["key"]


def test_concurrent_template_builds_single_flight(fcpool, tmp_path):
    from tests.support.procs import Barrier

    ns = fcpool
    go = Barrier(tmp_path / "go", 3)
    ps = [ns.spawn_call(f"{T}.ensure(ctx, {_spec_expr()}, wait_ssh=False)", go) for _ in range(3)]
    go.release()
    outs = []
    for p in ps:
        out, err = p.communicate(timeout=300)
        outs.append(json.loads(out.strip().splitlines()[-1])["value"])
    assert sum(o["built"] for o in outs) == 1, outs
    assert len({o["key"] for o in outs}) == 1
    boots = [e for e in records(ns.rec) if e["event"] == "boot"]
    assert len(boots) == 1  # one builder VM booted


def test_eight_creates_claim_from_a_pool_of_four(fcpool):
    ns = fcpool
    _warm(ns, 4)
    pool_ids = {p["id"] for p in _pooled(ns)}
    start = time.time() + 1.5
    # every create waits for the same instant (a sitecustomize-free barrier: the CLI is started, then
    # the processes race for the single UPDATE)
    ps = [ns.spawn(["sh", "-c", f"while [ $(date +%s%N) -lt {int(start * 1e9)} ]; do :; done; exec \"$@\"", "sh",
                    *banger_argv("vm", "create", "--name", f"r{i}", "--no-wait", "--json")]) for i in range(8)]
    docs = []
    for p in ps:
        out, err = p.communicate(timeout=300)
        docs.append(json.loads(out))
    assert all(d["ok"] for d in docs), [d for d in docs if not d["ok"]]
    made = [d["data"]["made"]["how"] for d in docs]
    assert made.count("pool") == 4 and made.count("cold") == 4, made
    claimed = [d["data"]["id"] for d in docs if d["data"]["made"]["how"] == "pool"]
    assert sorted(claimed) == sorted(pool_ids)  # each clone exactly once
    assert len({d["data"]["ip"] for d in docs}) == 8
    assert _pooled(ns) == []
    for d in docs:
        if d["data"]["made"]["how"] == "pool":
            h = _handles(ns, d["data"]["id"])
            assert events(ns.rec, h["pid"], "guest_set")[-1]["host"] == d["data"]["name"]


def test_pool_warm_while_claims_happen(fcpool):
    ns = fcpool
    _warm(ns, 2)
    warm = ns.spawn_call(f"{P}.warm(ctx, 4, image='fake-img', wait_ssh=False)")
    claims = [ns.spawn(banger_argv("vm", "create", "--name", f"w{i}", "--no-wait", "--json")) for i in range(4)]
    docs = [json.loads(p.communicate(timeout=300)[0]) for p in claims]
    out, err = warm.communicate(timeout=300)
    w = json.loads(out.strip().splitlines()[-1])
    assert "error" not in w, (w, err)
    assert all(d["ok"] for d in docs), docs
    ids = [d["data"]["id"] for d in docs]
    assert len(set(ids)) == 4
    pooled_now = {p["id"] for p in _pooled(ns)}
    assert not pooled_now & set(ids)  # nothing both claimed and pooled
    claimed = [d for d in docs if d["data"]["made"]["how"] == "pool"]
    assert len(claimed) >= 2  # the two there at the start, at least
    # every pooled clone is whole: paused, alive, its own TAP
    taps = set()
    for p in _pooled(ns):
        h = _handles(ns, p["id"])
        assert procs.alive(h["pid"], h["pid_start"])
        taps.add(h["tap"])
    assert len(taps) == len(pooled_now)
    assert ns.banger_json("gc", "--dry-run")["data"]["total"] == 0


@pytest.mark.parametrize("at,expect", [("clone.check", "pooled"), ("vmm.resume", "running")])
def test_kill9_during_a_claim_then_gc(fcpool, at, expect):
    ns = fcpool
    _warm(ns, 1)
    clone = _pooled(ns)[0]
    env = {**ns.env, "BANGER_TEST_PAUSE_AT": at}
    p = ns.spawn(banger_argv("vm", "create", "--name", "victim", "--no-wait", "--json"), env=env)
    marker = ns.run_dir / f"paused-{clone['id']}"
    wait_for(marker.exists, 120, f"the claim to pause after {at}")
    assert _rows(ns, "SELECT state, name FROM vms WHERE id = ?", (clone["id"],)) == [("claiming", "victim")]
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    wait_for(lambda: not ns.call("ctx.locks.is_held('vm/" + clone["id"] + "')")["value"], 30, "the lock to go")
    g = ns.banger_json("gc")["data"]
    assert [x["id"] for x in g["pool"]] == [clone["id"]]
    state, name = _rows(ns, "SELECT state, name FROM vms WHERE id = ?", (clone["id"],))[0]
    assert state == expect
    h = _handles(ns, clone["id"])
    assert procs.alive(h["pid"], h["pid_start"])  # nothing torn down: either claimed or capacity again
    if expect == "pooled":
        assert name == clone["name"]
        c = ns.banger_json("vm", "create", "--name", "second", "--no-wait")["data"]
        assert c["id"] == clone["id"] and c["made"]["how"] == "pool"
    else:
        assert name == "victim"
        v = ns.banger_json("vm", "show", "victim")["data"]
        assert v["state"] == "running" and "interrupted" in v["error"]
    assert ns.banger_json("gc", "--dry-run")["data"]["total"] == 0
    assert not marker.exists() or ns.banger_json("gc")["data"]


def test_fork_of_a_stopped_vm_and_bad_input(fcpool):
    ns = fcpool
    src = running_fc_vm(ns, "fsrc", ns.shared)
    assert src["pid"]
    bad = ns.banger_json("vm", "fork", "fsrc", "--count", "0", check=False)
    assert bad["_exit"] == 2
    big = ns.banger_json("vm", "fork", "fsrc", "--count", "99", check=False)
    assert big["_exit"] == 2 and "--count 99" in big["error"]["message"]
    name = ns.banger_json("vm", "fork", "fsrc", "--name", "Bad_Prefix", check=False)
    assert name["_exit"] == 2
    ns.banger_json("vm", "create", "--name", "taken-1", "--no-wait", "--cold")
    taken = ns.banger_json("vm", "fork", "fsrc", "--name", "taken", check=False)
    assert taken["_exit"] == 4 and "taken-1" in taken["error"]["message"]
    ns.banger_json("vm", "stop", "-f", "fsrc")
    st = ns.banger_json("vm", "fork", "fsrc", check=False)
    assert st["_exit"] == 4 and st["error"]["code"] == "invalid_state"
    assert sorted(v["name"] for v in ns.banger_json("vm", "list")["data"]) == ["fsrc", "taken-1"]
    staging = ns.home / "staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_fork_interrupted_while_its_source_is_paused_leaves_nothing(fcpool):
    """A fork reserves its clones' rows and makes their TAPs while the source's snapshot is written: a
    SIGTERM with the source paused (at the snapshot's test hook) unwinds all of it (rows, TAPs,
    directories, staging) and the source runs on."""
    ns = fcpool
    src = running_fc_vm(ns, "fsrc", ns.shared)
    env = {**ns.env, "BANGER_TEST_PAUSE_AT": "vmm.snapshot"}
    p = ns.spawn(banger_argv("vm", "fork", "fsrc", "--count", "2", "--name", "fi", "--no-wait", "--json"), env=env)
    marker = ns.run_dir / f"paused-{src['id']}"
    wait_for(marker.exists, 120, "the fork to pause with its source paused")
    # meanwhile the clones got their rows and TAPs
    wait_for(lambda: len(_claimed_taps(ns)) == 3, 60, "the clones' TAPs")
    assert sorted(r[0] for r in _rows(ns, "SELECT name FROM vms WHERE name LIKE 'fi-%'")) == ["fi-1", "fi-2"]
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(timeout=60) != 0
    assert [v["name"] for v in ns.banger_json("vm", "list")["data"]] == ["fsrc"]
    assert ns.banger_json("vm", "show", "fsrc")["data"]["state"] == "running"  # resumed
    assert len(_claimed_taps(ns)) == 1  # the source's own
    assert not list((ns.home / "vms").glob("*")) or {d.name for d in (ns.home / "vms").iterdir()} == {src["id"]}
    staging = ns.home / "staging"
    assert not staging.exists() or not any(staging.iterdir())
    assert ns.banger_json("gc", "--dry-run")["data"]["total"] == 0


def test_gc_removes_shared_ram_files_of_dead_processes(fcpool):
    ns = fcpool
    d = Path(ns.call("str(__import__('banger.templates.ram', fromlist=['x']).ram_dir(ctx.cfg))")["value"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = d / f"fork-{dead.pid}-{procs.start_time(os.getpid())}-abcdef.ram"
    stale.write_bytes(b"\0" * 4096)
    live = d / f"fork-{os.getpid()}-{procs.start_time(os.getpid())}-abcdef.ram"
    live.write_bytes(b"\0" * 4096)
    other = d / "not-ours.txt"
    other.write_text("x")
    try:
        dry = ns.banger_json("gc", "--dry-run")["data"]
        assert str(stale) in dry["staging"] and stale.exists()
        g = ns.banger_json("gc")["data"]
        assert str(stale) in g["staging"] and str(live) not in g["staging"]
        assert not stale.exists() and live.exists() and other.exists()
    finally:
        for p in (stale, live, other):
            p.unlink(missing_ok=True)
        d.rmdir()
