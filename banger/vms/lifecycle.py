"""The VM lifecycle: create / start / stop / restart / delete / prune / set / list / show, plus SSH access.

``create`` runs in three phases (ARCHITECTURE.md): resolve image + kernel with no
global lock (auto-pulling a catalog entry), reserve name + slot in one
``BEGIN IMMEDIATE`` (banger.state.reservation), then build and boot under ``vm/<id>``
only, as named steps with undos (banger.vms.plan).  Every step's duration
lands in ``stage_events``; VMM-ready (``vmm.launch``) and SSH-ready
(``guest.ssh``) are separate steps.

Reconciliation is lazy: every read compares the row with the recorded VMM process
(pid + start time in ``handles.json``), so a VM whose process died shows as
``crashed`` (or ``stopped`` when the guest powered itself off), never ``running``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from banger.errors import BangerError, ExternalError, GuestTimeout, InvalidState, NotFound, UsageError
from banger.guest.names import Subnet
from banger.host import procs
from banger.host.fsutil import atomic_write_json, read_json

if TYPE_CHECKING:  # the step engine imports dataclasses (~20 ms): only the commands that run steps load it
    from banger.vms.plan import Steps

RUNNING, STOPPED, CRASHED, CREATING, ERROR = "running", "stopped", "crashed", "creating", "error"

OVERLAY, WORK, SERIAL, HANDLES, KNOWN_HOSTS = "overlay.ext4", "work.ext4", "serial.log", "handles.json", "known_hosts"
HOST_KEY = "etc/ssh/ssh_host_ed25519_key"


# ---------------------------------------------------------------- paths & handles
def vm_dir(ctx, vm) -> Path:
    return ctx.cfg.vm_dir(vm["id"])


def run_dir(ctx, vm) -> Path:
    return ctx.cfg.vm_run_dir(vm["id"])


def load_handles(ctx, vm) -> dict:
    return read_json(vm_dir(ctx, vm) / HANDLES, {}) or {}


def save_handles(ctx, vm, handles: dict) -> None:
    atomic_write_json(vm_dir(ctx, vm) / HANDLES, handles, 0o600)


def _serial_tail(ctx, vm, n: int = 25) -> str:
    from banger.vmm.qemu.driver import log_tail

    return log_tail(vm_dir(ctx, vm) / SERIAL, n)


# ---------------------------------------------------------------- reconciliation
def vmm_alive(ctx, vm, handles: dict | None = None) -> bool:
    h = load_handles(ctx, vm) if handles is None else handles
    return procs.alive(h.get("pid"), h.get("pid_start"))


def creator_alive(vm) -> bool:
    c = (vm.get("options") or {}).get("creator") or {}
    return procs.alive(c.get("pid"), c.get("start"))


def effective_state(ctx, vm, handles: dict | None = None) -> str:
    """The state to show: a 'running' row whose VMM is gone is crashed (or stopped if the guest powered off)."""
    st = vm["state"]
    if st == RUNNING and not vmm_alive(ctx, vm, handles):
        tail = _serial_tail(ctx, vm, 5)
        return STOPPED if "reboot: Power down" in tail or "reboot: Restarting" in tail else CRASHED
    if st == CREATING and not creator_alive(vm):
        return ERROR
    return st


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
    if vm["state"] == RUNNING and st != RUNNING:
        d["error"] = d["error"] or "the VMM process is gone"
    d["dir"] = str(vm_dir(ctx, vm))
    d["pid"] = h.get("pid") if st == RUNNING else None
    d["tap"] = h.get("tap") if st == RUNNING else None
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
def get(ctx, ref: str) -> dict:
    vm = ctx.store.get_vm(ref)
    if vm is None:
        raise NotFound(f"no VM named {ref!r}", "list VMs with: banger vm list")
    return vm


def list_vms(ctx) -> list[dict]:
    return [view(ctx, vm) for vm in ctx.store.list_vms()]


def show(ctx, ref: str) -> dict:
    return view(ctx, get(ctx, ref), stages=True)


# ---------------------------------------------------------------- disks
def _make_work_disk(ctx, path: Path, image: dict, size_mib: int, use_seed: bool) -> str:
    from banger.host import ext4
    from banger.host.fsutil import reflink_or_sparse_copy

    seed = image.get("work_seed")
    if use_seed and seed and Path(seed).exists():
        how = reflink_or_sparse_copy(seed, path)
        ext4.grow(path, size_mib)
        return how
    # from scratch: an empty /root holding only banger's authorized key
    from banger.guest.sshkeys import client_key

    src = path.parent / ".work-src"
    shutil.rmtree(src, ignore_errors=True)
    try:
        (src / ".ssh").mkdir(parents=True)
        os.chmod(src, 0o700)
        os.chmod(src / ".ssh", 0o700)
        ak = src / ".ssh" / "authorized_keys"
        ak.write_text(client_key(ctx.cfg).public_line + " banger\n")
        os.chmod(ak, 0o600)
        ext4.mkfs(path, size_mib, src_dir=src, label="banger-work")
    finally:
        shutil.rmtree(src, ignore_errors=True)
    return "mkfs"


def _make_overlay_disk(ctx, vm, size_mib: int) -> None:
    """The per-VM copy-on-write disk: upper/ (with the VM's host key and hostname) + work/."""
    from banger.guest.sshkeys import new_host_key
    from banger.host import ext4

    d = vm_dir(ctx, vm)
    src = d / ".overlay-src"
    shutil.rmtree(src, ignore_errors=True)
    try:
        priv, pub = new_host_key()
        (src / "upper" / "etc" / "ssh").mkdir(parents=True)
        (src / "work").mkdir()
        for p in (src / "upper", src / "upper" / "etc", src / "upper" / "etc" / "ssh"):
            os.chmod(p, 0o755)
        key = src / "upper" / HOST_KEY
        key.write_bytes(priv)
        os.chmod(key, 0o600)
        (src / "upper" / (HOST_KEY + ".pub")).write_text(pub + f" root@{vm['name']}\n")
        (src / "upper" / "etc" / "hostname").write_text(vm["name"] + "\n")
        ext4.mkfs(d / OVERLAY, size_mib, src_dir=src, label="banger-overlay")
        (d / KNOWN_HOSTS).write_text(f"{vm['ip']} {pub}\n")
    finally:
        shutil.rmtree(src, ignore_errors=True)


# ---------------------------------------------------------------- networking
def net_up(ctx, vm) -> str:
    from banger.net import bridge as hostnet
    from banger.net import pool

    hostnet.ensure_bridge(ctx)
    tap = pool.claim(ctx, vm["id"])
    _neighbour(ctx, vm, add=True)
    if vm["nat"]:
        from banger.net import nft

        nft.enable_nat(ctx, vm)
    return tap


def net_down(ctx, vm) -> None:
    """Idempotent: forget the neighbour, drop NAT, hand the TAP back to the pool."""
    from banger.net import pool

    errors = []
    undo = [lambda: _neighbour(ctx, vm, add=False), lambda: pool.release(ctx, vm["id"])]
    if vm["nat"]:
        undo.insert(1, lambda: _nat_off(ctx, vm))
    for fn in undo:
        try:
            fn()
        except BangerError as e:
            errors.append(e.message)
    if errors:
        raise ExternalError("; ".join(errors), "run `banger gc` to finish the clean-up")


def _nat_off(ctx, vm):
    from banger.net import nft

    nft.disable_nat(ctx, vm)


def _neighbour(ctx, vm, *, add: bool) -> None:
    if add:
        from banger.net import fastnet

        fastnet.set_neighbour(ctx.cfg.bridge, vm["ip"], vm["mac"])
        return
    from banger.net import netlink

    try:
        netlink.del_neighbour(ctx.cfg.bridge, vm["ip"])
    except NotFound:
        pass  # no bridge, so no entry either


# ---------------------------------------------------------------- boot
def vm_spec(ctx, vm, tap: str):
    from banger.guest.bootargs import guest_cmdline
    from banger.vmm.base import Drive, VmSpec

    o = vm["options"]
    subnet = Subnet(ctx.cfg.subnet)
    for k in ("rootfs", "initrd"):
        if not o.get(k) or not Path(o[k]).exists():
            raise NotFound(f"the {k} this VM was created from is gone: {o.get(k)}",
                           f"re-pull image {vm['image']!r} / kernel {vm['kernel']!r}, or delete this VM")
    dns = ctx.cfg.extra.get("dns") or ("1.1.1.1" if vm["nat"] else None)
    cmdline = guest_cmdline(ip=vm["ip"], prefixlen=subnet.prefixlen, gateway=subnet.gateway, hostname=vm["name"],
                            init=o.get("init"), dns=dns, backend=vm["backend"])
    d = vm_dir(ctx, vm)
    return VmSpec(vm_id=vm["id"], name=vm["name"], vcpu=vm["vcpu"], memory_mib=vm["memory_mib"],
                  vmlinux=Path(o["vmlinux"]) if o.get("vmlinux") else None,
                  bzimage=Path(o["bzimage"]) if o.get("bzimage") else None,
                  initrd=Path(o["initrd"]), cmdline=cmdline,
                  drives=[Drive("rootfs", Path(o["rootfs"]), True), Drive("overlay", d / OVERLAY),
                          Drive("work", d / WORK)],
                  tap=tap, mac=vm["mac"], run_dir=run_dir(ctx, vm), vm_dir=d, serial_log=d / SERIAL)


def vm_driver(ctx, vm):
    from banger.vmm.base import get_driver

    return get_driver(vm["backend"], ctx.cfg)


def ssh_files(ctx, vm) -> dict:
    from banger.guest.sshkeys import client_key

    return {"key_path": client_key(ctx.cfg).private, "known_hosts": vm_dir(ctx, vm) / KNOWN_HOSTS}


def wait_for_ssh(ctx, vm, handles: dict, timeout: float | None = None):
    from banger.guest import ssh

    timeout = ctx.cfg.ssh_timeout_s if timeout is None else timeout

    def alive():
        if not vmm_alive(ctx, vm, handles):
            raise ExternalError(f"the VMM exited while the guest was booting; serial console:\n"
                                f"{_serial_tail(ctx, vm)}", "see `banger vm logs` for the whole console")

    try:
        return ssh.wait_ready(vm["ip"], deadline=time.monotonic() + timeout, alive=alive, **ssh_files(ctx, vm))
    except GuestTimeout as e:
        raise GuestTimeout(f"guest did not answer SSH within {timeout:g}s ({e.message}); the VM is kept for "
                           f"inspection. Serial console (last lines):\n{_serial_tail(ctx, vm)}",
                           f"inspect with `banger vm logs {vm['name']}`, remove with "
                           f"`banger vm delete -f {vm['name']}`") from None


def _boot_steps(ctx, vm, steps: Steps, *, wait_ssh: bool):
    """TAP + VMM + SSH: shared by create and start. Returns the SSH transport (or None)."""
    state = {}

    def net():
        state["tap"] = net_up(ctx, vm)

    steps.run("net.tap", net, lambda: net_down(ctx, vm), message="network")

    def launch():
        spec = vm_spec(ctx, vm, state["tap"])
        run_dir(ctx, vm).mkdir(parents=True, exist_ok=True)
        h = vm_driver(ctx, vm).launch(spec, ctx.progress)
        state["handles"] = h
        save_handles(ctx, vm, h)

    def unlaunch():
        h = state.get("handles") or load_handles(ctx, vm)
        if h:
            vm_driver(ctx, vm).kill(h)
        (vm_dir(ctx, vm) / HANDLES).unlink(missing_ok=True)
        shutil.rmtree(run_dir(ctx, vm), ignore_errors=True)

    steps.run("vmm.launch", launch, unlaunch, message=f"starting {vm['backend']}")
    if not wait_ssh:
        return None
    return steps.run("guest.ssh", lambda: wait_for_ssh(ctx, vm, state["handles"]), message="waiting for SSH")


def kept_for_inspection(ctx, vm, steps: Steps, exc: BaseException) -> bool:
    """An SSH timeout keeps the booted VM for inspection instead of unwinding it."""
    return isinstance(exc, GuestTimeout) and steps.current == "guest.ssh" and vmm_alive(ctx, vm)


# ---------------------------------------------------------------- create
def resolve(ctx, *, image: str | None, kernel: str | None, backend: str | None) -> tuple[dict, dict, str]:
    """Phase 1 (no global lock): find or auto-pull the image and kernel; pick the backend."""
    from banger.host.hostinfo import choose_backend
    from banger.images import service as images
    from banger.kernels import service as kernels

    be = choose_backend(backend or ctx.cfg.backend, ctx.cfg.firecracker_bin)
    img = images.resolve(ctx, image, auto_pull=True)
    ker = kernels.resolve(ctx, kernel or img.get("kernel") or None, auto_pull=True)
    return img, ker, be


def create(ctx, *, name: str | None = None, image: str | None = None, kernel: str | None = None,
           backend: str | None = None, vcpu: int | None = None, memory_mib: int | None = None,
           overlay_size_mib: int | None = None, work_disk_size_mib: int | None = None, nat: bool | None = None,
           start: bool = True, wait_ssh: bool = True, work_seed: bool = True, keep_ssh: bool = False):
    """Create (and by default boot) a VM. Returns its view; with ``keep_ssh`` returns (view, transport)."""
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
        if ctx.store.get_vm(name) is not None:  # fail fast; reserve re-checks atomically
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

    # phase 2: reserve (one BEGIN IMMEDIATE)
    try:
        vm = reserve_vm(ctx.store, Subnet(cfg.subnet), name=name, image=img.get("name"), kernel=ker.get("name"),
                        backend=be, vcpu=vcpu, memory_mib=memory_mib, overlay_size_mib=overlay_size_mib,
                        work_disk_size_mib=work_disk_size_mib, nat=nat, options=options,
                        check_refs=True)  # a concurrent image delete / kernel rm cannot slip in between
    except BangerError as e:
        if e.code == "conflict" and name:
            raise name_taken(name) from None
        raise

    # phase 3: build and boot under vm/<id> only
    transport = None
    with ctx.locks.hold(f"vm/{vm['id']}", purpose="create"):
        from banger.vms.plan import Steps

        steps = Steps(ctx, vm["id"], "create")
        try:
            def prepare():
                vm_dir(ctx, vm).mkdir(parents=True, exist_ok=False)

            def unprepare():
                shutil.rmtree(vm_dir(ctx, vm), ignore_errors=True)
                shutil.rmtree(run_dir(ctx, vm), ignore_errors=True)

            steps.run("prepare", prepare, unprepare)
            how = {}
            steps.run("disk.work", lambda: how.setdefault("work", _make_work_disk(
                ctx, vm_dir(ctx, vm) / WORK, img, work_disk_size_mib, work_seed)),
                lambda: (vm_dir(ctx, vm) / WORK).unlink(missing_ok=True), message="work disk")
            steps.run("disk.overlay", lambda: _make_overlay_disk(ctx, vm, overlay_size_mib),
                      lambda: [(vm_dir(ctx, vm) / f).unlink(missing_ok=True) for f in (OVERLAY, KNOWN_HOSTS)],
                      message="overlay disk")
            if start:
                transport = _boot_steps(ctx, vm, steps, wait_ssh=wait_ssh)
            ctx.store.update_vm(vm["id"], state=RUNNING if start else STOPPED, error=None)
            steps.forget()
        except BaseException as e:
            if kept_for_inspection(ctx, vm, steps, e):
                ctx.store.update_vm(vm["id"], state=RUNNING, error=e.message)
                steps.forget()
                raise
            errs = steps.unwind()
            reason = e.message if isinstance(e, BangerError) else f"{type(e).__name__}: {e}"
            if errs:
                reason += " (clean-up incomplete: " + "; ".join(errs) + "; run banger gc)"
            ctx.store.update_vm(vm["id"], state=ERROR, error=reason)
            raise
    out = view(ctx, ctx.store.get_vm(vm["id"]), stages=True)
    out["work_disk_method"] = how.get("work")
    if keep_ssh:
        return out, transport
    if transport is not None:
        transport.close()
    return out


def name_taken(name: str):
    from banger.errors import Conflict

    return Conflict(f"a VM named {name!r} already exists",
                    f"pick another --name, or remove it first: banger vm delete -f {name}")


# ---------------------------------------------------------------- start / stop / restart
def start(ctx, ref: str, *, wait_ssh: bool = True, keep_ssh: bool = False):
    vm = get(ctx, ref)
    transport = None
    with ctx.locks.hold(f"vm/{vm['id']}", purpose="start"):
        vm = get(ctx, vm["id"])
        st = effective_state(ctx, vm)
        if st == RUNNING:
            raise InvalidState(f"VM {vm['name']} is already running", f"banger vm ssh {vm['name']}")
        if st in (CREATING, ERROR) and not (vm_dir(ctx, vm) / OVERLAY).exists():
            raise InvalidState(f"VM {vm['name']} was never built ({vm.get('error') or st})",
                               f"delete it (banger vm delete {vm['name']}) and create it again")
        _teardown_runtime(ctx, vm)  # leftovers of a crash
        from banger.vms.plan import Steps

        steps = Steps(ctx, vm["id"], "start")
        try:
            transport = _boot_steps(ctx, vm, steps, wait_ssh=wait_ssh)
            ctx.store.update_vm(vm["id"], state=RUNNING, error=None)
            steps.forget()
        except BaseException as e:
            if kept_for_inspection(ctx, vm, steps, e):
                ctx.store.update_vm(vm["id"], state=RUNNING, error=e.message)
                raise
            steps.unwind()
            ctx.store.update_vm(vm["id"], state=STOPPED,
                                error=e.message if isinstance(e, BangerError) else str(e))
            raise
    out = view(ctx, get(ctx, vm["id"]), stages=True)
    if keep_ssh:
        return out, transport
    if transport is not None:
        transport.close()
    return out


def _teardown_runtime(ctx, vm) -> None:
    """Idempotently remove everything a (possibly dead) running VM holds: VMM, sockets, TAP, neighbour."""
    h = load_handles(ctx, vm)
    if h:
        try:
            vm_driver(ctx, vm).kill(h)
        except BangerError:
            procs.kill(h.get("pid"), h.get("pid_start"))
    for extra in ("uffd_pid",):  # helper processes a driver may have recorded
        if h.get(extra):
            procs.kill(h.get(extra), h.get(extra + "_start"))
    (vm_dir(ctx, vm) / HANDLES).unlink(missing_ok=True)
    shutil.rmtree(run_dir(ctx, vm), ignore_errors=True)
    net_down(ctx, vm)


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
    if vm["state"] in (CREATING,):
        raise InvalidState(f"VM {vm['name']} is being created", "wait for the create to finish, or run banger gc")
    h = load_handles(ctx, vm)
    if vm["state"] == ERROR and not vmm_alive(ctx, vm, h):
        return  # a failed create already undid everything; it stays `error` with its reason
    timeout = ctx.cfg.stop_timeout_s if timeout is None else timeout
    from banger.vms.plan import Steps

    steps = Steps(ctx, vm["id"], "stop")
    graceful = None
    if vmm_alive(ctx, vm, h) and not force:
        ctx.progress.step("asking the guest to shut down")
        graceful = steps.run("guest.shutdown", lambda: _graceful_shutdown(ctx, vm, h, timeout))
    steps.run("teardown", lambda: _teardown_runtime(ctx, vm))
    ctx.store.update_vm(vm["id"], state=STOPPED,
                        error=None if graceful in (True, None) else "guest did not shut down in time; forced")


def restart(ctx, ref: str, *, wait_ssh: bool = True) -> dict:
    stop(ctx, ref)
    return start(ctx, ref, wait_ssh=wait_ssh)


# ---------------------------------------------------------------- delete / prune / set
def delete(ctx, ref: str, *, force: bool = False) -> dict:
    vm = get(ctx, ref)
    with ctx.locks.hold(f"vm/{vm['id']}", purpose="delete"):
        vm = ctx.store.get_vm(vm["id"])
        if vm is None:
            raise NotFound(f"no VM named {ref!r}", "it was deleted meanwhile")
        st = effective_state(ctx, vm)
        if st == RUNNING and not force:
            raise InvalidState(f"VM {vm['name']} is running", f"stop it first, or: banger vm delete -f {vm['name']}")
        destroy_vm(ctx, vm)
    return {"id": vm["id"], "name": vm["name"], "deleted": True}


def destroy_vm(ctx, vm) -> None:
    """Remove every trace of ``vm`` (caller holds vm/<id>): VMM, network, files, row."""
    _teardown_runtime(ctx, vm)
    shutil.rmtree(vm_dir(ctx, vm), ignore_errors=True)
    shutil.rmtree(run_dir(ctx, vm), ignore_errors=True)
    (ctx.cfg.run / f"paused-{vm['id']}").unlink(missing_ok=True)
    ctx.store.delete_vm_row(vm["id"])


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


# ---------------------------------------------------------------- access
def running(ctx, ref: str) -> dict:
    vm = get(ctx, ref)
    st = effective_state(ctx, vm)
    if st != RUNNING:
        raise InvalidState(f"VM {vm['name']} is {st}", f"start it: banger vm start {vm['name']}")
    return vm


def connect(ctx, ref: str):
    """An authenticated SSH transport to a running VM (host key pinned)."""
    from banger.guest import ssh

    vm = running(ctx, ref)
    return ssh.connect(vm["ip"], **ssh_files(ctx, vm))


def serial_log(ctx, ref: str) -> Path:
    vm = get(ctx, ref)
    return vm_dir(ctx, vm) / SERIAL


def ssh_config(ctx, ref: str) -> str:
    vm = get(ctx, ref)
    f = ssh_files(ctx, vm)
    return (f"Host {vm['name']}\n"
            f"    HostName {vm['ip']}\n"
            f"    User root\n"
            f"    IdentityFile {f['key_path']}\n"
            f"    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {f['known_hosts']}\n"
            f"    StrictHostKeyChecking yes\n"
            f"    HostKeyAlgorithms ssh-ed25519\n")


def parse_cp_arg(arg: str) -> tuple[str | None, str]:
    """`VM:path` -> (VM, path); a local path (containing '/' before any ':' or no ':') -> (None, path)."""
    head, sep, tail = arg.partition(":")
    if sep and head and "/" not in head:
        return head, tail or "."
    return None, arg


def copy(ctx, src: str, dst: str) -> dict:
    from banger.guest import ssh

    svm, spath = parse_cp_arg(src)
    dvm, dpath = parse_cp_arg(dst)
    if (svm is None) == (dvm is None):
        raise UsageError("exactly one of SRC and DST must be VM:path", "e.g. banger vm cp ./dir myvm:/root/")
    t = connect(ctx, svm or dvm)
    try:
        n = ssh.put(t, Path(spath), dpath) if dvm else ssh.get(t, spath, Path(dpath))
    finally:
        t.close()
    return {"files": n, "direction": "to_guest" if dvm else "from_guest"}
