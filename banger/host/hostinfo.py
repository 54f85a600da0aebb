"""Facts about the host that decide how guests run: KVM kind, TSC rate, QEMU accelerator.
(Which backend runs is banger.vmm.registry.choose.)"""

from __future__ import annotations

import functools
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


# ---------------------------------------------------------------------------- TSC rate
# QEMU TCG guests read the host's TSC, so their kernel gets ``tsc_early_khz`` = the host TSC rate
# (bootargs). That is the TSC's fixed rate, not the CPU's current clock: ``cpu MHz`` in /proc/cpuinfo
# moves with frequency scaling on many hosts. Sources, best first (the first one that answers wins):
#   sysfs             /sys/devices/system/cpu/cpu0/tsc_freq_khz (some kernels export it; exact)
#   kmsg-refined      kernel log "tsc: Refined TSC clocksource calibration: X MHz"
#   kmsg-tsc          kernel log "tsc: Detected X MHz TSC" (printed when it differs from the CPU's)
#   kmsg-processor    kernel log "tsc: Detected X MHz processor" (the TSC rate when no TSC line follows)
#   cpuid-15h         CPUID leaf 0x15: crystal clock x TSC/crystal ratio (Intel, when enumerated)
#   cpuid-hypervisor  CPUID leaf 0x40000010: TSC kHz published by a hypervisor (VMware, some KVM)
#   measured          the TSC counted against CLOCK_MONOTONIC_RAW over 2 ms (C, banger.uffd._uffd;
#                     ~1e-5), only with an invariant TSC (cpu flag constant_tsc)
#   cpuid-16h         CPUID leaf 0x16: base frequency in whole MHz (Intel; the TSC runs at it)
#   cpuinfo           "cpu MHz" in /proc/cpuinfo (last resort: may be the current frequency)
# The kernel log comes from /dev/kmsg (root, or dmesg_restrict=0), read only up to its first minute
# of boot. Its ring buffer is small: on a busy host (every TAP a banger VM gets logs bridge lines) the
# boot lines are gone within minutes, and AMD CPUs have no leaf 0x15: then the measurement decides.
# Detected once per process (tsc_info is cached): under a millisecond, ~2 ms when it measures.

SYSFS_TSC = "/sys/devices/system/cpu/cpu0/tsc_freq_khz"
KMSG = "/dev/kmsg"
CPUINFO = "/proc/cpuinfo"
_KHZ_MIN, _KHZ_MAX = 100_000, 20_000_000  # 100 MHz .. 20 GHz: anything else is a misreading
_KMSG_HORIZON_US = 60_000_000  # the tsc lines are printed in the first seconds of a boot


def _plausible(khz: int | None) -> int | None:
    return khz if khz is not None and _KHZ_MIN <= khz <= _KHZ_MAX else None


def _mhz_to_khz(text: str) -> int | None:
    """'2596.096' -> 2596096 (the kernel prints kHz as MHz with three decimals)."""
    whole, _, frac = text.strip().partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        return None
    return int(whole) * 1000 + int((frac + "000")[:3])


def tsc_from_sysfs(path: str = SYSFS_TSC) -> int | None:
    try:
        with open(path) as f:
            return _plausible(int(f.read().strip()))
    except (OSError, ValueError):
        return None


def tsc_from_kernel_log(lines) -> tuple[int, str] | None:
    """(kHz, source) from the kernel's own ``tsc: ...`` messages (``lines``: message texts, the
    /dev/kmsg record header already stripped); the best kind wins, the last printed of a kind."""
    found: dict[str, int] = {}
    for msg in lines:
        if not msg.startswith("tsc: "):
            continue
        msg = msg[5:].strip()
        for key, head, tail in (("kmsg-refined", "Refined TSC clocksource calibration: ", " MHz"),
                                ("kmsg-tsc", "Detected ", " MHz TSC"),
                                ("kmsg-processor", "Detected ", " MHz processor")):
            if msg.startswith(head) and msg.endswith(tail):
                khz = _plausible(_mhz_to_khz(msg[len(head):-len(tail)]))
                if khz:
                    found[key] = khz  # the last one printed counts (a re-calibration)
    for key in ("kmsg-refined", "kmsg-tsc", "kmsg-processor"):
        if key in found:
            return found[key], key
    return None


def kmsg_messages(path: str = KMSG, horizon_us: int = _KMSG_HORIZON_US):
    """Message texts of the kernel log records (``prio,seq,usec,flags;text``) up to ``horizon_us``
    after boot. /dev/kmsg hands out one record per read; a plain file (tests) any chunk."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        pending = b""
        while True:
            try:
                chunk = os.read(fd, 8192)
            except BlockingIOError:  # the end of the ring buffer
                break
            except BrokenPipeError:  # records overwritten under us: carry on with the next one
                continue
            except OSError:
                break
            if not chunk:
                break
            pending += chunk
            *records, pending = pending.split(b"\n")
            for rec in records:
                head, sep, text = rec.partition(b";")
                if not sep or rec.startswith(b" "):  # a continuation line (" KEY=value")
                    continue
                fields = head.split(b",")
                try:
                    usec = int(fields[2])
                except (IndexError, ValueError):
                    continue
                if usec > horizon_us:
                    return
                yield text.decode("utf-8", "replace")
    finally:
        os.close(fd)


def _default_cpuid(leaf: int, sub: int = 0):
    from banger.uffd import _uffd

    return _uffd.cpuid(leaf, sub)


def tsc_from_cpuid(cpuid=None, *, base_leaf: bool = False) -> tuple[int, str] | None:
    """(kHz, source) from CPUID leaves 0x15 or 0x40000010, or (``base_leaf``) only 0x16;
    ``cpuid(leaf, sub)`` -> 4 registers."""
    cpuid = cpuid or _default_cpuid
    try:
        max_leaf = cpuid(0, 0)[0]
        if base_leaf:
            if max_leaf >= 0x16:
                khz = _plausible((cpuid(0x16, 0)[0] & 0xFFFF) * 1000)
                if khz:
                    return khz, "cpuid-16h"
            return None
        if max_leaf >= 0x15:
            denom, numer, crystal_hz, _ = cpuid(0x15, 0)
            if denom and numer and crystal_hz:
                khz = _plausible(crystal_hz * numer // denom // 1000)
                if khz:
                    return khz, "cpuid-15h"
        if max_leaf >= 1 and cpuid(1, 0)[2] & (1 << 31):  # running under a hypervisor
            if cpuid(0x40000000, 0)[0] >= 0x40000010:
                khz = _plausible(cpuid(0x40000010, 0)[0])
                if khz:
                    return khz, "cpuid-hypervisor"
    except (ImportError, OSError):
        pass
    return None


def _default_measure() -> int | None:
    from banger.uffd import _uffd

    return _uffd.tsc_rate_khz(2000)


def tsc_measured(measure=None, flags: set[str] | None = None) -> int | None:
    """The TSC rate counted over a short sleep, when the TSC is invariant (else it tells nothing)."""
    if "constant_tsc" not in (cpu_flags() if flags is None else flags):
        return None
    try:
        return _plausible((measure or _default_measure)())
    except (ImportError, OSError):
        return None


def tsc_from_cpuinfo(path: str = CPUINFO) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return _plausible(int(float(line.split(":", 1)[1]) * 1000))
    except (OSError, ValueError):
        pass
    return None


def detect_tsc(*, sysfs: str = SYSFS_TSC, kmsg: str = KMSG, cpuid=None, measure=None,
               flags: set[str] | None = None, cpuinfo: str = CPUINFO) -> tuple[int | None, str | None]:
    """(TSC kHz, the source it came from) from the best source that answers; (None, None) if none.

    Every source can be replaced (tests): files by path, ``cpuid(leaf, sub)``, ``measure()`` -> kHz,
    ``flags`` (the cpu flags deciding whether a measurement means anything)."""
    khz = tsc_from_sysfs(sysfs)
    if khz:
        return khz, "sysfs"
    got = tsc_from_kernel_log(kmsg_messages(kmsg)) or tsc_from_cpuid(cpuid)
    if got:
        return got
    khz = tsc_measured(measure, flags)
    if khz:
        return khz, "measured"
    got = tsc_from_cpuid(cpuid, base_leaf=True)
    if got:
        return got
    khz = tsc_from_cpuinfo(cpuinfo)
    return (khz, "cpuinfo") if khz else (None, None)


@functools.cache
def tsc_info() -> tuple[int | None, str | None]:
    """This host's (TSC kHz, source), detected once per process."""
    return detect_tsc()


def tsc_khz(cache: Path | None = None) -> int | None:
    """The host's TSC rate in kHz (see the sources above), or None when nothing tells.

    ``cache``: a file (in banger's private run dir) keeping the answer for the rest of this boot, so
    each `vm create` does not measure it again (~2-4 ms of busy counting here)."""
    if cache is None:
        return tsc_info()[0]
    boot = _boot_id()
    try:
        import json

        doc = json.loads(Path(cache).read_text())
        if boot and doc.get("boot_id") == boot and (doc.get("khz") is None or _plausible(doc["khz"])):
            return doc["khz"]
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    khz = tsc_info()[0]
    if boot:
        try:
            from banger.host.fsutil import atomic_write_json

            atomic_write_json(cache, {"boot_id": boot, "khz": khz, "source": tsc_info()[1]}, durable=False)
        except OSError:
            pass
    return khz


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def qemu_accel() -> str:
    return "kvm" if kvm_kind() == "hardware" else "tcg"
