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
from banger.host.fsutil import atomic_write_json, reflink_or_sparse_copy, rename_durably
from banger.vms import runtime as vms

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
        if st == vms.PAUSED:  # an earlier snapshot create was killed with the guest paused
            vms.resume_orphaned(ctx, vm, h)
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
            from banger.state.staging import OWNER_FILE, write_owner

            write_owner(staging)  # a killed create leaves a staging dir `banger gc` can reclaim
            published = False
            try:
                meta = _capture(ctx, vm, h, staging)
                meta["create_ms"] = round((time.monotonic() - t0) * 1000, 1)
                meta["size_bytes"] = _dir_size(staging)
                atomic_write_json(staging / META, meta)
                (staging / OWNER_FILE).unlink()
                final.parent.mkdir(parents=True, exist_ok=True)
                rename_durably(staging, final)
                published = True
                with ctx.store.immediate() as c:
                    c.execute("INSERT INTO snapshots (name, vm_id, vm_name, backend, dir, meta, created_at) "
                              "VALUES (?,?,?,?,?,?,?)",
                              (name, vm["id"], vm["name"], vm["backend"], str(final), json.dumps(meta, sort_keys=True),
                               time.time()))
            except BaseException:
                from banger.interrupts import shielded

                with shielded():  # a second Ctrl-C / SIGTERM must not cut the clean-up short
                    shutil.rmtree(final if published else staging, ignore_errors=True)
                raise
    return view(get(ctx, name))


def _capture(ctx, vm: dict, h: dict, staging: Path) -> dict:
    """Pause, write the VMM snapshot, copy the per-VM disks while paused, resume (always)."""
    driver = vms.vm_driver(ctx, vm)
    d = vms.vm_dir(ctx, vm)
    copies = {}
    ctx.progress.step("pausing the guest and writing its memory")
    from banger.interrupts import shielded

    vms.mark_pausing(ctx, vm, h, "snapshot")  # before pausing: a kill -9 from here on is detectable
    try:
        vmm_meta = driver.snapshot(h, staging)
        from banger.vms.plan import pause_point

        pause_point(ctx, vm["id"], "snapshot", "vmm.snapshot")  # test hook: the guest is paused here
        ctx.progress.step("copying the overlay and work disks")
        for f in DISKS:
            copies[f] = reflink_or_sparse_copy(d / f, staging / f)
        if (d / vms.KNOWN_HOSTS).exists():
            shutil.copyfile(d / vms.KNOWN_HOSTS, staging / KNOWN_HOSTS)
    finally:
        with shielded():  # a second Ctrl-C / SIGTERM must not leave the guest paused
            try:
                driver.resume(h)
            except BangerError:
                if vms.vmm_alive(ctx, vm, h):
                    raise
            else:
                vms.clear_pausing(ctx, vm, h)
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


# the restore plan: the boot plan with the disk steps replaced by a copy of the snapshot's disks,
# the launch replaced by a VMM restore, and the re-address step inserted after it
def _copy_disks(run):
    d = vms.vm_dir(run.ctx, run.vm)
    for f in run.meta.get("disks", DISKS):
        reflink_or_sparse_copy(run.sdir / f, d / f)
    kh = run.sdir / KNOWN_HOSTS
    if kh.exists():  # same guest, same host key; new address
        key = kh.read_text().split(None, 1)[1].strip()
        (d / vms.KNOWN_HOSTS).write_text(f"{run.vm['ip']} {key}\n")


def _uncopy_disks(run):
    d = vms.vm_dir(run.ctx, run.vm)
    for f in (*DISKS, vms.KNOWN_HOSTS):
        (d / f).unlink(missing_ok=True)


def _vmm_restore(run):
    from banger.vms import plans

    spec = vms.vm_spec(run.ctx, run.vm, run.tap)
    vms.run_dir(run.ctx, run.vm).mkdir(parents=True, exist_ok=True)
    plans.launched(run, lambda: vms.vm_driver(run.ctx, run.vm).restore(spec, run.sdir, run.meta["vmm"],
                                                                        run.ctx.progress))
    run.timings["vmm_restored_ms"] = round((time.monotonic() - run.t0) * 1000, 1)


def _release_snapshot(run):
    run.snap_lock.close()  # the VMM (or its UFFD handler) holds what it still needs open


def _readdress(run):
    vms.vm_driver(run.ctx, run.vm).send_console(run.handles, net_line(run.ctx, run.vm))


def _check_snapshot(run):
    if _row(run.ctx, run.snapshot) is None:
        raise NotFound(f"snapshot {run.snapshot!r} was removed meanwhile", "pick another snapshot")


def restore_plan(*, wait_ssh: bool = True):
    from banger.vms import plans
    from banger.vms.plan import Step

    return (plans.boot_plan("restore", wait_ssh=wait_ssh)
            .insert_before("prepare", Step("snapshot.check", _check_snapshot))
            .replace("disk.work", Step("disk.copy", _copy_disks, _uncopy_disks, "copying disks"))
            .without("disk.overlay")
            .replace("vmm.launch",
                     Step("vmm.restore", _vmm_restore, plans.unlaunch,
                          lambda run: f"restoring with {run.vm['backend']}"),
                     Step("snapshot.release", _release_snapshot),
                     Step("guest.net", _readdress, None, "giving the guest its new address")))


def restore(ctx, snapshot: str, name: str | None = None, *, wait_ssh: bool = True) -> dict:
    """Start a new VM from ``snapshot``; returns its view (as `vm show`), plus restore timings."""
    from banger.guest.names import new_vm_id
    from banger.host import procs
    from banger.state.reservation import reserve_vm
    from banger.vms import lifecycle, plan

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
        if ctx.store.vm_by_name(name) is not None:
            raise vms.name_taken(name)
    o["creator"] = {"pid": os.getpid(), "start": procs.start_time(os.getpid())}
    o["restored_from"] = snapshot
    timings: dict = {}
    vm_id = new_vm_id()
    # the new VM's lock first, then its row (never visible unlocked; see vms.lifecycle.create)
    with ctx.locks.hold(f"vm/{vm_id}", purpose="restore"), ExitStack() as snap_lock:
        try:
            try:
                vm = reserve_vm(ctx.store, Subnet(ctx.cfg.subnet), name=name, image=meta.get("image"),
                                kernel=meta.get("kernel"), backend=snap["backend"], vcpu=meta["vcpu"],
                                memory_mib=meta["memory_mib"], overlay_size_mib=meta["overlay_size_mib"],
                                work_disk_size_mib=meta["work_disk_size_mib"], nat=bool(meta.get("nat")), options=o,
                                vm_id=vm_id)
            except BangerError as e:
                if e.code == "conflict" and name:
                    raise vms.name_taken(name) from None
                raise
            # held while the snapshot's files are read (disk copies, VMM start); released before the guest waits
            snap_lock.enter_context(ctx.locks.hold(f"snapshot/{snapshot}", purpose="restore"))
            run = plan.execute(ctx, vm, restore_plan(wait_ssh=wait_ssh), delete_on_unwind=True,
                               snapshot=snapshot, sdir=sdir, meta=meta, snap_lock=snap_lock, timings=timings,
                               t0=time.monotonic())
        except BaseException:
            lifecycle.drop_unstarted(ctx, vm_id)
            raise
        if wait_ssh:
            timings["ssh_ready_ms"] = round((time.monotonic() - run.t0) * 1000, 1)
        out = lifecycle.view(ctx, ctx.store.vm_by_id(vm["id"]), stages=True)  # under the lock
        h = vms.load_handles(ctx, vm)
    if run.transport is not None:
        run.transport.close()
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
