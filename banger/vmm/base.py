"""The small interface every VMM backend implements (QEMU, Firecracker).

A driver knows how to turn a VmSpec into a running, detached VMM process and how
to control it afterwards through the handles it returned.  Handles are plain
JSON-able dicts persisted in the VM's handles.json (transient kernel state:
pids, start times, sockets, TAP name) and can be rebuilt; they are not durable
database columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass
class Drive:
    drive_id: str          # letters/digits/_ (Firecracker ID rules)
    path: Path
    read_only: bool = False


@dataclass
class VmSpec:
    vm_id: str
    name: str
    vcpu: int
    memory_mib: int
    vmlinux: Path          # uncompressed ELF (Firecracker; QEMU PVH boot)
    bzimage: Path | None   # QEMU may boot this instead
    initrd: Path
    cmdline: str
    drives: list[Drive]    # in guest order: vda (image, ro), vdb (overlay), vdc (work)
    tap: str
    mac: str
    run_dir: Path          # sockets live here (keep the path short: unix sockets max 107 bytes)
    vm_dir: Path           # disks, serial log, handles.json
    serial_log: Path
    extra: dict = field(default_factory=dict)


class VmmDriver(Protocol):
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
