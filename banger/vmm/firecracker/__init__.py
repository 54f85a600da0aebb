"""The Firecracker backend: its REST API over a unix socket, snapshots, lazy restore through the
UFFD handler (banger.uffd) tied to the VMM by a supervisor process. Needs hardware KVM."""

from __future__ import annotations

from banger.vmm.base import Backend

HELPER_ROLES = ("uffd", "supervisor", "console")  # recorded in handles.json as <role>_pid / <role>_pid_start


class FirecrackerBackend(Backend):
    name = "firecracker"

    def driver(self, cfg):
        from banger.vmm.firecracker.driver import FirecrackerDriver

        return FirecrackerDriver(cfg)

    def can_run(self, cfg) -> tuple[bool, str]:
        from banger.host.hostinfo import kvm_kind
        from banger.host.runner import which

        kind = kvm_kind()
        if kind != "hardware":
            return False, ("paravirtual KVM (ordinary guest kernels hang on it)" if kind == "pvm"
                           else "no hardware KVM (/dev/kvm with VT-x/AMD-V)")
        if not which(cfg.firecracker_bin):
            return False, f"{cfg.firecracker_bin} not found on PATH"
        return True, "Firecracker on KVM"

    def boot_args(self, cfg=None) -> list[str]:
        return ["reboot=k", "pci=off"]  # Firecracker exits on the i8042 reset; it has no PCI bus

    def helpers(self, handles: dict) -> list[dict]:
        out = super().helpers(handles)
        for role in HELPER_ROLES:
            if handles.get(f"{role}_pid"):
                out.append({"role": role, "pid": handles[f"{role}_pid"], "start": handles.get(f"{role}_pid_start")})
        return out

    def doctor_checks(self, cfg) -> list:
        from banger.host.checks import tool

        fc = tool("firecracker", cfg.firecracker_bin, None, required=False, version_args=["--version"])
        ok, why = self.can_run(cfg)
        if fc.status != "ok":
            fc.detail = "firecracker not found: the QEMU backend will be used"
            fc.hint = "install a Firecracker release binary on PATH (not packaged by Debian) to use it on KVM hosts"
        elif not ok:
            fc.status, fc.detail = "warn", f"{fc.detail}; cannot run here: {why}"
        return [fc]


BACKEND = FirecrackerBackend()
