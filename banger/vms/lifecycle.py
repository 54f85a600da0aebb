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

from banger.errors import BangerError, Conflict, InvalidState, NotFound, UsageError
from banger.host import procs
from banger.names import Subnet
from banger.vms import hostnames
from banger.vms.runtime import (
    CRASHED,
    CREATING,
    ERROR,
    NET_ISOLATED,
    NET_NAT,
    NET_NONE,
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
    net_allow,
    net_mode,
    ssh_files,
    teardown_runtime,
    vm_dir,
    vm_driver,
    vmm_alive,
)


def view(ctx, vm, *, stages: bool = False, claimed: dict | None = None) -> dict:
    """The public dict for one VM (what `vm show/list --json` print). ``claimed``: every VM's published
    ports rows by VM id, read once for a whole list (None: read this VM's)."""
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
    _net_view(ctx, vm, d, live=stages and st == RUNNING, claimed=claimed)
    made = (vm.get("options") or {}).get("made") or {}
    d["made"] = {"how": "restore" if (vm.get("options") or {}).get("restored_from") else "cold", **made}
    if stages:
        rows = ctx.store.stages(vm["id"])
        d["stages"] = [{"op": r["op"], "stage": r["stage"], "started_at": r["started_at"],
                        "duration_ms": None if r["duration_ms"] is None else round(r["duration_ms"], 1),
                        "ok": None if r["ok"] is None else bool(r["ok"]), "error": r["error"]} for r in rows]
        d["timings"] = summarize_stages(d["stages"])
    return d


def _net_view(ctx, vm, d: dict, *, live: bool, claimed: dict | None = None) -> None:
    """Network mode, --allow list, published ports (``live``: with "active", read from nftables) and expiry."""
    from banger.vms import expiry

    d["net"] = net_mode(vm)
    d["allow"] = net_allow(vm)
    if claimed is not None and not claimed.get(vm["id"]):
        d["ports"] = []  # (a list with no published port at all never imports the ports module)
    else:
        from banger.net import ports

        d["ports"] = [p.to_dict() for p in ports.claims(ctx, vm["id"])]
    if live and d["ports"]:
        from banger.net import publish

        try:
            act = {p["spec"]: p["active"] for p in publish.list_ports(ctx, vm["id"])}
        except BangerError:  # no nft to ask: unknown, not false
            act = {}
        for p in d["ports"]:
            p["active"] = act.get(p["spec"])
    d["expires_at"] = expiry.expires_at(vm)
    left = expiry.seconds_left(vm)
    d["ttl_left_s"] = None if left is None else max(0, round(left))
    d["ttl"] = expiry.human(left)


BOOT_OPS = ("create", "start", "restore", "claim", "fork", "pool-fill")
VMM_READY = ("vmm.launch", "vmm.restore", "vmm.resume")


def summarize_stages(stages: list[dict]) -> dict:
    """For the latest create/start/restore/claim/fork: seconds from its first step to VMM-ready and to
    SSH-ready, and the host-side milliseconds (every step but the guest's boot to SSH)."""
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
        if s["stage"] in VMM_READY and s["ok"]:
            out["vmm_ready_s"] = round(end - t0, 3)
        if s["stage"] == "guest.ssh" and s["ok"]:
            out["ssh_ready_s"] = round(end - t0, 3)
    out["host_side_ms"] = round(sum(s["duration_ms"] or 0 for s in run if s["stage"] != "guest.ssh"), 1)
    return out


# ---------------------------------------------------------------- lookups
def user_vm(vm) -> bool:
    """Not warm-pool capacity and not a template's builder."""
    return vm["state"] != "pooled" and (vm.get("options") or {}).get("role") not in ("pool", "template")


def list_vms(ctx, *, all: bool = False) -> list[dict]:
    """User VMs; ``all`` adds pooled clones and template builders."""
    claimed: dict = {}
    for r in ctx.store.query("SELECT vm_id FROM published_ports"):  # one query for the whole list
        claimed[r["vm_id"]] = True
    return [view(ctx, vm, claimed=claimed) for vm in ctx.store.list_vms(pooled=all) if all or user_vm(vm)]


def show(ctx, ref: str) -> dict:
    return view(ctx, get(ctx, ref), stages=True)


# ---------------------------------------------------------------- create
FIELD = {"vcpu": "--vcpu", "memory_mib": "--memory", "overlay_size_mib": "--overlay-size",
         "work_disk_size_mib": "--work-disk-size"}


def _check_resources(**values) -> None:
    """Every value (a flag or its config default) through banger/validate.py, named by its flag."""
    from banger import validate

    for key, val in values.items():
        if val is None:
            continue
        if key == "vcpu":
            validate.integer(val, FIELD[key], key)
        else:
            validate.size_mib(val, FIELD[key], key)


def check_disk_room(ctx, disks_mib: dict, *, writes_mib: int = 0) -> None:
    """Up front, before anything is reserved or written: no (sparse) disk may be larger than the filesystem
    holding BANGER_HOME (it could never be filled, and mkfs/truncate would fail half-way), and that
    filesystem must have room for what create writes now (the work seed's clone, plus metadata)."""
    from banger import validate
    from banger.errors import HostError

    p = ctx.cfg.home
    while not p.exists() and p.parent != p:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return
    total_mib = st.f_blocks * st.f_frsize >> 20
    free_mib = st.f_bavail * st.f_frsize >> 20
    for key, mib in disks_mib.items():
        if mib is not None and mib > total_mib:
            raise validate.InvalidInput(FIELD.get(key, key), validate._human_mib(mib),
                                        f"at most the size of the filesystem holding {ctx.cfg.home} "
                                        f"({total_mib} MiB)", "ask for a smaller disk")
    need = writes_mib + 64
    if free_mib < need:
        raise HostError(f"not enough free space for a VM: {free_mib} MiB free where {ctx.cfg.home} lives, "
                        f"{need} MiB needed", "free some space (banger vm prune, banger image delete)")


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
           net: str | None = None, allow=None, publish=None, ttl=None, cold: bool = False, claim=None,
           remove: bool = False, reserved: dict | None = None):
    """Create (and by default boot) a VM. Returns its view; with ``keep_ssh`` returns (view, transport).

    ``net``: nat | isolated | none (default: ``--nat``/config ``nat`` -> nat, else isolated);
    ``allow``: --allow values; ``publish``: -p values (claimed before anything is built: a taken host
    port fails the create with nothing left); ``ttl``: seconds or a duration ("30m").

    A create the warm VM pool can honour (booting, work seed, the default isolated network with no
    --allow, -p or --ttl, a pooled clone of the template for exactly this image, kernel, backend, size)
    claims that clone instead of booting: ``claim`` (banger.vmpool.service.claim_for_create, passed in by
    the caller: the pool sits above the lifecycle) is asked first; ``cold`` forces a boot.

    ``remove`` (``vm run --rm``): the caller deletes the VM when it is done with it. The intent is in
    the row's options from the start (``rm``), so ``banger gc`` deletes the VM once its creator is
    dead (a ``vm run --rm`` killed with -9); a failed create leaves nothing, not even for inspection.
    ``reserved``, if given, gets ``id`` and ``name`` as soon as the row exists (so a caller can clean
    up on any exit path, even one between the row's insert and this function's return)."""
    from banger.names import new_vm_id
    from banger.state.reservation import reserve_vm

    cfg = ctx.cfg
    netopts, specs = net_options(ctx, net=net, nat=nat, allow=allow, publish=publish, ttl=ttl)
    nat = netopts["net"] == NET_NAT
    vcpu = cfg.vcpu if vcpu is None else vcpu
    memory_mib = cfg.memory_mib if memory_mib is None else memory_mib
    overlay_size_mib = cfg.overlay_size_mib if overlay_size_mib is None else overlay_size_mib
    asked_work = work_disk_size_mib
    work_disk_size_mib = cfg.work_disk_size_mib if work_disk_size_mib is None else work_disk_size_mib
    _check_resources(vcpu=vcpu, memory_mib=memory_mib, overlay_size_mib=overlay_size_mib,
                     work_disk_size_mib=work_disk_size_mib)
    check_disk_room(ctx, {"overlay_size_mib": overlay_size_mib, "work_disk_size_mib": work_disk_size_mib})
    if name is not None:
        from banger.names import validate_name

        validate_name(name)
        if ctx.store.vm_by_name(name) is not None:  # fail fast; reserve re-checks atomically
            raise name_taken(name)

    if specs:  # fail fast, before anything is reserved; the net.ports step re-checks atomically
        from banger.net import publish as publish_mod

        publish_mod.precheck(ctx, specs)
    if netopts["net"] == NET_NONE:
        wait_ssh = False  # no network card: nothing to reach over SSH

    # phase 1: resolve (no lock)
    img, ker, be = resolve(ctx, image=image, kernel=kernel, backend=backend)
    seed = img.get("work_seed")
    seed_mib = -(-os.path.getsize(seed) // (1 << 20)) if work_seed and seed and os.path.exists(seed) else 0
    if not asked_work:
        work_disk_size_mib = max(work_disk_size_mib, seed_mib)  # a promoted image's seed may be larger
    if seed_mib > work_disk_size_mib:
        raise UsageError(f"--work-disk-size {work_disk_size_mib} MiB is smaller than the image's work seed "
                         f"({seed_mib} MiB)", "ask for a larger work disk")
    check_disk_room(ctx, {"overlay_size_mib": overlay_size_mib, "work_disk_size_mib": work_disk_size_mib},
                    writes_mib=seed_mib)  # before the name is reserved: a failure leaves no row
    if (start and not cold and work_seed and netopts == {"net": NET_ISOLATED, "allow": []} and not specs):
        got = None if claim is None else claim(ctx, img, ker, be, name=name, vcpu=vcpu, memory_mib=memory_mib,
                     overlay_size_mib=overlay_size_mib, work_disk_size_mib=work_disk_size_mib, wait_ssh=wait_ssh)
        if got is not None:
            if reserved is not None:  # `vm run --rm` deletes a claimed clone like any other VM
                reserved.update(id=got.vm["id"], name=got.vm["name"])
            out = view(ctx, ctx.store.vm_by_id(got.vm["id"]), stages=True)
            if keep_ssh:
                return out, got.transport
            if got.transport is not None:
                got.transport.close()
            return out
    options = {"rootfs": str(img["rootfs"]), "work_seed": bool(work_seed and seed), "init": img.get("init"),
               "vmlinux": str(ker["vmlinux"]) if ker.get("vmlinux") else None,
               "bzimage": str(ker["bzimage"]) if ker.get("bzimage") else None, "initrd": str(ker["initrd"]),
               "kernel_version": ker.get("version"), "made": {"how": "cold"},
               "creator": {"pid": os.getpid(), "start": procs.start_time(os.getpid())}, **netopts}

    if remove:
        options["rm"] = True

    # phase 2: reserve (one BEGIN IMMEDIATE) while already holding the new VM's lock, so its row is
    # never visible unlocked: a `vm delete` or `gc` in between would pull the row from under the build.
    # phase 3: build and boot under vm/<id> only
    from banger.vms import diskpool, plan, plans

    dkey = diskpool.key(img, work_size_mib=work_disk_size_mib, overlay_size_mib=overlay_size_mib,
                        use_seed=work_seed)
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
            try:
                run = plan.execute(ctx, vm, plans.create_plan(start=start, wait_ssh=wait_ssh,
                                                              ready_disks=bool(diskpool.ready(cfg, dkey)),
                                                              net=netopts["net"] != NET_NONE, ports=bool(specs)),
                                   success_state=RUNNING if start else STOPPED, unwound_state=ERROR,
                                   delete_on_unwind=remove, keep_on_timeout=not remove,
                                   image=img, work_size_mib=work_disk_size_mib, use_seed=work_seed,
                                   overlay_size_mib=overlay_size_mib, diskset_key=dkey, ports=specs)
            except BangerError as e:
                if e.details.get("step") == "net.ports":  # refused before anything was built: no row either
                    ctx.store.delete_vm_row(vm["id"])
                raise
        except BaseException:
            drop_unstarted(ctx, vm_id)
            raise
        if run.transport is not None:
            hostnames.mark_ready(ctx, vm)
    names = hostnames.after_change(ctx, fresh=[vm["id"]]) if start else None
    out = view(ctx, ctx.store.vm_by_id(vm["id"]), stages=True)
    out["work_disk_method"] = getattr(run, "work_method", None)
    if names is not None:
        out["names"] = names
    if keep_ssh:
        return out, run.transport
    if run.transport is not None:
        run.transport.close()
    return out


def net_options(ctx, *, net=None, nat=None, allow=None, publish=None, ttl=None) -> tuple[dict, list]:
    """Validate the network and expiry flags of a new VM: ({"net", "allow", ["expires_at", "ttl_s"]},
    [PortSpec]) for its options and its net.ports step. UsageError naming the flag on bad input."""
    from banger.net import policy, ports
    from banger.vms import expiry

    if net is not None:
        mode = policy.parse_mode(net)
        if nat and mode != NET_NAT:
            raise UsageError(f"--nat contradicts --net {mode}", "give one of them: --net nat is the same as --nat")
    else:
        mode = NET_NAT if (ctx.cfg.nat if nat is None else nat) else NET_ISOLATED
    allows = policy.parse_allows(allow, subnet=ctx.cfg.subnet)
    specs = ports.parse_many(publish)
    if mode == NET_NONE and (allows or specs):
        raise UsageError("--net none gives the VM no network card: "
                         + " and ".join(f for f, v in (("--allow", allows), ("-p", specs)) if v) + " cannot apply",
                         "use --net isolated (host only) or --net nat")
    for p in specs:
        ports.check_host_ip(p)
    opts = {"net": mode, "allow": [str(a) for a in allows]}
    if ttl is not None:
        secs = expiry.parse_ttl(ttl)
        opts.update(expires_at=round(time.time() + secs, 3), ttl_s=secs)
    return opts, specs




def warm_disks(ctx, n: int) -> dict:
    """``n`` sets for the default image at the configured default sizes (what a plain `vm create`
    asks for). A missing default image is not pulled from here (cron must stay quick): reported."""
    from banger.errors import NotFound
    from banger.images import service as images

    try:
        img = images.resolve(ctx, None, auto_pull=False)
    except NotFound as e:
        return {"skipped": e.message, "ready": 0, "made": 0}
    cfg = ctx.cfg
    seed = img.get("work_seed")
    seed_mib = -(-os.path.getsize(seed) // (1 << 20)) if seed and os.path.exists(seed) else 0
    from banger.vms import diskpool

    return diskpool.fill(ctx, img, n, work_size_mib=max(cfg.work_disk_size_mib, seed_mib),
                overlay_size_mib=cfg.overlay_size_mib, use_seed=True)


def _not_pooled(vm) -> None:
    if vm["state"] in ("pooled", "claiming"):
        raise InvalidState(f"VM {vm['name']} is warm-pool capacity ({vm['state']}), not a VM of yours",
                           "vm create claims it; banger pool drain --vms removes the pool")


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
    _not_pooled(vm)
    with ctx.locks.hold(f"vm/{vm['id']}", purpose="start"):
        vm = get(ctx, vm["id"])
        st = effective_state(ctx, vm)
        if st in (RUNNING, PAUSED):
            raise InvalidState(f"VM {vm['name']} is already running", f"banger vm ssh {vm['name']}")
        if st in (CREATING, ERROR) and not (vm_dir(ctx, vm) / OVERLAY).exists():
            raise InvalidState(f"VM {vm['name']} was never built ({vm.get('error') or st})",
                               f"delete it (banger vm delete {vm['name']}) and create it again")
        teardown_runtime(ctx, vm)  # leftovers of a crash
        has_net = net_mode(vm) != NET_NONE
        wait_ssh = wait_ssh and has_net
        run = plan.execute(ctx, vm, plans.start_plan(wait_ssh=wait_ssh, net=has_net), unwound_state=STOPPED)
        if run.transport is not None:
            hostnames.mark_ready(ctx, vm)
    names = hostnames.after_change(ctx, fresh=[vm["id"]])
    out = view(ctx, get(ctx, vm["id"]), stages=True)
    out["names"] = names
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
        if net_mode(vm) == NET_NONE:  # no network: ask banger-init on the serial console instead
            vm_driver(ctx, vm).send_console(h, "@banger poweroff", timeout=min(5.0, timeout))
        else:
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
    _not_pooled(vm)
    with ctx.locks.hold(f"vm/{vm['id']}", purpose="stop"):
        vm = get(ctx, vm["id"])
        _stop_locked(ctx, vm, force=force, timeout=timeout)
    names = hostnames.after_change(ctx)
    out = view(ctx, get(ctx, vm["id"]), stages=True)
    out["names"] = names
    return out


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


def delete(ctx, ref: str, *, force: bool = False, sync_names: bool = True) -> dict:
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
    names = hostnames.after_change(ctx) if sync_names else None
    return {"id": vm["id"], "name": vm["name"], "deleted": True, **({"names": names} if names else {})}


def prunable(ctx) -> list[dict]:
    return [v for v in list_vms(ctx) if v["state"] in (STOPPED, CRASHED, ERROR)
            and not (v["state"] == ERROR and creator_alive(get(ctx, v["id"])))]


def prune(ctx) -> list[dict]:
    out = []
    for v in prunable(ctx):
        try:
            out.append(delete(ctx, v["id"], force=False, sync_names=False))
        except (NotFound, InvalidState):
            continue
    if out:
        hostnames.after_change(ctx)
    return out


def set_resources(ctx, ref: str, *, vcpu: int | None = None, memory_mib: int | None = None,
                  work_disk_size_mib: int | None = None, net: str | None = None, allow=None,
                  clear_allow: bool = False, ttl=None, clear_ttl: bool = False) -> dict:
    """Change a VM's settings. vCPUs, memory, the work disk, ``net`` and the ``allow`` list only while it
    is stopped (they take effect at its next start); ``ttl`` (from now: extends or shortens) and
    ``clear_ttl`` (never expire) at any time."""
    from banger.host import ext4
    from banger.net import policy
    from banger.vms import expiry

    mode = policy.parse_mode(net) if net is not None else None
    if allow and clear_allow:
        raise UsageError("--allow and --no-allow contradict each other", "give one of them")
    if ttl is not None and clear_ttl:
        raise UsageError("--ttl and --no-ttl contradict each other", "give one of them")
    allows = policy.parse_allows(allow, subnet=ctx.cfg.subnet) if allow else None
    secs = expiry.parse_ttl(ttl) if ttl is not None else None
    stopped_only = any(v is not None for v in (vcpu, memory_mib, work_disk_size_mib, mode, allows)) or clear_allow
    vm = get(ctx, ref)
    with ctx.locks.hold(f"vm/{vm['id']}", purpose="set"):
        vm = get(ctx, vm["id"])
        st = effective_state(ctx, vm)
        if stopped_only and st not in (STOPPED, CRASHED):
            what = "vCPUs, memory, disk, --net and --allow" if st == RUNNING else "settings"
            raise InvalidState(f"VM {vm['name']} is {st}; {what} change only while it is stopped"
                               + (" (--ttl works on a running VM)" if st == RUNNING else ""),
                               f"banger vm stop {vm['name']}")
        if st == CREATING:
            raise InvalidState(f"VM {vm['name']} is being created", "wait for the create to finish")
        fields = {}
        _check_resources(vcpu=vcpu, memory_mib=memory_mib, work_disk_size_mib=work_disk_size_mib)
        opts = dict(vm["options"] or {})
        new_mode = mode or net_mode(vm)
        if mode is not None or allows is not None or clear_allow:
            from banger.net import ports

            new_allow = [] if clear_allow else ([str(a) for a in allows] if allows is not None else net_allow(vm))
            if new_mode == NET_NONE and new_allow:
                raise UsageError(f"VM {vm['name']} would have --net none with an --allow list",
                                 "drop the list too (--no-allow), or pick --net isolated|nat")
            if new_mode == NET_NONE and ports.claims(ctx, vm["id"]):
                raise Conflict(f"VM {vm['name']} publishes ports; --net none has no network card",
                               f"remove them first: banger vm port rm {vm['name']} PORT")
            opts.update(net=new_mode, allow=new_allow)
            fields["nat"] = new_mode == NET_NAT
        if secs is not None:
            opts.update(expires_at=round(time.time() + secs, 3), ttl_s=secs)
        elif clear_ttl:
            opts.pop("expires_at", None)
            opts.pop("ttl_s", None)
        if opts != (vm["options"] or {}):
            fields["options"] = opts
        if vcpu is not None:
            fields["vcpu"] = vcpu
        if memory_mib is not None:
            fields["memory_mib"] = memory_mib
        if work_disk_size_mib is not None:
            check_disk_room(ctx, {"work_disk_size_mib": work_disk_size_mib})
            if work_disk_size_mib < vm["work_disk_size_mib"]:
                raise UsageError(f"the work disk only grows (now {vm['work_disk_size_mib']} MiB)",
                                 f"ask for {vm['work_disk_size_mib']} MiB or more")
            ext4.grow(vm_dir(ctx, vm) / WORK, work_disk_size_mib)
            fields["work_disk_size_mib"] = work_disk_size_mib
        if fields:
            ctx.store.update_vm(vm["id"], **fields)
    return view(ctx, get(ctx, vm["id"]))


# ---------------------------------------------------------------- published ports
def port_add(ctx, ref: str, specs) -> dict:
    """Publish ``specs`` (-p values) for a VM; live at once when it runs, else from its next start.
    Under the VM's lock, so a concurrent start applies either none or all of them."""
    from banger.net import ports, publish

    specs = ports.parse_many(specs)
    if not specs:
        raise UsageError("no port to publish", "e.g. banger vm port add VM 8080:80")
    vm = get(ctx, ref)
    with ctx.locks.hold(f"vm/{vm['id']}", purpose="port add"):
        vm = get(ctx, vm["id"])
        if vm["state"] == CREATING:
            raise InvalidState(f"VM {vm['name']} is being created", "wait for the create to finish")
        r = publish.publish(ctx, vm, specs)
    return {**r, "vm": vm["name"], "ports": port_list(ctx, vm["id"])}


def port_rm(ctx, ref: str, refs) -> dict:
    """Unpublish by ``HOSTPORT[/proto]`` or full spec (HOSTPORT alone: both protocols)."""
    from banger.net import publish

    refs = list(refs or ())
    if not refs:
        raise UsageError("no port to remove", "e.g. banger vm port rm VM 8080 (or 8080/udp)")
    vm = get(ctx, ref)
    with ctx.locks.hold(f"vm/{vm['id']}", purpose="port rm"):
        vm = get(ctx, vm["id"])
        r = publish.unpublish(ctx, vm, refs)
    return {**r, "vm": vm["name"], "ports": port_list(ctx, vm["id"])}


def port_list(ctx, ref: str) -> list[dict]:
    """The VM's publications, each with "active" (its DNAT rule is live; None when nftables cannot
    be read)."""
    from banger.net import ports, publish

    vm = get(ctx, ref)
    try:
        return publish.list_ports(ctx, vm["id"])
    except BangerError:
        return [{**p.to_dict(), "vm_id": vm["id"], "vm_name": vm["name"], "active": None}
                for p in ports.claims(ctx, vm["id"])]
