"""`banger gc` on real leftovers: a stuck `creating` row, a stray VMM-like process, a loop device,
runtime dirs, an orphan VM dir and a dead owner's staging dir. Live things are left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from banger.config import load_config
from banger.host import procs
from banger.host.fsutil import atomic_write_json
from banger.names import Subnet
from banger.state.locks import Locks
from banger.state.reservation import reserve_vm
from banger.state.store import Store
from tests.support.netns import netns  # noqa: F401  (fixture: gc's TAP scan must not see the host's links)


def _dead_process() -> dict:
    pid, start = procs.spawn_detached([sys.executable, "-c", "pass"])
    assert procs.kill(pid, start, wait=10)
    return {"pid": pid, "start": start}


def _reserve(cfg, name, state, creator):
    with Store(cfg.db_path) as st:
        return reserve_vm(st, Subnet(cfg.subnet), name=name, image="img", kernel="k", backend="qemu", vcpu=1,
                          memory_mib=256, overlay_size_mib=64, work_disk_size_mib=64, state=state,
                          options={"creator": creator})


def _loops_under(home) -> list[str]:
    out = subprocess.run(["losetup", "--json", "--list", "--output", "NAME,BACK-FILE"], capture_output=True,
                         text=True).stdout
    return [d["name"] for d in (json.loads(out)["loopdevices"] if out.strip() else [])
            if (d.get("back-file") or "").startswith(str(home))]


def test_gc_removes_leftovers_and_spares_live_things(netns):  # noqa: F811
    banger_json = netns.banger_json
    cfg = load_config()
    home = cfg.home
    # a create killed mid-way: row 'creating', its dirs, a VMM-like process pointing into them
    stuck = _reserve(cfg, "stuck-1", "creating", _dead_process())
    sdir = cfg.vm_dir(stuck["id"])
    sdir.mkdir(parents=True)
    (sdir / "overlay.ext4").write_bytes(b"\0" * 4096)
    srun = cfg.vm_run_dir(stuck["id"])
    srun.mkdir(parents=True)
    (srun / "qmp.sock").write_text("")
    tap = netns.call(f"pool.claim(ctx, {stuck['id']!r})")["value"]
    netns.call(f"netlink.set_neighbour(ctx.cfg.bridge, {stuck['ip']!r}, {stuck['mac']!r})")
    assert [n["dst"] for n in netns.neighbours(cfg.bridge)] == [stuck["ip"]]
    stray_pid, stray_start = procs.spawn_detached(
        [sys.executable, "-c", "import time; time.sleep(300)", f"file={sdir}/overlay.ext4"])
    # a loop device left by a killed promote (backed by a file under BANGER_HOME)
    img = home / "vms" / "orphan-dir" / "disk.img"
    img.parent.mkdir(parents=True)
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", str(img)], capture_output=True, text=True,
                          check=True).stdout.strip()
    # a staging dir whose owner died, and one whose owner lives
    dead_stage = cfg.staging_dir / "promote-x-dead"
    dead_stage.mkdir(parents=True)
    d = _dead_process()
    (dead_stage / ".owner").write_text(f"{d['pid']} {d['start']}\n")
    live_stage = cfg.staging_dir / "promote-y-live"
    live_stage.mkdir()
    (live_stage / ".owner").write_text(f"{os.getpid()} {procs.start_time(os.getpid())}\n")
    # a snapshot dir without a row (a killed `snapshot create` after its rename), and one whose
    # publish is in progress (its snapshot/<name> lock is held)
    orphan_snap = cfg.snapshots_dir / "snap-orphan"
    orphan_snap.mkdir(parents=True)
    (orphan_snap / "vm.mem").write_bytes(b"\0" * 4096)
    publishing_snap = cfg.snapshots_dir / "snap-publishing"
    publishing_snap.mkdir()
    # a create in progress (creator alive, holding its lock) and a running VM with its VMM
    busy = _reserve(cfg, "busy-1", "creating", {"pid": os.getpid(), "start": procs.start_time(os.getpid())})
    cfg.vm_dir(busy["id"]).mkdir(parents=True)
    run_pid, run_start = procs.spawn_detached(
        [sys.executable, "-c", "import time; time.sleep(300)", f"{cfg.vm_run_dir('x')}/../live/qmp.sock"])
    live = _reserve(cfg, "live-1", "running", {})
    cfg.vm_dir(live["id"]).mkdir(parents=True)
    live_pid, live_start = procs.spawn_detached(
        [sys.executable, "-c", "import time; time.sleep(300)", f"{cfg.vm_dir(live['id'])}/work.ext4"])
    atomic_write_json(cfg.vm_dir(live["id"]) / "handles.json", {"pid": live_pid, "pid_start": live_start})
    cfg.vm_run_dir(live["id"]).mkdir(parents=True)
    try:
        with Locks(cfg.locks_dir).hold(f"vm/{busy['id']}"), Locks(cfg.locks_dir).hold("snapshot/snap-publishing"):
            dry = banger_json("gc", "--dry-run")["data"]
            assert dry["dry_run"] and {r["name"] for r in dry["rows"]} == {"stuck-1"}
            assert stray_pid in {p["pid"] for p in dry["processes"]}
            assert live_pid not in {p["pid"] for p in dry["processes"]}
            assert loop in {lo["name"] for lo in dry["loops"]}
            assert str(dead_stage) in dry["staging"] and str(live_stage) not in dry["staging"]
            assert dry["snapshots"] == [str(orphan_snap)]
            # nothing was touched by the dry run
            assert procs.alive(stray_pid, stray_start) and sdir.exists() and loop in _loops_under(home)

            done = banger_json("gc")["data"]
            assert not done["errors"], done["errors"]
            assert not procs.alive(stray_pid, stray_start)
            assert loop not in _loops_under(home)
            assert not sdir.exists() and not srun.exists() and not dead_stage.exists()
            assert not (home / "vms" / "orphan-dir").exists()
            assert not orphan_snap.exists() and publishing_snap.exists()
            with Store(cfg.db_path) as st:  # the TAP went back to the pool; no neighbour entry is left
                assert st.query("SELECT name, state FROM taps") == [{"name": tap, "state": "idle"}]
            assert netns.neighbours(cfg.bridge) == []
            names = {v["name"] for v in banger_json("vm", "list")["data"]}
            assert names == {"busy-1", "live-1"}
            # live things untouched
            assert procs.alive(live_pid, live_start) and cfg.vm_run_dir(live["id"]).exists()
            assert cfg.vm_dir(busy["id"]).exists() and live_stage.exists()

            again = banger_json("gc")["data"]
            assert again["total"] == 0, again
    finally:
        for p, s in ((stray_pid, stray_start), (run_pid, run_start), (live_pid, live_start)):
            procs.kill(p, s)
        for dev in _loops_under(home):
            subprocess.run(["losetup", "-d", dev])
