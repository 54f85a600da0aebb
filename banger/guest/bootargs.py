"""The kernel command line banger passes to its generated initramfs (the boot contract).

The initramfs (banger/data/initramfs-init.sh, built per kernel) reads these keys:
  banger.root=/dev/vda      read-only image (lower layer)
  banger.overlay=/dev/vdb   per-VM ext4 disk holding upper/ and work/ (copy-on-write root)
  banger.work=/dev/vdc      per-VM work disk, mounted at /root
  banger.ip=A.B.C.D/N       guest address on eth0
  banger.gw=A.B.C.D         default gateway (the host bridge)
  banger.dns=A.B.C.D        optional resolver written to /etc/resolv.conf
  banger.hostname=NAME      hostname (a DNS label)
  banger.init=/sbin/banger-init   the image's init to hand over to (default /sbin/init)
Disk order is command-line order on both backends (vda, vdb, vdc).
QEMU (TCG guests read the host's TSC) also gets ``tsc=reliable tsc_early_khz=<the host's TSC rate>``:
the TSC's own rate, never the CPU's current clock (hostinfo.tsc_khz lists its sources), detected once
per process.
"""

from __future__ import annotations

from banger.host.hostinfo import tsc_khz


def guest_cmdline(*, ip: str, prefixlen: int, gateway: str, hostname: str, init: str | None = None,
                  dns: str | None = None, backend: str = "qemu", extra: list[str] | None = None) -> str:
    # Both VMMs exit when the guest reboots (QEMU runs with -no-reboot). Firecracker needs
    # reboot=k (its i8042 reset); under QEMU microvm reboot=k hangs when booting a bzImage,
    # a triple fault (reboot=t) always works.
    args = ["console=ttyS0", "reboot=k" if backend == "firecracker" else "reboot=t", "panic=1", "quiet", "loglevel=3", "cryptomgr.notests",
            "random.trust_cpu=on", "i8042.noaux", "i8042.nomux", "i8042.dumbkbd",
            "banger.root=/dev/vda", "banger.overlay=/dev/vdb", "banger.work=/dev/vdc",
            f"banger.ip={ip}/{prefixlen}", f"banger.gw={gateway}", f"banger.hostname={hostname}"]
    if backend == "qemu":
        khz = tsc_khz()
        args += ["tsc=reliable"] + ([f"tsc_early_khz={khz}"] if khz else [])
    else:
        args += ["pci=off"]
    if dns:
        args.append(f"banger.dns={dns}")
    if init:
        args.append(f"banger.init={init}")
    args += extra or []
    return " ".join(args)
