"""A VM's runtime: where its files live, its handles, whether its VMM is alive, its network,
its VMM spec, and tearing it all down.

Everything that snapshots, promote, workspace and gc need to know about a VM sits here, below
the lifecycle commands (banger.vms.lifecycle), so nothing has to reach into the lifecycle.

Reconciliation is lazy: every read compares the row with the recorded VMM process (pid + start
time in ``handles.json``), so a VM whose process died shows as ``crashed`` (or ``stopped`` when
the guest powered itself off), never ``running``.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from banger.errors import BangerError, Conflict, ExternalError, GuestTimeout, NotFound
from banger.host import procs
from banger.host.fsutil import atomic_write_bytes, atomic_write_json, read_json
from banger.names import Subnet

RUNNING, STOPPED, CRASHED, CREATING, ERROR = "running", "stopped", "crashed", "creating", "error"
POOLED, CLAIMING = "pooled", "claiming"   # warm-pool clones (banger.vmpool): capacity, and being claimed
PAUSED = "paused"  # shown (never stored) for a running VM whose guest a killed command left paused

OVERLAY, WORK, SERIAL, HANDLES, KNOWN_HOSTS = "overlay.ext4", "work.ext4", "serial.log", "handles.json", "known_hosts"
SPAWNED = "spawned.json"  # processes a launch spawned, each written down the moment it exists
HOST_KEY = "etc/ssh/ssh_host_ed25519_key"


# ---------------------------------------------------------------- lookups
def get(ctx, ref: str):
    vm = ctx.store.get_vm(ref)
    if vm is None:
        raise NotFound(f"no VM named {ref!r}", "list VMs with: banger vm list")
    return vm


def name_taken(name: str) -> Conflict:
    return Conflict(f"a VM named {name!r} already exists",
                    f"pick another --name, or remove it first: banger vm delete -f {name}")


# ---------------------------------------------------------------- paths & handles
def vm_dir(ctx, vm) -> Path:
    return ctx.cfg.vm_dir(vm["id"])


def run_dir(ctx, vm) -> Path:
    return ctx.cfg.vm_run_dir(vm["id"])


def _runtime_json(path: Path, default):
    """A record of live processes (handles.json, spawned.json); written without fsync (a host crash
    ends those processes too), so a file a crash left empty or torn reads as no record at all."""
    try:
        return read_json(path, default) or default
    except ValueError:
        return default


def load_handles(ctx, vm) -> dict:
    return _runtime_json(vm_dir(ctx, vm) / HANDLES, {})


def save_handles(ctx, vm, handles: dict) -> None:
    atomic_write_json(vm_dir(ctx, vm) / HANDLES, handles, 0o600, durable=False)


def serial_tail(ctx, vm, n: int = 25) -> str:
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
    """The state to show: a 'running' row whose VMM is gone is crashed (or stopped if the guest powered
    off); one whose guest was left paused by a command that died meanwhile is ``paused``."""
    st = vm["state"]
    if st == RUNNING:
        h = load_handles(ctx, vm) if handles is None else handles
        if not vmm_alive(ctx, vm, h):
            tail = serial_tail(ctx, vm, 5)
            return STOPPED if "reboot: Power down" in tail or "reboot: Restarting" in tail else CRASHED
        if pause_orphaned(h):
            return PAUSED
    if st in (CREATING, CLAIMING) and not creator_alive(vm):
        return ERROR
    if st == POOLED and not vmm_alive(ctx, vm, handles):
        return CRASHED
    return st


# ---------------------------------------------------------------- a guest paused by a command
# A command that pauses a guest (snapshot create) first writes who paused it and why into the handles
# (``paused_by``: pid + start time); it clears the mark once the guest runs again. A mark whose owner
# is dead means the command was killed with the guest paused: readers show the VM ``paused``, and gc
# (or the next snapshot create), under the VM's lock, resume it.
def mark_pausing(ctx, vm, handles: dict, op: str) -> None:
    handles["paused_by"] = {"pid": os.getpid(), "start": procs.start_time(os.getpid()), "op": op}
    save_handles(ctx, vm, handles)


def clear_pausing(ctx, vm, handles: dict) -> None:
    if handles.pop("paused_by", None) is not None:
        save_handles(ctx, vm, handles)


def pause_orphaned(handles: dict) -> bool:
    p = (handles or {}).get("paused_by")
    return bool(p) and not procs.alive(p.get("pid"), p.get("start"))


def resume_orphaned(ctx, vm, handles: dict) -> bool:
    """The caller holds vm/<id>. If a dead command left the guest paused, abort what that command had
    the VMM doing (a QEMU migration to a snapshot file keeps going without it) and resume the guest.
    Returns True if it did."""
    if not pause_orphaned(handles) or not vmm_alive(ctx, vm, handles):
        return False
    from banger.interrupts import shielded

    drv = vm_driver(ctx, vm)
    with shielded():
        cancel = getattr(drv, "cancel_snapshot", None)
        if cancel is not None:
            cancel(handles)
        drv.resume(handles)
        clear_pausing(ctx, vm, handles)
    return True


# ---------------------------------------------------------------- the VMM
def vm_driver(ctx, vm):
    from banger.vmm import registry

    return registry.driver(vm["backend"], ctx.cfg)


def vm_spec(ctx, vm, tap: str | None):
    from banger.guest.bootargs import guest_cmdline
    from banger.vmm import registry
    from banger.vmm.base import Drive, VmSpec

    o = vm["options"]
    subnet = Subnet(ctx.cfg.subnet)
    for k in ("rootfs", "initrd"):
        if not o.get(k) or not Path(o[k]).exists():
            raise NotFound(f"the {k} this VM was created from is gone: {o.get(k)}",
                           f"re-pull image {vm['image']!r} / kernel {vm['kernel']!r}, or delete this VM")
    has_net = tap is not None and net_mode(vm) != NET_NONE
    cmdline = guest_cmdline(ip=vm["ip"] if has_net else None, prefixlen=subnet.prefixlen, gateway=subnet.gateway,
                            hostname=vm["name"], init=o.get("init"), dns=guest_dns(ctx) if has_net else None,
                            extra=registry.backend(vm["backend"]).boot_args(ctx.cfg))
    d = vm_dir(ctx, vm)
    return VmSpec(vm_id=vm["id"], name=vm["name"], vcpu=vm["vcpu"], memory_mib=vm["memory_mib"],
                  vmlinux=Path(o["vmlinux"]) if o.get("vmlinux") else None,
                  bzimage=Path(o["bzimage"]) if o.get("bzimage") else None,
                  initrd=Path(o["initrd"]), cmdline=cmdline,
                  drives=[Drive("rootfs", Path(o["rootfs"]), True), Drive("overlay", d / OVERLAY),
                          Drive("work", d / WORK)],
                  tap=tap if has_net else None, mac=vm["mac"], run_dir=run_dir(ctx, vm), vm_dir=d,
                  serial_log=d / SERIAL)


def guest_dns(ctx) -> list[str]:
    """The resolvers a guest gets on its kernel command line: config ``dns``, else the host's real
    upstreams (banger.net.dns follows a local stub). None found: the guest keeps its image's resolv.conf."""
    from banger.errors import HostError
    from banger.net import dns

    try:
        return dns.upstreams(ctx.cfg)
    except HostError as e:
        ctx.progress.step(f"warning: {e.message}; the guest keeps its image's resolv.conf")
        return []


def kill_vmm(ctx, vm, handles: dict | None = None) -> None:
    """Force the VMM and every helper process recorded for this VM down (idempotent): what the driver
    put in handles.json and what a launch wrote down as it spawned (``spawned.json``)."""
    h = load_handles(ctx, vm) if handles is None else handles
    if h:
        try:
            vm_driver(ctx, vm).kill(h)
        except Exception:  # noqa: BLE001 - partial handles (a launch cut short): the recorded pids below still go
            pass
    for p in recorded_processes(ctx, vm, h):  # whatever the driver could not take down itself
        procs.kill(p["pid"], p["start"])


@contextmanager
def recording_spawns(ctx, vm):
    """Around a VMM launch or restore: every detached process spawned inside (the VMM, the console
    pump, the UFFD handler, the supervisor) is appended to ``spawned.json`` in the VM dir the moment it
    exists, before the driver does anything slow; so a command killed before handles.json is written
    still leaves a positive record of what it started (``recorded_processes``; gc and the undo kill
    exactly those). Yields the list, which the caller keeps in the handles."""
    path = vm_dir(ctx, vm) / SPAWNED
    seen: list[dict] = list(_runtime_json(path, []))

    def note(pid: int, start: int, argv: list[str]) -> None:
        seen.append({"role": f"spawned:{os.path.basename(argv[0])}", "pid": pid, "start": start})
        atomic_write_bytes(path, json.dumps(seen).encode(), 0o600, mkdir=False, durable=False)

    with procs.recording(note):
        yield seen


def recorded_processes(ctx, vm, handles: dict | None = None) -> list[dict]:
    """Every process banger recorded for ``vm`` (a row or ``{"id": ...}``): the helpers in its handles
    (the VMM first), the launch's spawn records kept in the handles, and a ``spawned.json`` left by a
    launch that never got to write handles.json. Deduplicated; ``{"role", "pid", "start"}``."""
    h = load_handles(ctx, vm) if handles is None else handles
    out, seen = [], set()
    for p in [*helper_processes(h), *(h.get("spawned") or []), *_runtime_json(vm_dir(ctx, vm) / SPAWNED, [])]:
        key = (p.get("pid"), p.get("start"))
        if p.get("pid") and key not in seen:
            seen.add(key)
            out.append(p)
    return out


def helper_processes(handles: dict) -> list[dict]:
    """Every process recorded for a VM: ``{"role", "pid", "start"}`` (the VMM first)."""
    from banger.vmm import registry

    if not handles:
        return []
    try:
        return registry.backend(handles.get("backend") or "qemu").helpers(handles)
    except BangerError:
        return [{"role": "vmm", "pid": handles.get("pid"), "start": handles.get("pid_start")}]


# ---------------------------------------------------------------- networking
NET_NAT, NET_ISOLATED, NET_NONE = "nat", "isolated", "none"


def net_mode(vm) -> str:
    """The VM's network mode: ``options["net"]``, else (rows older than --net) its ``nat`` flag."""
    return (vm.get("options") or {}).get("net") or (NET_NAT if vm.get("nat") else NET_ISOLATED)


def net_allow(vm) -> list[str]:
    return list((vm.get("options") or {}).get("allow") or [])


def net_up(ctx, vm, *, background: bool = False):
    """The VM's TAP on the bridge with its policy applied (anti-spoofing guard, egress per its mode and
    --allow list, its published ports); None for ``--net none`` (no TAP, no network card).

    ``background``: return ``(tap, PendingPolicy)`` at once instead, with the TAP administratively
    down; the caller starts the policy's thread once the VMM is spawned (``start()``: so it competes
    with no spawn for the GIL, and overlaps the VMM's and the guest's start) and brings the TAP up
    through ``ready()``."""
    if net_mode(vm) == NET_NONE:
        return (None, None) if background else None
    from banger.net import bridge, policy, pool

    bridge.ensure_bridge(ctx)
    tap = pool.claim(ctx, vm["id"])
    _neighbour(ctx, vm, add=True)
    if background:
        return tap, PendingPolicy(ctx, vm, tap)
    policy.apply(ctx, vm, tap)
    return tap


class PendingPolicy:
    """A VM's network policy applied from a thread (its own Ctx: its own SQLite connection).

    Until ``ready()`` returned, the VM's TAP is down: a down bridge port forwards nothing, so a guest
    (or a restored one, running at once) cannot send a frame before its guard is in place, whatever
    the timing. ``start()`` starts the thread (once); ``ready()`` starts it if nobody did, waits for it,
    raises what it raised, and only then sets the TAP up; ``wait()`` only waits for a started thread
    (an undo: nothing may race the policy's removal)."""

    def __init__(self, ctx, vm, tap: str):
        import threading

        from banger.net import fastnet, ports

        self.tap, self.error, self.result = tap, None, None
        fastnet.set_up(tap, False)
        claims = ports.claims(ctx, vm["id"]) if net_mode(vm) != NET_NONE else ()
        cfg = ctx.cfg

        def work():
            from banger.context import Ctx
            from banger.net import policy

            c = Ctx(cfg)
            try:
                self.result = policy.apply(c, vm, tap, ports=claims)
            except BaseException as e:  # noqa: BLE001 - handed to ready()
                self.error = e
            finally:
                c.close()

        self._thread = threading.Thread(target=work, name=f"policy-{vm['id']}", daemon=True)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def wait(self) -> None:
        if self._started:
            self._thread.join()

    def ready(self) -> dict:
        from banger.net import fastnet

        self.start()
        self._thread.join()
        if self.error is not None:
            raise self.error
        fastnet.set_up(self.tap, True)
        return self.result


def net_down(ctx, vm) -> None:
    """Idempotent: forget the neighbour, remove the VM's policy (guard, egress, DNAT; its durable port
    claims stay), hand the TAP back to the pool."""
    from banger.net import pool

    errors = []
    for fn in (lambda: _neighbour(ctx, vm, add=False), lambda: _policy_off(ctx, vm),
               lambda: pool.release(ctx, vm["id"])):
        try:
            fn()
        except BangerError as e:
            errors.append(e.message)
    if errors:
        raise ExternalError("; ".join(errors), "run `banger gc` to finish the clean-up")


def _policy_off(ctx, vm):
    from banger.host.runner import which

    if which("nft") is None:  # without nftables no policy was ever applied
        return
    from banger.net import policy

    policy.remove(ctx, vm["id"])


def _neighbour(ctx, vm, *, add: bool) -> None:
    if add:
        from banger.net import fastnet  # one rtnetlink request, no pyroute2 import on create

        fastnet.set_neighbour(ctx.cfg.bridge, vm["ip"], vm["mac"])
        return
    from banger.net import netlink

    try:
        netlink.del_neighbour(ctx.cfg.bridge, vm["ip"])
    except NotFound:
        pass  # no bridge, so no entry either


# ---------------------------------------------------------------- guest readiness
def ssh_files(ctx, vm) -> dict:
    from banger.guest.sshkeys import client_key

    return {"key_path": client_key(ctx.cfg).private, "known_hosts": vm_dir(ctx, vm) / KNOWN_HOSTS}


def wait_for_ssh(ctx, vm, handles: dict, timeout: float | None = None):
    from banger.guest import ssh

    timeout = ctx.cfg.ssh_timeout_s if timeout is None else timeout

    def alive():
        if not vmm_alive(ctx, vm, handles):
            from banger.vmm.qemu.driver import log_tail

            own = log_tail(Path(handles["vmm_log"]), 15) if handles.get("vmm_log") else ""
            raise ExternalError(f"the VMM exited while the guest was booting"
                                f"{'; its log:' + chr(10) + own if own.strip() else ''}; serial console:\n"
                                f"{serial_tail(ctx, vm)}", "see `banger vm logs` for the whole console")

    try:
        return ssh.wait_ready(vm["ip"], deadline=time.monotonic() + timeout, alive=alive, **ssh_files(ctx, vm))
    except GuestTimeout as e:
        tail = serial_tail(ctx, vm)
        raise GuestTimeout(f"guest did not answer SSH within {timeout:g}s ({e.message}). "
                           f"Serial console (last lines):\n{tail}",
                           f"inspect with `banger vm logs {vm['name']}`, remove with "
                           f"`banger vm delete -f {vm['name']}`", details={"console_tail": tail}) from None


# ---------------------------------------------------------------- teardown
def teardown_runtime(ctx, vm) -> None:
    """Idempotently remove everything a (possibly dead) running VM holds: VMM + helpers, sockets,
    TAP, neighbour, NAT."""
    import shutil

    kill_vmm(ctx, vm)
    for f in (HANDLES, SPAWNED):
        (vm_dir(ctx, vm) / f).unlink(missing_ok=True)
    shutil.rmtree(run_dir(ctx, vm), ignore_errors=True)
    net_down(ctx, vm)


def destroy_vm(ctx, vm) -> None:
    """Remove every trace of ``vm`` (caller holds vm/<id>): VMM, network, files, row."""
    import shutil

    teardown_runtime(ctx, vm)
    shutil.rmtree(vm_dir(ctx, vm), ignore_errors=True)
    shutil.rmtree(run_dir(ctx, vm), ignore_errors=True)
    (ctx.cfg.run / f"paused-{vm['id']}").unlink(missing_ok=True)
    ctx.store.delete_vm_row(vm["id"])
