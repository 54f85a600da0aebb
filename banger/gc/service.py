"""`banger gc`: find and remove what crashed or killed commands left behind.

What counts as a leak (each only within this BANGER_HOME / BANGER_RUN):
- rows stuck in ``creating`` whose ``vm/<id>`` lock nobody holds and whose creating
  process is gone: everything they built is torn down and the row removed;
- VMM / helper processes whose command line points into our state or runtime dirs
  but that are not the recorded process of a running VM;
- TAPs the pool reports as leaked (idle pooled TAPs are capacity, not leaks);
- runtime dirs (sockets) under ``$BANGER_RUN/vms`` of VMs that are not running, and
  stale ``paused-*`` markers of the test hook;
- loop devices whose backing file lies under BANGER_HOME and no operation holds;
- VM dirs without a row, and staging dirs whose owner process is gone;
- VMs whose --ttl ran out, nftables rules of VMs that are not running, and the VM names
  (banger/gc/network.py);
- warm-pool clones (state ``pooled``) are capacity while their VMM lives; one whose VMM died is
  removed; a ``claiming`` row whose claimer died goes back to the pool if the clone is still paused,
  else becomes a claimed running VM (banger.vmpool.service.recover);
- shared guest-RAM files (banger.templates.ram) whose creating process is gone.
``dry_run`` only reports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

from banger.errors import BangerError, LockTimeout
from banger.host import procs
from banger.state.staging import MAX_AGE_S as STAGING_MAX_AGE_S
from banger.state.staging import owner_alive as _owner_alive
from banger.vms import runtime as vms


def _our_processes(ctx) -> list[dict]:
    """Processes whose argv mentions our vms dir or runtime dir (VMMs, UFFD handlers)."""
    marks = [str(ctx.cfg.vms_dir) + "/", str(ctx.cfg.run / "vms") + "/"]
    me = os.getpid()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        text = " ".join(a.decode(errors="replace") for a in argv)
        if "banger.cli.main" in text or "/bin/banger" in text:
            continue  # a banger command (e.g. a paused create) is not a VMM; its row says whether it is stale
        for m in marks:
            i = text.find(m)
            if i >= 0:
                vm_id = text[i + len(m):].split("/", 1)[0].split(",", 1)[0].split()[0]
                out.append({"pid": int(d), "start": procs.start_time(int(d)), "vm_id": vm_id,
                            "cmd": text[:160]})
                break
    return out


def _loop_devices(ctx) -> list[dict]:
    from banger.host.runner import run, which

    if not which("losetup"):
        return []
    cp = run([which("losetup"), "--json", "--list", "--output", "NAME,BACK-FILE"], check=False, timeout=30)
    if cp.returncode != 0 or not cp.stdout.strip():
        return []
    home = str(ctx.cfg.home.resolve()) + "/"
    out = []
    for d in json.loads(cp.stdout).get("loopdevices", []):
        bf = (d.get("back-file") or "").removesuffix(" (deleted)")
        if bf.startswith(home) or bf.startswith(str(ctx.cfg.home) + "/"):
            out.append({"name": d["name"], "back_file": bf})
    return out


def _detach_loop(dev: str) -> None:
    from banger.host.runner import require, run

    # unmount anything still mounted from it (deepest first), then detach
    cp = run([require("findmnt"), "-rn", "-o", "TARGET", "-S", dev], check=False, timeout=30)
    for target in sorted((cp.stdout or "").split(), key=len, reverse=True):
        run([require("umount"), "-l", target], check=False, timeout=60)
    run([require("losetup"), "-d", dev], check=False, timeout=30)


def collect(ctx, *, dry_run: bool = False) -> dict:
    report: dict[str, list] = {"rows": [], "processes": [], "taps": [], "sockets": [], "loops": [],
                               "vm_dirs": [], "staging": [], "snapshots": [], "errors": []}
    cfg = ctx.cfg

    def err(what, e):
        report["errors"].append(f"{what}: {e.message if isinstance(e, BangerError) else e}")

    from banger.gc import network  # expiry, stale nftables rules, VM names (banger/gc/network.py)

    network.expired(ctx, report, dry_run=dry_run)  # first: what it deletes is then no leak below

    # 1. rows stuck in `creating` (their creator died without unwinding)
    stale = set()
    for vm in ctx.store.list_vms():
        if vm["state"] != vms.CREATING or vms.creator_alive(vm) or ctx.locks.is_held(f"vm/{vm['id']}"):
            continue
        report["rows"].append({"id": vm["id"], "name": vm["name"]})
        stale.add(vm["id"])
        if dry_run:
            continue
        try:
            with ctx.locks.hold(f"vm/{vm['id']}", timeout=0, purpose="gc"):
                cur = ctx.store.get_vm(vm["id"])
                if cur and cur["state"] == vms.CREATING and not vms.creator_alive(cur):
                    for p in _our_processes(ctx):  # a VMM spawned before handles.json was written
                        if p["vm_id"] == vm["id"]:
                            procs.kill(p["pid"], p["start"], signal.SIGKILL)
                    vms.destroy_vm(ctx, cur)
        except LockTimeout:
            report["rows"].pop()
            stale.discard(vm["id"])
        except BangerError as e:
            err(f"row {vm['name']}", e)

    # 1b. the warm VM pool: dead pooled clones go; interrupted claims are settled
    from banger.vmpool import service as vmpool

    report["pool"] = []
    for vm in ctx.store.list_vms():
        dead_pooled = vm["state"] == vms.POOLED and not vms.vmm_alive(ctx, vm)
        dead_claim = vm["state"] == vms.CLAIMING and not vms.creator_alive(vm)
        if not (dead_pooled or dead_claim) or ctx.locks.is_held(f"vm/{vm['id']}"):
            continue
        try:
            with ctx.locks.hold(f"vm/{vm['id']}", timeout=0, purpose="gc"):
                cur = ctx.store.vm_by_id(vm["id"])
                if cur is None or cur["state"] != vm["state"]:
                    continue
                if dead_pooled:
                    if not dry_run:
                        vms.destroy_vm(ctx, cur)
                    report["pool"].append({"id": vm["id"], "name": vm["name"], "done": "removed (VMM gone)"})
                elif not vms.creator_alive(cur):
                    done = vmpool.recover(ctx, cur, dry_run=dry_run)
                    report["pool"].append({"id": vm["id"], "name": vm["name"], "done": done})
        except LockTimeout:
            continue
        except BangerError as e:
            err(f"pooled VM {vm['name']}", e)

    rows = {v["id"]: v for v in ctx.store.list_vms()}

    def legit(vm_id: str, pid: int) -> bool:
        vm = rows.get(vm_id)
        if vm is None:
            return False
        if vm["state"] == vms.CREATING:
            return vm_id not in stale  # a live create's VMM is its own business
        h = vms.load_handles(ctx, vm)
        return pid in {p["pid"] for p in vms.helper_processes(h)}  # every process the backend recorded

    # 2. stray VMM / helper processes
    for p in _our_processes(ctx):
        if legit(p["vm_id"], p["pid"]):
            continue
        report["processes"].append(p)
        if not dry_run and not procs.kill(p["pid"], p["start"], signal.SIGKILL):
            report["errors"].append(f"process {p['pid']} did not die")

    # 3. leaked TAPs (pool's view; idle pooled TAPs are capacity)
    try:
        from banger.net import pool
        for vm in rows.values():
            if vm["state"] not in (vms.CREATING, vms.CLAIMING) and \
                    vms.effective_state(ctx, vm) not in (vms.RUNNING, vms.POOLED):
                names = pool.claimed_by(ctx, vm["id"])
                if names:
                    report["taps"] += [{"name": n, "reason": "claimed_by_stopped_vm", "vm_id": vm["id"]}
                                       for n in names]
                    if not dry_run:
                        pool.release(ctx, vm["id"], destroy=True)
        leaks = pool.leaks(ctx)
        report["taps"] += leaks
        if leaks and not dry_run:
            pool.reap(ctx, [x["name"] for x in leaks])
    except BangerError as e:
        err("taps", e)

    # 4. runtime dirs (sockets) of VMs that are not running; stale pause markers
    rvms = cfg.run / "vms"
    if rvms.is_dir():
        for d in sorted(rvms.iterdir()):
            vm = rows.get(d.name)
            if vm is not None and ((vm["state"] == vms.CREATING and vm["id"] not in stale) or vms.vmm_alive(ctx, vm)):
                continue
            report["sockets"].append(str(d))
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
    for m in cfg.run.glob("paused-*") if cfg.run.is_dir() else []:
        if m.name.removeprefix("paused-") not in rows:
            report["sockets"].append(str(m))
            if not dry_run:
                m.unlink(missing_ok=True)

    # 5. loop devices backed by our files (promote holds vm/<id> while it uses them)
    for lo in _loop_devices(ctx):
        parts = Path(lo["back_file"]).relative_to(cfg.home).parts if lo["back_file"].startswith(
            str(cfg.home)) else ()
        if len(parts) >= 2 and parts[0] == "vms" and ctx.locks.is_held(f"vm/{parts[1]}"):
            continue
        if len(parts) >= 2 and parts[0] == "staging" and _owner_alive(cfg.staging_dir / parts[1]):
            continue
        report["loops"].append(lo)
        if not dry_run:
            _detach_loop(lo["name"])

    # 6. VM dirs without a row; staging dirs whose owner is gone
    if cfg.vms_dir.is_dir():
        for d in sorted(cfg.vms_dir.iterdir()):
            if d.name in rows or ctx.locks.is_held(f"vm/{d.name}"):
                continue
            report["vm_dirs"].append(str(d))
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
    if cfg.staging_dir.is_dir():
        now = time.time()
        for d in sorted(cfg.staging_dir.iterdir()):
            owner = _owner_alive(d)
            try:
                age = now - d.stat().st_mtime
            except OSError:
                continue
            if owner is True or (owner is None and age < STAGING_MAX_AGE_S):
                continue
            report["staging"].append(str(d))
            if not dry_run:
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
                else:
                    d.unlink(missing_ok=True)

    # 7. snapshot dirs without a row (a publish in progress holds snapshot/<name>)
    from banger.snapshots import service as snapshots

    for d in snapshots.orphans(ctx):
        try:
            if ctx.locks.is_held(f"snapshot/{d.name}"):
                continue
        except BangerError:
            pass  # a name no lock could have: certainly not being published
        report["snapshots"].append(str(d))
        if not dry_run:
            shutil.rmtree(d, ignore_errors=True)

    # 8. shared guest-RAM files of processes that are gone (clones that mapped one keep their pages)
    from banger.templates import ram

    for p in ram.stale(cfg):
        report["staging"].append(str(p))
        if not dry_run:
            p.unlink(missing_ok=True)
    network.stale_rules(ctx, report, dry_run=dry_run)
    network.names(ctx, report, dry_run=dry_run)

    report["dry_run"] = dry_run
    report["total"] = sum(len(v) for k, v in report.items() if isinstance(v, list) and k not in ("errors", "busy"))
    return report
