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
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

from banger.errors import BangerError, Conflict, InvalidState, NotFound
from banger.host.fsutil import atomic_write_json, reflink_or_sparse_copy, rename_durably
from banger.names import Subnet, validate_name
from banger.net import fastnet
from banger.snapshots import manifest
from banger.state.staging import OWNER_FILE
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
    """User snapshots (templates are snapshots too: `banger template list` shows those)."""
    rows = ctx.store.query("SELECT * FROM snapshots WHERE kind = 'user' ORDER BY created_at, name")
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
            if (ctx.cfg.snapshots_dir / name).exists():
                raise Conflict(f"{ctx.cfg.snapshots_dir / name} exists but no snapshot row names it",
                               "run `banger gc` to remove orphaned directories, or pick another name")
            from banger.state.staging import new_dir

            staging = new_dir(ctx.cfg, f"snapshot-{name}")  # a killed create leaves what `banger gc` reclaims
            try:
                meta = capture(ctx, vm, h, staging)
                ctx.progress.step("checksumming the snapshot's files")
                t_m = time.monotonic()
                meta["files"] = manifest.build(staging, skip=(META, OWNER_FILE))  # (the guest runs again)
                meta["manifest_ms"] = round((time.monotonic() - t_m) * 1000, 1)
                meta["create_ms"] = round((time.monotonic() - t0) * 1000, 1)
            except BaseException:
                from banger.interrupts import shielded

                with shielded():  # a second Ctrl-C / SIGTERM must not cut the clean-up short
                    shutil.rmtree(staging, ignore_errors=True)
                raise
            publish(ctx, name, staging, meta, vm=vm)
    return view(get(ctx, name))


def publish(ctx, name: str, staging: Path, meta: dict, *, vm, kind: str = "user") -> dict:
    """Publish a filled staging dir as snapshot ``name`` (caller holds ``snapshot/<name>`` and has
    checked the name is free): meta.json, rename into place, row insert. On failure nothing is left."""
    from banger.state.staging import OWNER_FILE

    final = ctx.cfg.snapshots_dir / name
    published = False
    try:
        meta["size_bytes"] = _dir_size(staging)
        atomic_write_json(staging / META, meta)
        (staging / OWNER_FILE).unlink(missing_ok=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        rename_durably(staging, final)
        published = True
        with ctx.store.immediate() as c:
            c.execute("INSERT INTO snapshots (name, vm_id, vm_name, backend, dir, meta, created_at, kind) "
                      "VALUES (?,?,?,?,?,?,?,?)",
                      (name, vm["id"], vm["name"], vm["backend"], str(final), json.dumps(meta, sort_keys=True),
                       time.time(), kind))
    except BaseException:
        from banger.interrupts import shielded

        with shielded():  # a second Ctrl-C / SIGTERM must not cut the clean-up short
            shutil.rmtree(final if published else staging, ignore_errors=True)
        raise
    return get(ctx, name)


def capture(ctx, vm, h: dict, staging: Path, *, resume: bool = True, final: bool = False,
            memory_path: Path | None = None) -> dict:
    """Pause, write the VMM snapshot, copy the per-VM disks while paused, then resume (always, unless
    ``resume=False``: a template's builder VM is discarded paused; ``final`` tells the driver so).
    ``memory_path``: where the guest's RAM goes (a fork puts it on a tmpfs; default in ``staging``)."""
    driver = vms.vm_driver(ctx, vm)
    d = vms.vm_dir(ctx, vm)
    copies = {}
    ctx.progress.step("pausing the guest and writing its memory")
    from banger.interrupts import shielded

    vms.mark_pausing(ctx, vm, h, "snapshot")  # before pausing: a kill -9 from here on is detectable
    try:
        vmm_meta = driver.snapshot(h, staging, final=final, memory_path=memory_path)
        from banger.vms.plan import pause_point

        pause_point(ctx, vm["id"], "snapshot", "vmm.snapshot")  # test hook: the guest is paused here
        ctx.progress.step("copying the overlay and work disks")
        for f in DISKS:
            copies[f] = reflink_or_sparse_copy(d / f, staging / f)
        if (d / vms.KNOWN_HOSTS).exists():
            shutil.copyfile(d / vms.KNOWN_HOSTS, staging / KNOWN_HOSTS)
    finally:
        with shielded():  # a second Ctrl-C / SIGTERM must not leave the guest paused
            if resume:
                try:
                    driver.resume(h)
                except BangerError:
                    if vms.vmm_alive(ctx, vm, h):
                        raise
                else:
                    vms.clear_pausing(ctx, vm, h)
    return {"vmm": vmm_meta, **vm_meta(vm), "disks": list(DISKS), "disk_copy": copies, "created_at": time.time()}


def vm_meta(vm) -> dict:
    """What a snapshot's meta says of the VM it was taken of (all a clone's row is reserved from: a fork
    reserves its clones' rows from this while the source's snapshot is still being written)."""
    o = vm["options"] or {}
    return {"backend": vm["backend"], "vm_id": vm["id"], "vm_name": vm["name"],
            "image": vm["image"], "kernel": vm["kernel"], "vcpu": vm["vcpu"], "memory_mib": vm["memory_mib"],
            "overlay_size_mib": vm["overlay_size_mib"], "work_disk_size_mib": vm["work_disk_size_mib"],
            "nat": vm["nat"], "net": vms.net_mode(vm), "allow": vms.net_allow(vm), "ip": vm["ip"], "mac": vm["mac"],
            "options": {k: o.get(k) for k in ("rootfs", "vmlinux", "bzimage", "initrd", "init", "kernel_version",
                                              "work_seed")},
            "rootfs_fingerprint": _fingerprint(o.get("rootfs"))}


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
# the launch replaced by a VMM restore, and the re-address step inserted after it (the TAP kept down
# from before the restore until the guest took its new MAC: net.isolate / net.join)
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
    from banger.guest import control

    serial = vms.vm_dir(run.ctx, run.vm) / vms.SERIAL
    offset = control.log_size(serial)
    vms.vm_driver(run.ctx, run.vm).send_console(run.handles, net_line(run.ctx, run.vm))
    # SSH before the guest took its new MAC loses the first SYN (the NIC still filters on the old one)
    # and costs a whole TCP retransmit timeout (1 s): wait for banger-init's answer first
    sn = Subnet(run.ctx.cfg.subnet)
    control.wait_text(serial, f"banger-init: net {run.vm['ip']}/{sn.prefixlen}", offset=offset,
                      deadline=time.monotonic() + 10)


def _isolate(run):
    """Until it is told its new address, a clone still sends with its source's MAC (and, say, the source's
    TCP segments): on the bridge that would teach the FDB to send the source's (or the template builder's
    slot's) traffic to the clone's port. Its TAP stays off the bridge until then (the console, not the
    network, carries the new address).

    Off the bridge, the TAP can be up again at once (net.tap held it down until its policy is in: here
    the detachment does that, and net.join comes after the policy is joined). Up *before* the VMM opens
    it, so the port forwards the moment it joins: a TAP brought up after QEMU attached is only
    forwarding once linkwatch saw its carrier, up to ~1 s later (measured: a fork's SSH 1.3 s, not 0.36)."""
    fastnet.set_master(run.tap, None)
    fastnet.set_up(run.tap, True)


def _join(run):
    # back on the bridge: QEMU opened the TAP during the restore, so its carrier is on and the port
    # forwards at once (toggling IFF_UP instead waited for linkwatch: up to ~1 s)
    fastnet.set_master(run.tap, run.ctx.cfg.bridge)


def _check_snapshot(run):
    if _row(run.ctx, run.snapshot) is None:
        raise NotFound(f"snapshot {run.snapshot!r} was removed meanwhile", "pick another snapshot")


def _start_verify(run):
    """Under snapshot/<name>: open the big files (memory, disks) and hash them in the background while the
    restore copies disks, starts the VMM, re-addresses the guest and waits for SSH."""
    files = run.meta.get("files")
    run.verifier = manifest.Verifier(run.snapshot, run.sdir, files, run.big_files) if files else None


def _cancel_verify(run):
    if getattr(run, "verifier", None) is not None:
        run.verifier.cancel()


def _await_verify(run):
    """The last step: the clone counts as restored only once every checksum matched (else it is unwound)."""
    if run.verifier is not None:
        t0 = time.monotonic()
        took = run.verifier.result()
        run.timings["verify_s"] = round(took, 3)
        run.timings["verify_wait_ms"] = round((time.monotonic() - t0) * 1000, 1)


def _unlearn_source(run):
    """Forget every MAC the bridge learned on the clone's TAP but the clone's own. Until the guest applied
    the control line it still sent with the source's MAC (IPv6 neighbour traffic, retransmits), and the
    bridge then delivered the running source's traffic to the clone's TAP: the source went unreachable
    until it happened to send a frame itself (found by the smoke suite; per-TAP anti-spoofing in the
    network layer is the complete fix). Runs after the guest answered on its new address (or, with
    --no-wait, after the verify join gave it time to)."""
    from banger.host.runner import run as run_cmd
    from banger.host.runner import which

    if not run.tap or not which("bridge"):
        return
    cp = run_cmd(["bridge", "fdb", "show", "dev", run.tap], check=False, timeout=10)
    own = run.vm["mac"].lower()
    for line in (cp.stdout or "").splitlines():
        parts = line.split()
        if (len(parts) >= 2 and "master" in parts and not {"permanent", "static", "self"} & set(parts)
                and parts[0].lower() != own):
            run_cmd(["bridge", "fdb", "del", parts[0], "dev", run.tap, "master"], check=False, timeout=10)


def restore_plan(*, wait_ssh: bool = True, net: bool = True, ports: bool = False):
    """``net`` False: the snapshot's VM had no network card (--net none): no TAP, no re-address, no SSH;
    ``ports``: claim the -p values right after the snapshot check (a clone publishes none unless asked)."""
    from banger.vms import plans
    from banger.vms.plan import Step

    plan = (plans.boot_plan("restore", wait_ssh=wait_ssh)
            .insert_before("prepare", Step("snapshot.check", _check_snapshot),
                           Step("snapshot.verify", _start_verify, _cancel_verify))
            .replace("disk.work", Step("disk.copy", _copy_disks, _uncopy_disks, "copying disks"))
            .without("disk.overlay")
            .insert_after("net.tap", Step("net.isolate", _isolate, _join))
            .replace("vmm.launch",
                     Step("vmm.restore", _vmm_restore, plans.unlaunch,
                          lambda run: f"restoring with {run.vm['backend']}"),
                     Step("snapshot.release", _release_snapshot),
                     Step("guest.net", _readdress, None, "giving the guest its new address"),
                     Step("net.join", _join, None)))
    plan = plan.insert_after(plan.names()[-1],
                             Step("snapshot.verified", _await_verify, None, "verifying the snapshot's checksums"))
    if ports:
        plan = plan.insert_after("snapshot.check", plans.NET_PORTS)
    if not net:
        return plans.without_network(plan).without("guest.net", "net.isolate", "net.join")
    return plan.insert_after(plan.names()[-1], Step("net.unlearn", _unlearn_source))


def restore(ctx, snapshot: str, name: str | None = None, *, wait_ssh: bool = True, publish=None) -> dict:
    """Start a new VM from ``snapshot``; returns its view (as `vm show`), plus restore timings.
    The clone keeps the snapshot's network mode and --allow list; it publishes only the ``publish``
    (-p) values given here, never the source VM's ports."""
    from banger.host import procs
    from banger.names import new_vm_id
    from banger.net import ports as ports_mod
    from banger.net import publish as publish_mod
    from banger.state.reservation import reserve_vm
    from banger.vms import hostnames, lifecycle, plan

    specs = ports_mod.parse_many(publish)

    snap = get(ctx, snapshot)
    meta = snap["meta"]
    sdir = Path(snap["dir"])
    if not (sdir / META).exists():
        raise NotFound(f"snapshot {snapshot!r} has no files at {sdir}",
                       f"remove the stale entry: banger snapshot rm {snapshot}")
    big_files: list[str] = []
    if meta.get("files"):  # sizes + small files now (ms); memory and disks hash during the restore
        try:
            big_files = manifest.check_present(snapshot, sdir, meta["files"])
        except manifest.IntegrityError:
            if _row(ctx, snapshot) is None:  # an rm won meanwhile: that is not damage
                raise NotFound(f"snapshot {snapshot!r} was removed meanwhile", "pick another snapshot") from None
            raise
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
    mode = meta.get("net") or (vms.NET_NAT if meta.get("nat") else vms.NET_ISOLATED)
    if mode == vms.NET_NONE and specs:
        from banger.errors import UsageError

        raise UsageError(f"snapshot {snapshot!r} is of a VM without a network card (--net none): -p cannot apply",
                         "restore it without -p")
    if specs:
        publish_mod.precheck(ctx, specs)
    if mode == vms.NET_NONE:
        wait_ssh = False
    o["creator"] = {"pid": os.getpid(), "start": procs.start_time(os.getpid())}
    o["restored_from"] = snapshot
    o["net"] = mode
    o["allow"] = list(meta.get("allow") or [])
    o["made"] = {"how": "restore", "snapshot": snapshot}
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
            run = plan.execute(ctx, vm, restore_plan(wait_ssh=wait_ssh, net=mode != vms.NET_NONE, ports=bool(specs)),
                               delete_on_unwind=True, snapshot=snapshot, sdir=sdir, meta=meta, snap_lock=snap_lock,
                               timings=timings, big_files=big_files, t0=time.monotonic(), ports=specs)
        except BaseException:
            lifecycle.drop_unstarted(ctx, vm_id)
            raise
        if wait_ssh:
            timings["ssh_ready_ms"] = round((time.monotonic() - run.t0) * 1000, 1)
            hostnames.mark_ready(ctx, vm)
    if run.transport is not None:
        run.transport.close()
    names = hostnames.after_change(ctx, fresh=[vm["id"]])
    out = lifecycle.view(ctx, ctx.store.vm_by_id(vm["id"]), stages=True)
    out["names"] = names
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
