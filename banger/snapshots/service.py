"""Snapshots of running VMs, and clones restored from them (both backends).

A snapshot is a directory ``$BANGER_HOME/snapshots/<name>/`` holding the VMM's
state + memory files (Firecracker: ``vm.state`` + ``vm.mem``; QEMU: a migration
stream), copies of the VM's overlay and work disks taken while the guest was
paused, the VM's SSH host public key (``known_hosts``) and ``meta.json``; plus one
row in the ``snapshots`` table.  It is built in a private staging directory and
published by rename + row insert under ``snapshot/<name>``, so a half-written
snapshot is never visible.

Restoring makes a NEW VM (its own name, slot, IP, MAC, TAP and disks): reserve a
row, copy the disks, claim a TAP, let the driver start a VMM from the snapshot,
then tell the guest its new address on the serial console
(``@banger net <ip/prefix> <gw> <mac> <hostname>``; the guest's memory still holds
the old one) and, by default, wait for SSH.  Every step has an undo.

Locks (ARCHITECTURE.md order vm -> snapshot): create holds ``vm/<id>`` then
``snapshot/<name>``; restore holds the new ``vm/<id>`` then ``snapshot/<name>``
(so the snapshot cannot be removed under it); rm holds ``snapshot/<name>``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

from banger.errors import BangerError, Conflict, InvalidState, NotFound
from banger.guest.names import Subnet, validate_name
from banger.host.fsutil import atomic_write_json, reflink_or_sparse_copy
from banger.vms import lifecycle as vms
from banger.vms.plan import Steps

META = "meta.json"
KNOWN_HOSTS = "known_hosts"
DISKS = (vms.OVERLAY, vms.WORK)


# ---------------------------------------------------------------- lookups
def _row(ctx, name: str) -> dict | None:
    row = ctx.store.one("SELECT * FROM snapshots WHERE name = ?", (name,))
    if row is None:
        return None
    row = dict(row)
    row["meta"] = json.loads(row.get("meta") or "{}")
    return row


def get(ctx, name: str) -> dict:
    row = _row(ctx, name)
    if row is None:
        raise NotFound(f"no snapshot named {name!r}", "list snapshots with: banger snapshot list")
    return row


def view(row: dict) -> dict:
    m = row["meta"]
    return {"name": row["name"], "vm_id": row["vm_id"], "vm_name": row["vm_name"], "backend": row["backend"],
            "dir": row["dir"], "created_at": row["created_at"], "image": m.get("image"), "kernel": m.get("kernel"),
            "vcpu": m.get("vcpu"), "memory_mib": m.get("memory_mib"), "size_bytes": m.get("size_bytes"),
            "create_ms": m.get("create_ms"), "exists": Path(row["dir"]).is_dir()}


def list_snapshots(ctx) -> list[dict]:
    rows = ctx.store.query("SELECT * FROM snapshots ORDER BY created_at, name")
    for r in rows:
        r["meta"] = json.loads(r.get("meta") or "{}")
    return [view(r) for r in rows]


def show(ctx, name: str) -> dict:
    row = get(ctx, name)
    return {**view(row), "meta": row["meta"]}


def _dir_size(d: Path) -> int:
    total = 0
    for p in d.iterdir():
        if p.is_file():
            total += p.stat().st_blocks * 512
    return total


def default_name(vm: dict) -> str:
    return f"{vm['name'][:40]}-{time.strftime('%Y%m%d-%H%M%S')}".lower()


# ---------------------------------------------------------------- create
def create(ctx, vm_ref: str, name: str | None = None) -> dict:
    """Snapshot a running VM: the guest is paused while memory and disks are copied, then resumed."""
    vm = vms.get(ctx, vm_ref)
    name = name or default_name(vm)
    validate_name(name, "snapshot name")
    if _row(ctx, name) is not None:  # fail fast; re-checked under the lock
        raise _taken(name)
    t0 = time.monotonic()
    with ctx.locks.hold(f"vm/{vm['id']}", purpose="snapshot"):
        vm = vms.get(ctx, vm["id"])
        h = vms.load_handles(ctx, vm)
        st = vms.effective_state(ctx, vm, h)
        if st != vms.RUNNING:
            raise InvalidState(f"VM {vm['name']} is {st}; only a running VM can be snapshotted",
                               f"start it first: banger vm start {vm['name']}")
        with ctx.locks.hold(f"snapshot/{name}", purpose="create"):
            if _row(ctx, name) is not None:
                raise _taken(name)
            final = ctx.cfg.snapshots_dir / name
            if final.exists():
                raise Conflict(f"{final} exists but no snapshot row names it",
                               "run `banger gc` to remove orphaned directories, or pick another name")
            staging = ctx.cfg.staging_dir / f"snapshot-{name}-{secrets.token_hex(4)}"
            staging.mkdir(parents=True)
            from banger.gc.service import OWNER_FILE, write_owner

            write_owner(staging)  # a killed create leaves a staging dir `banger gc` can reclaim
            published = False
            try:
                meta = _capture(ctx, vm, h, staging)
                meta["create_ms"] = round((time.monotonic() - t0) * 1000, 1)
                meta["size_bytes"] = _dir_size(staging)
                atomic_write_json(staging / META, meta)
                (staging / OWNER_FILE).unlink()
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(staging, final)
                published = True
                with ctx.store.immediate() as c:
                    c.execute("INSERT INTO snapshots (name, vm_id, vm_name, backend, dir, meta, created_at) "
                              "VALUES (?,?,?,?,?,?,?)",
                              (name, vm["id"], vm["name"], vm["backend"], str(final), json.dumps(meta, sort_keys=True),
                               time.time()))
            except BaseException:
                shutil.rmtree(final if published else staging, ignore_errors=True)
                raise
    return view(get(ctx, name))


def _capture(ctx, vm: dict, h: dict, staging: Path) -> dict:
    """Pause, write the VMM snapshot, copy the per-VM disks while paused, resume (always)."""
    driver = vms.vm_driver(ctx, vm)
    d = vms.vm_dir(ctx, vm)
    copies = {}
    ctx.progress.step("pausing the guest and writing its memory")
    try:
        vmm_meta = driver.snapshot(h, staging)
        ctx.progress.step("copying the overlay and work disks")
        for f in DISKS:
            copies[f] = reflink_or_sparse_copy(d / f, staging / f)
        if (d / vms.KNOWN_HOSTS).exists():
            shutil.copyfile(d / vms.KNOWN_HOSTS, staging / KNOWN_HOSTS)
    finally:
        try:
            driver.resume(h)
        except BangerError:
            if vms.vmm_alive(ctx, vm, h):
                raise
    o = vm["options"] or {}
    return {"vmm": vmm_meta, "backend": vm["backend"], "vm_id": vm["id"], "vm_name": vm["name"],
            "image": vm["image"], "kernel": vm["kernel"], "vcpu": vm["vcpu"], "memory_mib": vm["memory_mib"],
            "overlay_size_mib": vm["overlay_size_mib"], "work_disk_size_mib": vm["work_disk_size_mib"],
            "nat": vm["nat"], "ip": vm["ip"], "mac": vm["mac"], "disks": list(DISKS), "disk_copy": copies,
            "options": {k: o.get(k) for k in ("rootfs", "vmlinux", "bzimage", "initrd", "init", "kernel_version",
                                              "work_seed")},
            "rootfs_fingerprint": _fingerprint(o.get("rootfs")), "created_at": time.time()}


def _fingerprint(path) -> dict | None:
    """Identity of the shared read-only image the guest's overlay sits on (it must not change under a clone)."""
    try:
        st = os.stat(path)
    except (OSError, TypeError):
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _taken(name: str) -> Conflict:
    return Conflict(f"a snapshot named {name!r} already exists",
                    f"pick another name, or remove it first: banger snapshot rm {name}")


# ---------------------------------------------------------------- rm
def remove(ctx, name: str) -> dict:
    with ctx.locks.hold(f"snapshot/{name}", purpose="rm"):
        row = get(ctx, name)
        ctx.store.execute("DELETE FROM snapshots WHERE name = ?", (name,))
        # a running clone keeps its memory file mapped (or open in its UFFD handler): unlinking is safe.
        # Rename first: a clone's handler may still write its access log into the directory after the
        # restore released this lock; the log writer never re-creates the directory, and whatever lands
        # in the renamed one goes with it (or with gc, which reaps ownerless staging dirs).
        trash = ctx.cfg.staging_dir / f"snapshot-rm-{name}-{os.getpid()}"
        ctx.cfg.staging_dir.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(row["dir"], trash)
        except FileNotFoundError:
            trash = None
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return {"name": name, "deleted": True}


# ---------------------------------------------------------------- restore
def net_line(ctx, vm: dict) -> str:
    sn = Subnet(ctx.cfg.subnet)
    return f"@banger net {vm['ip']}/{sn.prefixlen} {sn.gateway} {vm['mac']} {vm['name']}"


def restore(ctx, snapshot: str, name: str | None = None, *, wait_ssh: bool = True) -> dict:
    """Start a new VM from ``snapshot``; returns its view (as `vm show`), plus restore timings."""
    from banger.host import procs
    from banger.state.reservation import reserve_vm

    snap = get(ctx, snapshot)
    meta = snap["meta"]
    sdir = Path(snap["dir"])
    if not (sdir / META).exists():
        raise NotFound(f"snapshot {snapshot!r} has no files at {sdir}",
                       f"remove the stale entry: banger snapshot rm {snapshot}")
    o = dict(meta.get("options") or {})
    for k in ("rootfs", "initrd"):
        if not o.get(k) or not Path(o[k]).exists():
            raise NotFound(f"the {k} snapshot {snapshot!r} was taken with is gone: {o.get(k)}",
                           f"re-pull image {meta.get('image')!r} / kernel {meta.get('kernel')!r}, or re-create "
                           f"the snapshot")
    fp = meta.get("rootfs_fingerprint")
    if fp and _fingerprint(o["rootfs"]) != fp:
        raise Conflict(f"image {meta.get('image')!r} changed since snapshot {snapshot!r} was taken "
                       f"({o['rootfs']}); the guest's overlay would sit on a different root",
                       "re-create the snapshot from a VM running the current image")
    if name is not None:
        validate_name(name)
        if ctx.store.get_vm(name) is not None:
            raise vms.name_taken(name)
    o["creator"] = {"pid": os.getpid(), "start": procs.start_time(os.getpid())}
    o["restored_from"] = snapshot
    try:
        vm = reserve_vm(ctx.store, Subnet(ctx.cfg.subnet), name=name, image=meta.get("image"),
                        kernel=meta.get("kernel"), backend=snap["backend"], vcpu=meta["vcpu"],
                        memory_mib=meta["memory_mib"], overlay_size_mib=meta["overlay_size_mib"],
                        work_disk_size_mib=meta["work_disk_size_mib"], nat=bool(meta.get("nat")), options=o)
    except BangerError as e:
        if e.code == "conflict" and name:
            raise vms.name_taken(name) from None
        raise
    t0 = time.monotonic()
    timings = {}
    transport = None
    with ctx.locks.hold(f"vm/{vm['id']}", purpose="restore"), ExitStack() as snap_lock:
        # held while the snapshot's files are read (disk copies, VMM start); released before the guest waits
        snap_lock.enter_context(ctx.locks.hold(f"snapshot/{snapshot}", purpose="restore"))
        steps = Steps(ctx, vm["id"], "restore")
        state: dict = {}
        try:
            if _row(ctx, snapshot) is None:
                raise NotFound(f"snapshot {snapshot!r} was removed meanwhile", "pick another snapshot")
            d = vms.vm_dir(ctx, vm)

            def prepare():
                d.mkdir(parents=True, exist_ok=False)

            def unprepare():
                shutil.rmtree(d, ignore_errors=True)
                shutil.rmtree(vms.run_dir(ctx, vm), ignore_errors=True)

            steps.run("prepare", prepare, unprepare)

            def disks():
                for f in meta.get("disks", DISKS):
                    reflink_or_sparse_copy(sdir / f, d / f)
                kh = sdir / KNOWN_HOSTS
                if kh.exists():  # same guest, same host key; new address
                    key = kh.read_text().split(None, 1)[1].strip()
                    (d / vms.KNOWN_HOSTS).write_text(f"{vm['ip']} {key}\n")

            steps.run("disk.copy", disks, lambda: [(d / f).unlink(missing_ok=True)
                                                   for f in (*DISKS, vms.KNOWN_HOSTS)],
                      message="copying disks")

            def net():
                state["tap"] = vms.net_up(ctx, vm)

            steps.run("net.tap", net, lambda: vms.net_down(ctx, vm), message="network")

            def launch():
                spec = vms.vm_spec(ctx, vm, state["tap"])
                vms.run_dir(ctx, vm).mkdir(parents=True, exist_ok=True)
                h = vms.vm_driver(ctx, vm).restore(spec, sdir, meta["vmm"], ctx.progress)
                state["handles"] = h
                vms.save_handles(ctx, vm, h)

            def unlaunch():
                h = state.get("handles") or vms.load_handles(ctx, vm)
                if h:
                    vms.vm_driver(ctx, vm).kill(h)
                (d / vms.HANDLES).unlink(missing_ok=True)
                shutil.rmtree(vms.run_dir(ctx, vm), ignore_errors=True)

            steps.run("vmm.restore", launch, unlaunch, message=f"restoring with {snap['backend']}")
            timings["vmm_restored_ms"] = round((time.monotonic() - t0) * 1000, 1)
            snap_lock.close()  # the VMM (or its UFFD handler) holds what it still needs open
            steps.run("guest.net", lambda: vms.vm_driver(ctx, vm).send_console(state["handles"],
                                                                               net_line(ctx, vm)),
                      message="giving the guest its new address")
            if wait_ssh:
                transport = steps.run("guest.ssh", lambda: vms.wait_for_ssh(ctx, vm, state["handles"]),
                                      message="waiting for SSH")
                timings["ssh_ready_ms"] = round((time.monotonic() - t0) * 1000, 1)
            ctx.store.update_vm(vm["id"], state=vms.RUNNING, error=None)
            steps.forget()
        except BaseException as e:
            if vms.kept_for_inspection(ctx, vm, steps, e):
                ctx.store.update_vm(vm["id"], state=vms.RUNNING, error=e.message)
                steps.forget()
                raise
            errs = steps.unwind()
            reason = e.message if isinstance(e, BangerError) else f"{type(e).__name__}: {e}"
            if errs:  # keep the row in `error` so `banger gc` finds what could not be undone
                reason += " (clean-up incomplete: " + "; ".join(errs) + "; run banger gc)"
                ctx.store.update_vm(vm["id"], state=vms.ERROR, error=reason)
            else:  # nothing is left behind: the reserved row goes too (the name and slot are free again)
                ctx.store.delete_vm_row(vm["id"])
            raise
    if transport is not None:
        transport.close()
    out = vms.view(ctx, ctx.store.get_vm(vm["id"]), stages=True)
    h = vms.load_handles(ctx, vm)
    out["restored_from"] = snapshot
    out["restore"] = {**timings, **({"vmm": h.get("restore_timings")} if h.get("restore_timings") else {}),
                      "mem_backend": h.get("mem_backend")}
    return out


def orphans(ctx) -> list[Path]:
    """Snapshot directories without a row (for gc)."""
    names = {r["name"] for r in ctx.store.query("SELECT name FROM snapshots")}
    d = ctx.cfg.snapshots_dir
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name not in names)
