"""The small interface every VMM backend implements (QEMU, Firecracker).

A driver knows how to turn a VmSpec into a running, detached VMM process and how
to control it afterwards through the handles it returned.  Handles are plain
JSON-able dicts persisted in the VM's handles.json (transient kernel state:
pids, start times, sockets, TAP name) and can be rebuilt; they are not durable
database columns.
"""

from __future__ import annotations

from pathlib import Path

_SPEC_FIELDS = ("vm_id", "name", "vcpu", "memory_mib", "vmlinux", "bzimage", "initrd", "cmdline", "drives", "tap",
                "mac", "run_dir", "vm_dir", "serial_log", "extra")


class Drive:
    """One guest disk. (Plain classes here, not dataclasses: importing dataclasses costs ~5 ms of every
    `vm create`'s start.)"""

    __slots__ = ("drive_id", "path", "read_only")

    def __init__(self, drive_id: str, path: Path, read_only: bool = False):
        self.drive_id = drive_id  # letters/digits/_ (Firecracker ID rules)
        self.path = path
        self.read_only = read_only

    def __eq__(self, other) -> bool:
        return isinstance(other, Drive) and (self.drive_id, self.path, self.read_only) == (
            other.drive_id, other.path, other.read_only)

    def __repr__(self) -> str:
        return f"Drive({self.drive_id!r}, {self.path!r}, {self.read_only!r})"


class VmSpec:
    """What a driver boots: ``vmlinux`` (uncompressed ELF: Firecracker, QEMU PVH) or ``bzimage`` (QEMU),
    ``drives`` in guest order (vda image ro, vdb overlay, vdc work), ``run_dir`` for sockets (keep it
    short: unix socket paths max 107 bytes), ``vm_dir`` for disks, the serial log and handles.json."""

    __slots__ = _SPEC_FIELDS

    def __init__(self, vm_id: str, name: str, vcpu: int, memory_mib: int, vmlinux: Path | None,
                 bzimage: Path | None, initrd: Path, cmdline: str, drives: list[Drive], tap: str | None, mac: str,
                 run_dir: Path, vm_dir: Path, serial_log: Path, extra: dict | None = None):
        self.vm_id, self.name, self.vcpu, self.memory_mib = vm_id, name, vcpu, memory_mib
        self.vmlinux, self.bzimage, self.initrd, self.cmdline = vmlinux, bzimage, initrd, cmdline
        self.drives, self.tap, self.mac = drives, tap, mac
        self.run_dir, self.vm_dir, self.serial_log = run_dir, vm_dir, serial_log
        self.extra = {} if extra is None else extra

    def __eq__(self, other) -> bool:
        return isinstance(other, VmSpec) and all(getattr(self, f) == getattr(other, f) for f in _SPEC_FIELDS)

    def __repr__(self) -> str:
        return "VmSpec(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in _SPEC_FIELDS) + ")"


class VmmDriver:
    """The interface (documentation only: drivers do not subclass it)."""

    name: str

    def launch(self, spec: VmSpec, progress=None) -> dict:
        """Spawn the VMM detached (new session), configure and boot it. Return handles:
        at least {"backend", "pid", "pid_start"}. On failure, kill what was spawned and raise."""

    def confirm_started(self, handles: dict) -> None:
        """Raise unless the VMM ``launch`` just started is up (for a boot nobody waits on over SSH)."""

    def is_running(self, handles: dict) -> bool:
        """True only if the recorded process (pid + start time) is alive."""

    def request_shutdown(self, handles: dict) -> None:
        """Ask the guest to shut down cleanly (Firecracker: SendCtrlAltDel; QEMU: see driver)."""

    def kill(self, handles: dict) -> None:
        """Force the VMM down and remove its sockets."""

    def pause(self, handles: dict) -> None: ...

    def resume(self, handles: dict) -> None: ...

    def snapshot(self, handles: dict, dest: Path) -> dict:
        """Write a snapshot of the paused VM into ``dest``; return metadata (files, sizes, layout)."""

    def restore(self, spec: VmSpec, snapshot_dir: Path, meta: dict, progress=None) -> dict:
        """Launch a new VMM from a snapshot into ``spec`` (new TAP/MAC/paths). Return handles."""


class Backend:
    """What a VMM backend tells the rest of banger (banger.vmm.registry lists them).

    Subclasses set ``name`` and override what differs; the defaults describe a VMM with one
    process and no helpers."""

    name = ""

    def driver(self, cfg) -> VmmDriver:
        raise NotImplementedError

    def can_run(self, cfg) -> tuple[bool, str]:
        """Can this host run guests with this backend? (ok, why not / how)."""
        raise NotImplementedError

    def boot_args(self, cfg=None) -> list[str]:
        """Kernel command-line arguments this backend's device model needs (``cfg``: for per-boot caches)."""
        return []

    def helpers(self, handles: dict) -> list[dict]:
        """Every process recorded in ``handles`` for one VM, VMM first: ``{"role", "pid", "start"}``.
        Teardown kills exactly these; gc spares exactly these (pid + start time, never argv matching)."""
        return [p for p in ({"role": "vmm", "pid": handles.get("pid"), "start": handles.get("pid_start")},)
                if p["pid"]]

    def doctor_checks(self, cfg) -> list:
        return []
