"""Host diagnostics: each check reports ok/warn/fail with a fix hint, and --fix can apt-install."""

from __future__ import annotations

import os
import platform
import shutil
import sys

from banger.host.checks import Check, tool
from banger.host.hostinfo import kvm_kind
from banger.host.runner import run, which

_tool = tool


def run_checks(cfg) -> list[Check]:
    checks: list[Check] = []
    v = sys.version_info
    checks.append(Check("python", "ok" if v >= (3, 11) else "fail", platform.python_version(),
                        None if v >= (3, 11) else "banger needs Python 3.11 or newer"))
    kind = kvm_kind()
    if kind == "hardware":
        checks.append(Check("kvm", "ok", "hardware virtualisation: Firecracker, or QEMU with KVM"))
    elif kind == "pvm":
        checks.append(Check("kvm", "warn", "paravirtual KVM (PVM): ordinary guest kernels hang on it; "
                            "QEMU with TCG (software emulation) will be used",
                            "for full speed run banger on a host with VT-x/AMD-V and /dev/kvm"))
    else:
        checks.append(Check("kvm", "warn", "no /dev/kvm: QEMU with TCG (software emulation) will be used",
                            "enable virtualisation in firmware and load kvm_intel/kvm_amd"))
    from banger.vmm import registry

    for name in registry.names():  # each backend says what it needs and whether this host can run it
        checks.extend(registry.backend(name).doctor_checks(cfg))
    for t in ("mkfs.ext4", "e2fsck", "resize2fs", "debugfs"):
        checks.append(_tool(f"e2fsprogs:{t}", t, "e2fsprogs"))
    checks.append(_tool("debootstrap", "debootstrap", "debootstrap"))
    bb = "/bin/busybox" if os.path.exists("/bin/busybox") else which("busybox")
    if bb and _is_static(bb):
        checks.append(Check("busybox", "ok", f"{bb} (static)"))
    else:
        checks.append(Check("busybox", "fail", "no static busybox (the generated initramfs needs one)",
                            "apt-get install busybox-static", "busybox-static"))
    checks.append(_tool("cpio", "cpio", "cpio"))
    checks.append(_tool("lz4", "lz4", "lz4"))  # Debian's bzImage payload is LZ4: vmlinux extraction
    checks.append(_tool("dpkg-deb", "dpkg-deb", "dpkg"))
    apt = which("apt-get")
    checks.append(Check("apt", "ok", apt) if apt else
                  Check("apt", "warn", "apt-get not found: catalog kernels from Debian packages cannot be pulled",
                        "use `banger kernel import` or a URL catalog entry"))
    # every VM with a network gets its policy in nftables (anti-spoofing, egress, published ports)
    nft = _tool("nftables", "nft", "nftables")
    checks.append(nft)
    if nft.status == "ok":
        checks.append(_ip_forward(cfg))
    checks.append(_dev("tun", "/dev/net/tun", "modprobe tun"))
    checks.append(_uffd())
    checks.append(_reflink(cfg))
    checks.append(_disk(cfg))
    checks.append(_private(cfg))
    return checks


def wide_modes(cfg) -> list[tuple[str, int]]:
    """Every file and directory under BANGER_HOME and BANGER_RUN that group or other can read, write or
    enter (symlinks have no mode of their own and are skipped). In-progress build trees under
    staging/<dir>/ are not descended into: they hold a guest's files, whose modes are the guest's own
    (the staging dirs themselves are 0700, so nothing inside is reachable by others)."""
    import stat

    out: list[tuple[str, int]] = []

    def check(p: str) -> None:
        try:
            st = os.lstat(p)
        except OSError:
            return
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
            out.append((p, stat.S_IMODE(st.st_mode)))

    for root in dict.fromkeys((str(cfg.home), str(cfg.run))):
        if not os.path.isdir(root):
            continue
        staging = os.path.join(root, "staging")
        for d, dirs, files in os.walk(root):
            check(d)
            for f in files:
                check(os.path.join(d, f))
            if d == staging:  # a staging dir's contents are a guest tree in the making
                for sub in dirs:
                    check(os.path.join(d, sub))
                dirs[:] = []
    return out


def _private(cfg) -> Check:
    wide = wide_modes(cfg)
    if not wide:
        return Check("private-files", "ok", f"nothing under {cfg.home} or {cfg.run} is open to other users")
    shown = ", ".join(f"{p} ({m:04o})" for p, m in wide[:5]) + (f" and {len(wide) - 5} more" if len(wide) > 5
                                                                   else "")
    return Check("private-files", "fail", f"{len(wide)} paths are readable or writable by group/other "
                 f"(VM disks, memory files and keys must be private): {shown}",
                 "banger doctor --fix (makes them 0600 files / 0700 dirs)")


def fix_modes(cfg) -> list[str]:
    """Tighten what wide_modes reports: drop every group/other bit (0644 -> 0600, 0755 -> 0700)."""
    fixed = []
    for p, m in wide_modes(cfg):
        try:
            os.chmod(p, m & ~0o077, follow_symlinks=False)
            fixed.append(p)
        except (OSError, NotImplementedError):
            try:
                os.chmod(p, m & ~0o077)
                fixed.append(p)
            except OSError:
                pass
    return fixed


def _ip_forward(cfg) -> Check:
    """Is IPv4 forwarding on, which VMs need it and why (banger.net.policy.doctor_check)."""
    from banger.errors import BangerError
    from banger.net import policy

    try:
        return Check(**policy.doctor_check(cfg))
    except BangerError as e:
        return Check("ip_forward", "warn", f"cannot tell: {e.message}", e.hint)


def _is_static(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
        return b"ld-linux" not in data and b"/lib64/ld" not in data
    except OSError:
        return False


def _dev(name: str, path: str, hint: str) -> Check:
    if os.path.exists(path) and os.access(path, os.R_OK | os.W_OK):
        return Check(name, "ok", path)
    if os.path.exists(path):
        return Check(name, "fail", f"{path} exists but is not readable and writable by this user",
                     "run banger as root")
    return Check(name, "fail", f"{path} missing", hint)


def _uffd() -> Check:
    try:
        from banger.uffd import _uffd

        ok, how = _uffd.probe()
    except ImportError:
        return Check("userfaultfd", "fail", "banger's C extension is not built", "reinstall banger: pip install .")
    except OSError as e:
        return Check("userfaultfd", "warn", f"userfaultfd unavailable ({e}); snapshots restore with the File backend",
                     "run as root, or set vm.unprivileged_userfaultfd=1")
    return Check("userfaultfd", "ok" if ok else "warn", how)


def _reflink(cfg) -> Check:
    from banger.host.fsutil import supports_reflink

    try:
        if supports_reflink(cfg.home):
            return Check("reflink", "ok", f"{cfg.home} supports reflink: work disks clone instantly")
        return Check("reflink", "warn", f"{cfg.home} has no reflink: work disks are sparse-copied (~65 ms)",
                     "put BANGER_HOME on XFS or btrfs for instant clones")
    except OSError as e:
        return Check("reflink", "fail", f"cannot write to {cfg.home}: {e}", "run as root or set BANGER_HOME")


def _disk(cfg) -> Check:
    p = cfg.home if cfg.home.exists() else cfg.home.parent
    while not p.exists():
        p = p.parent
    free = shutil.disk_usage(p).free
    gib = free / (1 << 30)
    if gib < 2:
        return Check("disk", "fail", f"{gib:.1f} GiB free under {p}", "free disk space: images need ~1 GiB each")
    if gib < 10:
        return Check("disk", "warn", f"{gib:.1f} GiB free under {p}", "10 GiB or more is comfortable")
    return Check("disk", "ok", f"{gib:.0f} GiB free under {p}")


def fix(checks: list[Check], progress) -> list[str]:
    """Install the Debian packages that fix failed/warned checks. Root + apt only."""
    from banger.errors import HostError

    pkgs = sorted({c.package for c in checks if c.status != "ok" and c.package})
    if not pkgs:
        return []
    if os.geteuid() != 0:
        raise HostError("doctor --fix must run as root to install packages", "sudo banger doctor --fix")
    if not which("apt-get"):
        raise HostError("doctor --fix needs apt-get (a Debian-like host)", f"install by hand: {' '.join(pkgs)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with progress.task(f"apt-get install {' '.join(pkgs)}"):
        run(["apt-get", "update", "-q"], env=env, timeout=900)
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *pkgs], env=env, timeout=1800)
    return pkgs
