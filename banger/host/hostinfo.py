"""Facts about the host that decide how guests run: KVM kind, TSC rate, QEMU accelerator.
(Which backend runs is banger.vmm.registry.choose.)"""

from __future__ import annotations

import os
from pathlib import Path


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def kvm_kind() -> str:
    """'hardware' (vmx/svm + /dev/kvm), 'pvm' (paravirtual KVM: ordinary guests hang), or 'none'."""
    if not os.path.exists("/dev/kvm"):
        return "none"
    flags = cpu_flags()
    if Path("/sys/module/kvm_pvm").exists() and not flags & {"vmx", "svm"}:
        return "pvm"
    if flags & {"vmx", "svm"} and (Path("/sys/module/kvm_intel").exists() or Path("/sys/module/kvm_amd").exists()):
        return "hardware"
    if flags & {"vmx", "svm"}:
        return "hardware"
    return "pvm" if Path("/sys/module/kvm_pvm").exists() else "none"


def tsc_khz() -> int | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def qemu_accel() -> str:
    return "kvm" if kvm_kind() == "hardware" else "tcg"
