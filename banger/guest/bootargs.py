"""The kernel command line banger passes to its generated initramfs (the boot contract).

The initramfs (banger/data/initramfs-init.sh, built per kernel) reads these keys:
  banger.root=/dev/vda      read-only image (lower layer)
  banger.overlay=/dev/vdb   per-VM ext4 disk holding upper/ and work/ (copy-on-write root)
  banger.work=/dev/vdc      per-VM work disk, mounted at /root
  banger.ip=A.B.C.D/N       guest address on eth0 (absent: the VM has no network card, --net none)
  banger.gw=A.B.C.D         default gateway (the host bridge)
  banger.dns=A.B.C.D[,...]  optional resolvers (comma-separated) written to /etc/resolv.conf
  banger.hostname=NAME      hostname (a DNS label)
  banger.init=/sbin/banger-init   the image's init to hand over to (default /sbin/init)
Disk order is command-line order on both backends (vda, vdb, vdc).
QEMU (TCG guests read the host's TSC) also gets ``tsc=reliable tsc_early_khz=<the host's TSC rate>``:
the TSC's own rate, never the CPU's current clock (hostinfo.tsc_khz lists its sources), detected once
per process.
"""

from __future__ import annotations


def guest_cmdline(*, ip: str | None, prefixlen: int, gateway: str, hostname: str, init: str | None = None,
                  dns=None, extra: list[str] | None = None) -> str:
    """The command line; ``extra`` carries what the backend's device model needs (vmm Backend.boot_args).
    ``ip`` None: no network card (no banger.ip/gw, so the initramfs does not wait for eth0);
    ``dns``: one resolver or a list of them (IPv4 addresses)."""
    import ipaddress

    args = ["console=ttyS0", "panic=1", "quiet", "loglevel=3", "cryptomgr.notests",
            "random.trust_cpu=on", "i8042.noaux", "i8042.nomux", "i8042.dumbkbd",
            "banger.root=/dev/vda", "banger.overlay=/dev/vdb", "banger.work=/dev/vdc"]
    if ip is not None:
        args += [f"banger.ip={ip}/{prefixlen}", f"banger.gw={gateway}"]
    args.append(f"banger.hostname={hostname}")
    servers = [dns] if isinstance(dns, str) else list(dns or ())
    if servers and ip is not None:
        args.append("banger.dns=" + ",".join(str(ipaddress.IPv4Address(s)) for s in servers))
    if init:
        args.append(f"banger.init={init}")
    args += extra or []
    return " ".join(args)
