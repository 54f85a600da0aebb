"""`banger gc` on real leftovers, with real processes, loop devices, TAPs, NAT rules and flock: what
dead commands left goes; what lives (a create in progress, a running VM, a promote, a user's own
processes that merely name our files) stays."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from banger.config import load_config
from banger.host import procs
from banger.host.fsutil import atomic_write_json
from banger.names import Subnet
from banger.state import staging
from banger.state.locks import Locks
from banger.state.reservation import reserve_vm
from banger.state.store import Store
from tests.support.netns import netns  # noqa: F401  (fixture: gc's TAP scan must not see the host's links)


def _dead_process() -> dict:
    pid, start = procs.spawn_detached([sys.executable, "-c", "pass"])
    assert procs.kill(pid, start, wait=10)
    return {"pid": pid, "start": start}


def _me() -> dict:
    return {"pid": os.getpid(), "start": procs.start_time(os.getpid())}


def _sleeper(*argv_tail) -> tuple[int, int]:
    return procs.spawn_detached([sys.executable, "-c", "import time; time.sleep(300)", *map(str, argv_tail)])


def _reserve(cfg, name, state, creator, **options):
    with Store(cfg.db_path) as st:
        return reserve_vm(st, Subnet(cfg.subnet), name=name, image="img", kernel="k", backend="qemu", vcpu=1,
                          memory_mib=256, overlay_size_mib=64, work_disk_size_mib=64, state=state,
                          options={"creator": creator, **options})


def _loops_under(home) -> list[str]:
    out = subprocess.run(["losetup", "--json", "--list", "--output", "NAME,BACK-FILE"], capture_output=True,
                         text=True).stdout
    return [d["name"] for d in (json.loads(out)["loopdevices"] if out.strip() else [])
            if (d.get("back-file") or "").startswith(str(home))]


def _loop(path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    return subprocess.run(["losetup", "--find", "--show", "--read-only", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_gc_removes_leftovers_and_spares_live_things(netns):  # noqa: F811
    banger_json = netns.banger_json
    cfg = load_config()
    home = cfg.home
    started: list[tuple[int, int]] = []
    tail = None
    try:
        # a create killed right after its VMM was spawned: row `creating`, its dirs, a TAP, a neighbour entry,
        # and the VMM written down in spawned.json (handles.json never got written)
        stuck = _reserve(cfg, "stuck-1", "creating", _dead_process())
        sdir = cfg.vm_dir(stuck["id"])
        sdir.mkdir(parents=True)
        (sdir / "overlay.ext4").write_bytes(b"\0" * 4096)
        srun = cfg.vm_run_dir(stuck["id"])
        srun.mkdir(parents=True)
        (srun / "qmp.sock").write_text("")
        vmm = _sleeper()
        started.append(vmm)
        atomic_write_json(sdir / "spawned.json", [{"role": "spawned:qemu", "pid": vmm[0], "start": vmm[1]}])
        tap = netns.call(f"pool.claim(ctx, {stuck['id']!r})")["value"]
        netns.call(f"netlink.set_neighbour(ctx.cfg.bridge, {stuck['ip']!r}, {stuck['mac']!r})")
        assert [n["dst"] for n in netns.neighbours(cfg.bridge)] == [stuck["ip"]]

        # a stopped VM: its recorded helper still runs (stray), and a user's processes name its files
        stopped = _reserve(cfg, "stopped-1", "stopped", {})
        cfg.vm_dir(stopped["id"]).mkdir(parents=True)
        stray = _sleeper()
        started.append(stray)
        atomic_write_json(cfg.vm_dir(stopped["id"]) / "handles.json",
                          {"backend": "qemu", "pid": 0, "console_pid": stray[0], "console_pid_start": stray[1]})
        serial = cfg.vm_dir(stopped["id"]) / "serial.log"
        serial.write_text("boot\n")
        tail = subprocess.Popen(["tail", "-f", str(serial)], stdout=subprocess.DEVNULL)
        reader = _sleeper(f"{cfg.vm_dir(stopped['id'])}/work.ext4", f"file={cfg.vm_run_dir(stopped['id'])}/qmp.sock")
        started.append(reader)

        # a `vm run --rm` whose command was killed -9: its VM is still there, its creator gone
        rm_vm = _reserve(cfg, "rm-1", "running", _dead_process(), rm=True)
        cfg.vm_dir(rm_vm["id"]).mkdir(parents=True)
        rm_vmm = _sleeper()
        started.append(rm_vmm)
        atomic_write_json(cfg.vm_dir(rm_vm["id"]) / "handles.json",
                          {"backend": "qemu", "pid": rm_vmm[0], "pid_start": rm_vmm[1]})

        # NAT rules of a VM that is gone
        netns.call("policy.enable_nat(ctx, {'id': 'deadbeefdeadbeef', 'ip': '172.30.0.99'})")

        # loops: a killed promote's (recorded by its dead owner; one on an image, one on a VM disk), a live
        # promote's (recorded by a live owner, its VM's lock held) and a user's own on an image (no record)
        dead_promote = cfg.staging_dir / "promote-x-dead"
        dead_promote.mkdir(parents=True)
        d = _dead_process()
        (dead_promote / ".owner").write_text(f"{d['pid']} {d['start']}\n")
        dead_img_loop = _loop(home / "images" / "img-a" / "rootfs.ext4")
        staging.record_loop(dead_promote, home / "images" / "img-a" / "rootfs.ext4", dead_img_loop)
        orphan_vm_loop = _loop(home / "vms" / "orphan-dir" / "disk.img")
        live_promote = cfg.staging_dir / "promote-y-live"
        live_promote.mkdir()
        staging.write_owner(live_promote)
        live_img_loop = _loop(home / "images" / "img-b" / "rootfs.ext4")
        staging.record_loop(live_promote, home / "images" / "img-b" / "rootfs.ext4", live_img_loop)
        live_vm_loop = _loop(cfg.vm_dir(stopped["id"]) / "overlay.ext4")
        users_loop = _loop(home / "images" / "img-c" / "rootfs.ext4")

        # partial blobs: one whose writer died, one being written
        blobs = cfg.cache_dir / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        dead_part = blobs / f".w{d['pid']}-{d['start']}.abcd1234.x.part"
        dead_part.write_bytes(b"x" * 1000)
        live_part = blobs / f"{staging.owner_tag()}ef567890.y.part"
        live_part.write_bytes(b"y" * 1000)

        # snapshot dirs: an orphan, and one whose publish is in progress (snapshot/<name> held)
        orphan_snap = cfg.snapshots_dir / "snap-orphan"
        orphan_snap.mkdir(parents=True)
        (orphan_snap / "vm.mem").write_bytes(b"\0" * 4096)
        publishing_snap = cfg.snapshots_dir / "snap-publishing"
        publishing_snap.mkdir()

        # a create in progress (creator alive, holding its lock) and a running VM with its VMM
        busy = _reserve(cfg, "busy-1", "creating", _me())
        cfg.vm_dir(busy["id"]).mkdir(parents=True)
        cfg.vm_run_dir(busy["id"]).mkdir(parents=True)
        busy_vmm = _sleeper()
        started.append(busy_vmm)
        atomic_write_json(cfg.vm_dir(busy["id"]) / "spawned.json",
                          [{"role": "spawned:qemu", "pid": busy_vmm[0], "start": busy_vmm[1]}])
        live = _reserve(cfg, "live-1", "running", {})
        cfg.vm_dir(live["id"]).mkdir(parents=True)
        live_vmm = _sleeper(f"{cfg.vm_dir(live['id'])}/work.ext4")
        started.append(live_vmm)
        atomic_write_json(cfg.vm_dir(live["id"]) / "handles.json",
                          {"backend": "qemu", "pid": live_vmm[0], "pid_start": live_vmm[1]})
        cfg.vm_run_dir(live["id"]).mkdir(parents=True)

        locks = Locks(cfg.locks_dir)
        with locks.hold(f"vm/{busy['id']}"), locks.hold("snapshot/snap-publishing"):
            dry = banger_json("gc", "--dry-run")["data"]
            assert dry["dry_run"]
            assert {(r["name"], r["reason"]) for r in dry["rows"]} == {("stuck-1", "stale_create"),
                                                                       ("rm-1", "rm_creator_dead")}
            assert {p["pid"] for p in dry["processes"]} == {stray[0]}
            assert [n["vm_id"] for n in dry["rules"]] == ["deadbeefdeadbeef"]
            assert {lo["name"] for lo in dry["loops"]} == {dead_img_loop, orphan_vm_loop, live_vm_loop}
            assert str(dead_promote) in dry["staging"] and str(live_promote) not in dry["staging"]
            assert dry["blobs"] == [str(dead_part)]
            assert dry["snapshots"] == [str(orphan_snap)]
            assert {b["lock"] for b in dry["busy"]} >= {"snapshot/snap-publishing"}
            # nothing was touched by the dry run
            assert procs.alive(*vmm) and procs.alive(*stray) and sdir.exists() and dead_part.exists()
            assert dead_img_loop in _loops_under(home)

            # the stopped VM's disk loop is in use by an operation holding its lock (a promote)
            with locks.hold(f"vm/{stopped['id']}"):
                done = banger_json("gc")["data"]
            assert not done["errors"], done["errors"]
            assert {r["name"] for r in done["rows"]} == {"stuck-1", "rm-1"}
            assert f"vm/{stopped['id']}" in {b["lock"] for b in done["busy"]}
            # what the dead create recorded is gone, with its row, dirs, TAP claim and neighbour entry
            assert not procs.alive(*vmm) and not sdir.exists() and not srun.exists()
            with Store(cfg.db_path) as st:
                assert st.query("SELECT name, state FROM taps") == [{"name": tap, "state": "idle"}]
            assert netns.neighbours(cfg.bridge) == []
            assert not procs.alive(*rm_vmm) and not cfg.vm_dir(rm_vm["id"]).exists()
            assert netns.call("policy.list_nat(ctx)")["value"] == []
            # loops: the dead promote's and the orphan VM dir's detached; the busy VM's, the live promote's
            # and the user's own kept
            left = set(_loops_under(home))
            assert dead_img_loop not in left and orphan_vm_loop not in left
            assert {live_vm_loop, live_img_loop, users_loop} <= left
            assert not (home / "vms" / "orphan-dir").exists() and not dead_promote.exists()
            assert not dead_part.exists() and live_part.exists()
            assert not orphan_snap.exists() and publishing_snap.exists()
            assert done["processes"] == []  # the stopped VM was busy: decided next time
            names = {v["name"] for v in banger_json("vm", "list")["data"]}
            assert names == {"busy-1", "live-1", "stopped-1"}
            # live things untouched; a user's processes naming our files untouched
            assert procs.alive(*live_vmm) and cfg.vm_run_dir(live["id"]).exists()
            assert procs.alive(*busy_vmm) and cfg.vm_dir(busy["id"]).exists() and cfg.vm_run_dir(busy["id"]).exists()
            assert live_promote.exists()
            assert tail.poll() is None and procs.alive(*reader)

            # the stopped VM, no longer busy: its recorded stray goes, its disk loop too; the user's stay
            again = banger_json("gc")["data"]
            assert not again["errors"], again["errors"]
            assert [p["pid"] for p in again["processes"]] == [stray[0]] and not procs.alive(*stray)
            assert [lo["name"] for lo in again["loops"]] == [live_vm_loop]
            assert tail.poll() is None and procs.alive(*reader)

            third = banger_json("gc")["data"]
            assert third["total"] == 0, third
    finally:
        if tail is not None:
            tail.kill()
        for p, s in started:
            procs.kill(p, s)
        for dev in _loops_under(home):
            subprocess.run(["losetup", "-d", dev])
