"""The VM lifecycle commands: create / start / stop / restart / delete / prune / set / list / show.

``create`` runs in three phases (ARCHITECTURE.md): resolve image + kernel with no global lock
(auto-pulling a catalog entry), reserve name + slot in one ``BEGIN IMMEDIATE``
(banger.state.reservation), then build and boot under ``vm/<id>`` only by executing a plan
(banger.vms.plans; the runner and its one failure policy are banger.vms.plan).  What a VM *is* at
run time (files, handles, network, VMM) lives in banger.vms.runtime; guest access in
banger.vms.access.
"""

from __future__ import annotations

import os
import time

from banger.errors import BangerError, InvalidState, NotFound, UsageError
from banger.guest.names import Subnet
from banger.host import procs
from banger.vms.runtime import (
    CRASHED,
    CREATING,
    ERROR,
    OVERLAY,
    PAUSED,
    RUNNING,
    STOPPED,
    WORK,
    creator_alive,
    destroy_vm,
    effective_state,
    get,
    load_handles,
    name_taken,
    ssh_files,
    teardown_runtime,
    vm_dir,
    vm_driver,
    vmm_alive,
)


def view(ctx, vm, *, stages: bool = False) -> dict:
    """The public dict for one VM (what `vm show/list --json` print)."""
    h = load_handles(ctx, vm)
    st = effective_state(ctx, vm, h)
    d = {k: vm[k] for k in ("id", "name", "image", "kernel", "backend", "vcpu", "memory_mib", "overlay_size_mib",
                            "work_disk_size_mib", "nat", "ip", "mac", "created_at", "updated_at")}
    d["state"] = st
    d["error"] = vm.get("error")
    if st == ERROR and vm["state"] == CREATING:
        d["error"] = "create was interrupted; run `banger gc` to clean up"
    if st == PAUSED:
        d["error"] = ("the guest was left paused by a killed command "
                      f"({(h.get('paused_by') or {}).get('op')}); `banger gc` resumes it")
    elif vm["state"] == RUNNING and st != RUNNING:
        d["error"] = d["error"] or "the VMM process is gone"
    d["dir"] = str(vm_dir(ctx, vm))
    d["pid"] = h.get("pid") if st in (RUNNING, PAUSED) else None
    d["tap"] = h.get("tap") if st in (RUNNING, PAUSED) else None
    d["work_seed"] = (vm.get("options") or {}).get("work_seed")
    if stages:
        rows = ctx.store.stages(vm["id"])
        d["stages"] = [{"op": r["op"], "stage": r["stage"], "started_at": r["started_at"],
                        "duration_ms": None if r["duration_ms"] is None else round(r["duration_ms"], 1),
                        "ok": None if r["ok"] is None else bool(r["ok"]), "error": r["error"]} for r in rows]
        d["timings"] = summarize_stages(d["stages"])
    return d


BOOT_OPS = ("create", "start", "restore")


def summarize_stages(stages: list[dict]) -> dict:
    """For the latest create/start/restore: seconds from its first step to VMM-ready and to SSH-ready,
    and the host-side milliseconds (every step but the guest's boot to SSH)."""
    runs: list[list[dict]] = []
    for s in stages:  # a run ends where the op changes or a step repeats
        if not runs or s["op"] != runs[-1][0]["op"] or s["stage"] in {x["stage"] for x in runs[-1]}:
            runs.append([])
        runs[-1].append(s)
    boots = [r for r in runs if r[0]["op"] in BOOT_OPS]
    if not boots:
        return {}
    run = [s for s in boots[-1] if not s["stage"].startswith("undo:")]
    t0 = run[0]["started_at"]
    out = {"op": run[0]["op"]}
    for s in run:
        end = s["started_at"] + (s["duration_ms"] or 0) / 1000
        if s["stage"] == "vmm.launch" and s["ok"]:
            out["vmm_ready_s"] = round(end - t0, 3)
        if s["stage"] == "guest.ssh" and s["ok"]:
            out["ssh_ready_s"] = round(end - t0, 3)
    out["host_side_ms"] = round(sum(s["duration_ms"] or 0 for s in run if s["stage"] != "guest.ssh"), 1)
    return out


# ---------------------------------------------------------------- lookups
def list_vms(ctx) -> list[dict]:
    return [view(ctx, vm) for vm in ctx.store.list_vms()]


def show(ctx, ref: str) -> dict:
    return view(ctx, get(ctx, ref), stages=True)


# ---------------------------------------------------------------- create
def resolve(ctx, *, image: str | None, kernel: str | None, backend: str | None):
    """Phase 1 (no lock): find or auto-pull the image and kernel; pick the backend."""
    from banger.images import service as images
    from banger.kernels import service as kernels
    from banger.vmm import registry

    be = registry.choose(backend or ctx.cfg.backend, ctx.cfg)
    img = images.resolve(ctx, image, auto_pull=True)
    ker = kernels.resolve(ctx, kernel or img.get("kernel") or None, auto_pull=True)
    return img, ker, be


def create(ctx, *, name: str | None = None, image: str | None = None, kernel: str | None = None,
           backend: str | None = None, vcpu: int | None = None, memory_mib: int | None = None,
           overlay_size_mib: int | None = None, work_disk_size_mib: int | None = None, nat: bool | None = None,
           start: bool = True, wait_ssh: bool = True, work_seed: bool = True, keep_ssh: bool = False,
           remove: bool = False, reserved: dict | None = None):
    """Create (and by default boot) a VM. Returns its view; with ``keep_ssh`` returns (view, transport).

    ``remove`` (``vm run --rm``): the caller deletes the VM when it is done with it. The intent is in
    the row's options from the start (``rm``), so ``banger gc`` deletes the VM once its creator is
    dead (a ``vm run --rm`` killed with -9); a failed create leaves nothing, not even for inspection.
    ``reserved``, if given, gets ``id`` and ``name`` as soon as the row exists (so a caller can clean
    up on any exit path, even one between the row's insert and this function's return)."""
    from banger.guest.names import new_vm_id
    from banger.state.reservation import reserve_vm

    cfg = ctx.cfg
    vcpu = vcpu or cfg.vcpu
    memory_mib = memory_mib or cfg.memory_mib
    overlay_size_mib = overlay_size_mib or cfg.overlay_size_mib
    asked_work = work_disk_size_mib
    work_disk_size_mib = work_disk_size_mib or cfg.work_disk_size_mib
    nat = cfg.nat if nat is None else nat
    if vcpu < 1 or memory_mib < 128 or overlay_size_mib < 64 or work_disk_size_mib < 64:
        raise UsageError("vcpu must be >= 1, memory >= 128 MiB, disks >= 64 MiB", "check the size flags")
    if name is not None:
        from banger.guest.names import validate_name

        validate_name(name)
        if ctx.store.vm_by_name(name) is not None:  # fail fast; reserve re-checks atomically
            raise name_taken(name)

    # phase 1: resolve (no lock)
    img, ker, be = resolve(ctx, image=image, kernel=kernel, backend=backend)
    seed = img.get("work_seed")
    seed_mib = -(-os.path.getsize(seed) // (1 << 20)) if work_seed and seed and os.path.exists(seed) else 0
    if not asked_work:
        work_disk_size_mib = max(work_disk_size_mib, seed_mib)  # a promoted image's seed may be larger
    if seed_mib > work_disk_size_mib:
        raise UsageError(f"--work-disk-size {work_disk_size_mib} MiB is smaller than the image's work seed "
                         f"({seed_mib} MiB)", "ask for a larger work disk")
    options = {"rootfs": str(img["rootfs"]), "work_seed": bool(work_seed and seed), "init": img.get("init"),
               "vmlinux": str(ker["vmlinux"]) if ker.get("vmlinux") else None,
               "bzimage": str(ker["bzimage"]) if ker.get("bzimage") else None, "initrd": str(ker["initrd"]),
               "kernel_version": ker.get("version"),
               "creator": {"pid": os.getpid(), "start": procs.start_time(os.getpid())}}

    if remove:
        options["rm"] = True

    # phase 2: reserve (one BEGIN IMMEDIATE) while already holding the new VM's lock, so its row is
    # never visible unlocked: a `vm delete` or `gc` in between would pull the row from under the build.
    # phase 3: build and boot under vm/<id> only
    from banger.vms import plan, plans

    vm_id = new_vm_id()
    with ctx.locks.hold(f"vm/{vm_id}", purpose="create"):
        try:
            try:
                vm = reserve_vm(ctx.store, Subnet(cfg.subnet), name=name, image=img.get("name"),
                                kernel=ker.get("name"), backend=be, vcpu=vcpu, memory_mib=memory_mib,
                                overlay_size_mib=overlay_size_mib, work_disk_size_mib=work_disk_size_mib, nat=nat,
                                options=options,
                                check_refs=True,  # a concurrent image delete / kernel rm cannot slip in between
                                vm_id=vm_id)
            except BangerError as e:
                if e.code == "conflict" and name:
                    raise name_taken(name) from None
                raise
            if reserved is not None:
                reserved.update(id=vm["id"], name=vm["name"])
            run = plan.execute(ctx, vm, plans.create_plan(start=start, wait_ssh=wait_ssh),
                               success_state=RUNNING if start else STOPPED, unwound_state=ERROR,
                               delete_on_unwind=remove, keep_on_timeout=not remove,
                               image=img, work_size_mib=work_disk_size_mib, use_seed=work_seed,
                               overlay_size_mib=overlay_size_mib)
        except BaseException:
            drop_unstarted(ctx, vm_id)
            raise
        out = view(ctx, ctx.store.vm_by_id(vm["id"]), stages=True)  # under the lock: a delete may follow
    out["work_disk_method"] = getattr(run, "work_method", None)
    if keep_ssh:
        return out, run.transport
    if run.transport is not None:
        run.transport.close()
    return out


def drop_unstarted(ctx, vm_id: str) -> None:
    """A signal between the reservation and the plan's start: the plan's failure policy never ran (it
    always moves the row out of ``creating``), nothing was built; the row goes (if it was inserted)."""
    from banger.interrupts import shielded

    with shielded():
        cur = ctx.store.vm_by_id(vm_id)
        if cur is not None and cur["state"] == CREATING:
            import shutil

            shutil.rmtree(vm_dir(ctx, cur), ignore_errors=True)
            ctx.store.delete_vm_row(cur["id"])


# ---------------------------------------------------------------- start / stop / restart
def start(ctx, ref: str, *, wait_ssh: bool = True, keep_ssh: bool = False):
    from banger.vms import plan, plans

    vm = get(ctx, ref)
    with ctx.locks.hold(f"vm/{vm['id']}", purpose="start"):
        vm = get(ctx, vm["id"])
        st = effective_state(ctx, vm)
        if st in (RUNNING, PAUSED):
            raise InvalidState(f"VM {vm['name']} is already running", f"banger vm ssh {vm['name']}")
        if st in (CREATING, ERROR) and not (vm_dir(ctx, vm) / OVERLAY).exists():
            raise InvalidState(f"VM {vm['name']} was never built ({vm.get('error') or st})",
                               f"delete it (banger vm delete {vm['name']}) and create it again")
        teardown_runtime(ctx, vm)  # leftovers of a crash
        run = plan.execute(ctx, vm, plans.start_plan(wait_ssh=wait_ssh), unwound_state=STOPPED)
        out = view(ctx, get(ctx, vm["id"]), stages=True)
    if keep_ssh:
        return out, run.transport
    if run.transport is not None:
        run.transport.close()
    return out


def _graceful_shutdown(ctx, vm, h: dict, timeout: float) -> bool:
    """Ask the guest to power off; True if the VMM exited by itself within ``timeout``.

    banger-init powers off cleanly on SIGTERM, so the reliable request under microvm is
    `kill -TERM 1` over SSH (the lean init has no ACPI power-button handling); the
    driver's own request (QMP system_powerdown / Firecracker SendCtrlAltDel) is sent too.
    """
    deadline = time.monotonic() + timeout
    try:
        vm_driver(ctx, vm).request_shutdown(h)
    except BangerError:
        pass
    t = None
    try:
        from banger.guest import ssh

        t = ssh.connect(vm["ip"], timeout=min(5.0, timeout), **ssh_files(ctx, vm))
        # no waiting for an exit status: the guest tears sshd down as it powers off
        t.open_session().exec_command("kill -TERM 1")
    except Exception:  # noqa: BLE001 - best effort: paramiko raises its own family as the guest goes away
        pass
    try:
        while time.monotonic() < deadline:
            if not vmm_alive(ctx, vm, h):
                return True
            time.sleep(0.05)
        return not vmm_alive(ctx, vm, h)
    finally:
        if t is not None:
            t.close()


def stop(ctx, ref: str, *, force: bool = False, timeout: float | None = None) -> dict:
    vm = get(ctx, ref)
    with ctx.locks.hold(f"vm/{vm['id']}", purpose="stop"):
        vm = get(ctx, vm["id"])
        _stop_locked(ctx, vm, force=force, timeout=timeout)
        return view(ctx, get(ctx, vm["id"]), stages=True)


def _stop_locked(ctx, vm, *, force: bool, timeout: float | None) -> None:
    from banger.vms.plan import Runner

    if vm["state"] in (CREATING,):
        raise InvalidState(f"VM {vm['name']} is being created", "wait for the create to finish, or run banger gc")
    h = load_handles(ctx, vm)
    if vm["state"] == ERROR and not vmm_alive(ctx, vm, h):
        return  # a failed create already undid everything; it stays `error` with its reason
    timeout = ctx.cfg.stop_timeout_s if timeout is None else timeout
    runner = Runner(ctx, vm["id"], "stop")
    graceful = None
    try:
        if vmm_alive(ctx, vm, h) and not force:
            ctx.progress.step("asking the guest to shut down")
            graceful = runner.run("guest.shutdown", lambda: _graceful_shutdown(ctx, vm, h, timeout))
        runner.run("teardown", lambda: teardown_runtime(ctx, vm))
    finally:
        runner.flush()
    ctx.store.update_vm(vm["id"], state=STOPPED,
                        error=None if graceful in (True, None) else "guest did not shut down in time; forced")


def restart(ctx, ref: str, *, wait_ssh: bool = True) -> dict:
    stop(ctx, ref)
    return start(ctx, ref, wait_ssh=wait_ssh)


# ---------------------------------------------------------------- delete / prune / set
def _refuse_live_create(vm) -> None:
    c = (vm.get("options") or {}).get("creator") or {}
    if vm["state"] == CREATING and creator_alive(vm) and c.get("pid") != os.getpid():
        raise InvalidState(f"VM {vm['name']} is being created (by process {c.get('pid')})",
                           "wait for the create to finish (or interrupt it: it cleans up after itself), "
                           "then delete it", details={"creator_pid": c.get("pid")})


def delete(ctx, ref: str, *, force: bool = False) -> dict:
    vm = get(ctx, ref)
    _refuse_live_create(vm)  # at once: not after waiting minutes for the create's lock
    with ctx.locks.hold(f"vm/{vm['id']}", purpose="delete"):
        vm = ctx.store.vm_by_id(vm["id"])
        if vm is None:
            raise NotFound(f"no VM named {ref!r}", "it was deleted meanwhile")
        _refuse_live_create(vm)
        st = effective_state(ctx, vm)
        if st in (RUNNING, PAUSED) and not force:
            raise InvalidState(f"VM {vm['name']} is running", f"stop it first, or: banger vm delete -f {vm['name']}")
        destroy_vm(ctx, vm)
    return {"id": vm["id"], "name": vm["name"], "deleted": True}


def prunable(ctx) -> list[dict]:
    return [v for v in list_vms(ctx) if v["state"] in (STOPPED, CRASHED, ERROR)
            and not (v["state"] == ERROR and creator_alive(get(ctx, v["id"])))]


def prune(ctx) -> list[dict]:
    out = []
    for v in prunable(ctx):
        try:
            out.append(delete(ctx, v["id"], force=False))
        except (NotFound, InvalidState):
            continue
    return out


def set_resources(ctx, ref: str, *, vcpu: int | None = None, memory_mib: int | None = None,
                  work_disk_size_mib: int | None = None) -> dict:
    from banger.host import ext4

    vm = get(ctx, ref)
    with ctx.locks.hold(f"vm/{vm['id']}", purpose="set"):
        vm = get(ctx, vm["id"])
        st = effective_state(ctx, vm)
        if st not in (STOPPED, CRASHED):
            raise InvalidState(f"VM {vm['name']} is {st}; settings change only while stopped",
                               f"banger vm stop {vm['name']}")
        fields = {}
        if vcpu is not None:
            if vcpu < 1:
                raise UsageError("--vcpu must be at least 1", "e.g. --vcpu 2")
            fields["vcpu"] = vcpu
        if memory_mib is not None:
            if memory_mib < 128:
                raise UsageError("--memory must be at least 128 MiB", "e.g. --memory 1024")
            fields["memory_mib"] = memory_mib
        if work_disk_size_mib is not None:
            if work_disk_size_mib < vm["work_disk_size_mib"]:
                raise UsageError(f"the work disk only grows (now {vm['work_disk_size_mib']} MiB)",
                                 f"ask for {vm['work_disk_size_mib']} MiB or more")
            ext4.grow(vm_dir(ctx, vm) / WORK, work_disk_size_mib)
            fields["work_disk_size_mib"] = work_disk_size_mib
        if fields:
            ctx.store.update_vm(vm["id"], **fields)
    return view(ctx, get(ctx, vm["id"]))
