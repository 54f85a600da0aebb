"""The QEMU backend: `-M microvm`, virtio-mmio, QMP; KVM when the host has hardware virtualisation,
TCG (software emulation) otherwise."""

from __future__ import annotations

from banger.vmm.base import Backend


class QemuBackend(Backend):
    name = "qemu"

    def driver(self, cfg):
        from banger.vmm.qemu.driver import QemuDriver

        return QemuDriver(cfg)

    def can_run(self, cfg) -> tuple[bool, str]:
        from banger.host.hostinfo import qemu_accel
        from banger.host.runner import which

        if not which(cfg.qemu_bin):
            return False, f"{cfg.qemu_bin} not found (apt-get install qemu-system-x86)"
        return True, f"QEMU with {qemu_accel().upper()}"

    def boot_args(self, cfg=None) -> list[str]:
        # QEMU runs with -no-reboot: a triple fault (reboot=t) always exits (reboot=k hangs on microvm
        # with a bzImage). microvm under TCG needs the TSC rate or the kernel hangs calibrating.
        from banger.host.hostinfo import tsc_khz

        khz = tsc_khz(cfg.run / "host-tsc.json" if cfg is not None else None)
        return ["reboot=t", "tsc=reliable"] + ([f"tsc_early_khz={khz}"] if khz else [])

    def helpers(self, handles: dict) -> list[dict]:
        out = super().helpers(handles)
        for role in ("console",):  # per-VM helpers the driver may record as <role>_pid/<role>_pid_start
            if handles.get(f"{role}_pid"):
                out.append({"role": role, "pid": handles[f"{role}_pid"], "start": handles.get(f"{role}_pid_start")})
        return out

    def doctor_checks(self, cfg) -> list:
        from banger.host.checks import tool

        return [tool("qemu", cfg.qemu_bin, "qemu-system-x86", version_args=["--version"])]


BACKEND = QemuBackend()
