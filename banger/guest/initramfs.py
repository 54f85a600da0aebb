"""Build the per-kernel initramfs banger boots every guest with.

Contents: a static busybox, the boot-contract script (banger/data/initramfs-init.sh) as
/init, and the few modules guests need (flattened into /lib/modules/<release>/ with a
modules.dep busybox modprobe reads). Written directly as a cpio "newc" archive (so device
nodes need no mknod and the output is byte-for-byte reproducible), then gzip-compressed.

Module selection works on a kernel's module tree (``lib/modules/<release>``): the guest
list below, plus the closure of their ``depends=`` fields read from each module's
``.modinfo`` ELF section (no depmod needed).
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
from importlib import resources
from pathlib import Path

from banger.errors import HostError, UsageError

# The boot contract's load order (banger/bootargs.py; /work/shared/guest-boot-notes.md).
GUEST_MODULES = [
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_mmio",
    "virtio_blk", "failover", "net_failover", "virtio_net", "overlay", "virtio_rng",
]
VSOCK_MODULES = ["vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"]
ALL_MODULES = GUEST_MODULES + VSOCK_MODULES

# Applets /init calls (ash runs busybox applets directly, the links are for humans in the shell).
APPLETS = ["sh", "mount", "umount", "mkdir", "modprobe", "insmod", "ip", "switch_root", "sleep", "reboot",
           "poweroff", "cat", "ls", "dmesg", "rm", "ln"]

BUSYBOX_CANDIDATES = ["/bin/busybox", "/usr/bin/busybox"]


def modname(filename: str) -> str:
    """'virtio-rng.ko' -> 'virtio_rng' (the kernel's KBUILD_MODNAME rule)."""
    base = filename
    for suf in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suf):
            base = base[: -len(suf)]
            break
    return base.replace("-", "_")


def _read_ko(path: Path) -> bytes:
    name = path.name
    data = path.read_bytes()
    if name.endswith(".ko.xz"):
        import lzma

        return lzma.decompress(data)
    if name.endswith(".ko.zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    return data


def modinfo(ko: bytes) -> dict[str, str]:
    """The key=value pairs of a module's .modinfo section."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise UsageError("not a 64-bit ELF kernel module", "pass .ko files built for this kernel")
    shoff = struct.unpack_from("<Q", ko, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)
    secs = []
    for i in range(shnum):
        sh_name, _t, _f, _a, sh_offset, sh_size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        secs.append((sh_name, sh_offset, sh_size))
    _n, stroff, strsize = secs[shstrndx]
    strtab = ko[stroff:stroff + strsize]
    out: dict[str, str] = {}
    for sh_name, off, size in secs:
        name = strtab[sh_name:strtab.index(b"\0", sh_name)]
        if name == b".modinfo":
            for item in ko[off:off + size].split(b"\0"):
                if b"=" in item:
                    k, v = item.split(b"=", 1)
                    out.setdefault(k.decode(errors="replace"), v.decode(errors="replace"))
    return out


def index_modules(tree: Path) -> dict[str, Path]:
    """modname -> path for every module file under ``tree``."""
    idx: dict[str, Path] = {}
    for root, _dirs, files in os.walk(tree):
        for f in files:
            if f.endswith((".ko", ".ko.xz", ".ko.zst", ".ko.gz")):
                idx.setdefault(modname(f), Path(root) / f)
    return idx


def select_modules(tree: Path | str, wanted: list[str] | None = None) -> list[dict]:
    """The wanted modules present in ``tree`` plus their dependencies, dependencies first.

    Returns [{"name", "path" (source file), "depends": [names]}] in load order: the
    contract order, each module preceded by any dependency not loaded yet.
    """
    tree = Path(tree)
    idx = index_modules(tree)
    wanted = ALL_MODULES if wanted is None else wanted
    info: dict[str, dict] = {}

    def load(name: str) -> dict:
        if name not in info:
            data = _read_ko(idx[name])
            deps = [d for d in modinfo(data).get("depends", "").split(",") if d]
            info[name] = {"name": name, "path": idx[name], "depends": deps, "data": data}
        return info[name]

    order: list[dict] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple = ()) -> None:
        if name in seen:
            return
        if name not in idx:
            raise UsageError(f"module {name} is needed (by {stack[-1] if stack else '?'}) but not in {tree}",
                             "pass the complete module tree of this kernel (lib/modules/<release>)")
        if name in stack:
            return
        m = load(name)
        for d in m["depends"]:
            visit(d, stack + (name,))
        seen.add(name)
        order.append(m)

    for w in wanted:
        if w in idx:
            visit(w)
    return order


def write_module_tree(mods: list[dict], dest: Path | str) -> None:
    """Write the selected modules flat into ``dest`` (uncompressed, '<modname>.ko') with a
    busybox/kmod-readable modules.dep and banger.order (load order)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    lines = []
    for m in mods:
        (dest / f"{m['name']}.ko").write_bytes(m["data"])
        deps = _dep_closure(m["name"], {x["name"]: x for x in mods})
        lines.append(f"{m['name']}.ko:" + "".join(f" {d}.ko" for d in deps))
    (dest / "modules.dep").write_text("\n".join(lines) + ("\n" if lines else ""))
    (dest / "banger.order").write_text("".join(m["name"] + "\n" for m in mods))


def load_module_tree(src: Path | str) -> list[dict]:
    """Read back a tree written by write_module_tree, in load order."""
    src = Path(src)
    order_file = src / "banger.order"
    if not order_file.is_file():
        return []
    out = []
    for name in order_file.read_text().split():
        data = (src / f"{name}.ko").read_bytes()
        deps = [d for d in modinfo(data).get("depends", "").split(",") if d]
        out.append({"name": name, "path": src / f"{name}.ko", "depends": deps, "data": data})
    return out


def _dep_closure(name: str, by_name: dict[str, dict]) -> list[str]:
    """All dependencies of ``name`` in modules.dep order (direct first, then theirs)."""
    out: list[str] = []
    todo = list(by_name[name]["depends"])
    while todo:
        d = todo.pop(0)
        if d in out or d not in by_name:
            continue
        out.append(d)
        todo += by_name[d]["depends"]
    return out


def init_script() -> bytes:
    return resources.files("banger.data").joinpath("initramfs-init.sh").read_bytes()


def find_busybox() -> str:
    for c in BUSYBOX_CANDIDATES:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            with open(c, "rb") as f:
                head = f.read(4096)
            if head[:4] == b"\x7fELF" and not _is_dynamic(c):
                return c
    found = shutil.which("busybox")
    if found and not _is_dynamic(found):
        return found
    raise HostError("a static busybox is needed to build the guest initramfs",
                    "install it: apt-get install busybox-static")


def _is_dynamic(path: str) -> bool:
    """True if the ELF has a PT_INTERP program header (needs a dynamic loader)."""
    with open(path, "rb") as f:
        h = f.read(64)
        if h[:4] != b"\x7fELF" or h[4] != 2:
            return True
        phoff = struct.unpack_from("<Q", h, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", h, 0x36)
        f.seek(phoff)
        ph = f.read(phentsize * phnum)
    return any(struct.unpack_from("<I", ph, i * phentsize)[0] == 3 for i in range(phnum))


class Newc:
    """A minimal cpio 'newc' (070701) writer."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1000

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), nlink: int = 1):
        self.ino += 1
        nameb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0))
        self.buf.write(hdr.encode() + nameb)
        self._pad()
        self.buf.write(data)
        self._pad()

    def _pad(self):
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str, perm: int = 0o755):
        self._entry(name, 0o040000 | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644):
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str):
        self._entry(name, 0o120000 | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600):
        self._entry(name, 0o020000 | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def build(out: Path | str, *, release: str, modules: list[dict], busybox: str | None = None,
          script: bytes | None = None) -> dict:
    """Write a gzip-compressed newc initramfs to ``out``. Returns {"size", "modules", "busybox"}."""
    out = Path(out)
    bb = busybox or find_busybox()
    c = Newc()
    for d in ("bin", "sbin", "dev", "proc", "sys", "run", "tmp", "etc", "lib", "lib/modules",
              "newroot", "mnt", "mnt/lower", "mnt/overlay"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", Path(bb).read_bytes(), 0o755)
    for a in APPLETS:
        c.symlink(f"bin/{a}", "busybox")
    c.file("init", script if script is not None else init_script(), 0o755)
    if release and modules:
        base = f"lib/modules/{release}"
        c.dir(base)
        by_name = {m["name"]: m for m in modules}
        dep_lines = []
        for m in modules:
            c.file(f"{base}/{m['name']}.ko", m["data"])
            dep_lines.append(f"{m['name']}.ko:" + "".join(f" {d}.ko" for d in _dep_closure(m["name"], by_name)))
        c.file(f"{base}/modules.dep", ("\n".join(dep_lines) + "\n").encode())
    c.file("etc/banger-initramfs", f"release={release}\nmodules={' '.join(m['name'] for m in modules)}\n".encode())
    raw = c.finish()
    data = gzip.compress(raw, compresslevel=6, mtime=0)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return {"size": len(data), "uncompressed": len(raw), "modules": [m["name"] for m in modules], "busybox": bb}
