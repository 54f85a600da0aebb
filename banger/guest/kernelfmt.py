"""Kernel image formats: recognise a bzImage or an ELF vmlinux, extract the ELF from a
bzImage, and check an ELF for the PVH entry note Firecracker (and QEMU microvm) boot through.

bzImage layout (Documentation/x86/boot.rst): a real-mode setup of ``setup_sects + 1``
512-byte sectors, then the protected-mode part; the setup header (magic ``HdrS`` at
0x202) gives ``payload_offset``/``payload_length`` (protocol 2.08+), the location of the
compressed vmlinux inside the protected-mode part. Debian compresses it with LZ4 in the
legacy frame format followed by the 4-byte little-endian uncompressed size (the kernel
build's ``size_append``); gzip, xz and zstd payloads are handled too.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from banger.errors import CommandFailed, UsageError
from banger.host.runner import require, run

ELF_MAGIC = b"\x7fELF"
HDRS_MAGIC = b"HdrS"
XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_NOTE = 4
ET_EXEC = 2
EM_X86_64 = 62

# payload compression magics -> name
_MAGICS = [
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\x89LZO", "lzo"),
    (b"\x5d\x00\x00", "lzma"),
]


class NotAKernel(UsageError):
    code = "not_a_kernel"


@dataclass
class BzImageInfo:
    protocol: tuple[int, int]
    setup_sects: int
    payload_start: int       # absolute file offset of the compressed payload
    payload_length: int
    compression: str
    version_string: str      # e.g. "6.1.0-56-cloud-amd64 (debian-kernel@...) #1 SMP ..."

    @property
    def release(self) -> str:
        return self.version_string.split(" ", 1)[0] if self.version_string else ""


def kind(path: Path | str) -> str:
    """'bzImage', 'elf' or 'unknown' from the file's first bytes (never reads the whole file)."""
    with open(path, "rb") as f:
        head = f.read(0x210)
    if head[:4] == ELF_MAGIC:
        return "elf"
    if len(head) >= 0x206 and head[0x202:0x206] == HDRS_MAGIC:
        return "bzImage"
    return "unknown"


def bzimage_info(path: Path | str) -> BzImageInfo:
    path = Path(path)
    with open(path, "rb") as f:
        hdr = f.read(0x1000)
        size = os.fstat(f.fileno()).st_size
        if len(hdr) < 0x250 or hdr[0x202:0x206] != HDRS_MAGIC:
            raise NotAKernel(f"{path} is not an x86 bzImage (no 'HdrS' setup header at 0x202)",
                             "pass a Linux kernel image: a bzImage (vmlinuz) or an uncompressed ELF vmlinux")
        proto = struct.unpack_from("<H", hdr, 0x206)[0]
        protocol = (proto >> 8, proto & 0xFF)
        if protocol < (2, 8):
            raise NotAKernel(f"{path}: boot protocol {protocol[0]}.{protocol[1]} is too old (no payload fields)",
                             "use a kernel newer than 2.6.26")
        setup_sects = hdr[0x1F1] or 4
        payload_offset, payload_length = struct.unpack_from("<II", hdr, 0x248)
        start = (setup_sects + 1) * 512 + payload_offset
        if payload_length < 8 or start + payload_length > size:
            raise NotAKernel(f"{path}: the bzImage payload ({start}+{payload_length}) lies outside the file "
                             f"({size} bytes); the file is truncated or not a kernel",
                             "re-download the kernel")
        f.seek(start)
        magic = f.read(8)
        kv = struct.unpack_from("<H", hdr, 0x20E)[0]
        version = ""
        if kv:
            f.seek(0x200 + kv)
            version = f.read(256).split(b"\0", 1)[0].decode("ascii", "replace").strip()
    comp = next((name for m, name in _MAGICS if magic.startswith(m)), "unknown")
    return BzImageInfo(protocol, setup_sects, start, payload_length, comp, version)


def extract_vmlinux(bzimage: Path | str, out: Path | str, progress=None) -> dict:
    """Decompress the ELF vmlinux inside ``bzimage`` into ``out``. Returns facts about it.

    The output is verified: it must be an ELF file of the size the build recorded (lz4,
    gzip, zstd append it). On failure ``out`` is removed.
    """
    info = bzimage_info(bzimage)
    out = Path(out)
    with open(bzimage, "rb") as f:
        f.seek(info.payload_start)
        payload = f.read(info.payload_length)
    # The kernel build appends the uncompressed size (u32 LE) after lz4/gzip/zstd/lzo/... payloads.
    expected = struct.unpack("<I", payload[-4:])[0] if info.compression in ("lz4", "gzip", "zstd", "xz") else None
    try:
        if info.compression == "lz4":
            _lz4_legacy(payload[:-4], out)
        elif info.compression == "gzip":
            import zlib

            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            with open(out, "wb") as o:
                o.write(d.decompress(payload))
                o.write(d.flush())
        elif info.compression == "xz":
            import lzma

            d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            with open(out, "wb") as o:
                o.write(d.decompress(payload))
        elif info.compression == "zstd":
            import zstandard

            with open(out, "wb") as o:
                dobj = zstandard.ZstdDecompressor().decompressobj()
                o.write(dobj.decompress(payload[:-4]))
        else:
            raise NotAKernel(f"{bzimage}: the bzImage payload is compressed with {info.compression}, "
                             "which banger cannot unpack (it handles lz4, gzip, xz, zstd)",
                             "import an uncompressed ELF vmlinux instead (the kernel build's vmlinux file)")
    except _decode_errors() as e:
        out.unlink(missing_ok=True)
        raise NotAKernel(f"{bzimage}: the {info.compression} payload does not decompress ({e})",
                         "the bzImage is damaged; re-download it") from None
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    try:
        with open(out, "rb") as o:
            head = o.read(4)
        got = out.stat().st_size
        if head != ELF_MAGIC:
            raise NotAKernel(f"{bzimage}: the decompressed payload is not an ELF file",
                             "the bzImage is damaged or not an x86_64 Linux kernel")
        if expected is not None and got != expected:
            raise NotAKernel(f"{bzimage}: decompressed {got} bytes, the image says {expected}",
                             "the bzImage is truncated or damaged; re-download it")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return {"compression": info.compression, "size": got, "release": info.release,
            "version_string": info.version_string}


def _decode_errors() -> tuple:
    import lzma
    import zlib

    errs: tuple = (zlib.error, lzma.LZMAError, EOFError)
    try:
        import zstandard

        errs += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errs


def _lz4_legacy(data: bytes, out: Path) -> None:
    lz4 = require("lz4", "lz4")
    with open(out, "wb") as o:
        cp = run([lz4, "-d", "-c", "-q"], input=data, capture=True, check=False, timeout=300)
        if cp.returncode != 0:
            raise CommandFailed([lz4, "-d", "-c", "-q"], cp.returncode, (cp.stderr or b"").decode(errors="replace"),
                                "the LZ4 payload of the bzImage did not decompress; the image may be damaged")
        o.write(cp.stdout)


@dataclass
class ElfInfo:
    elf_class: int           # 2 = 64-bit
    machine: int
    etype: int
    notes: list[tuple[str, int, bytes]]

    @property
    def pvh_entry(self) -> int | None:
        for name, ntype, desc in self.notes:
            if name == "Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) >= 4:
                return struct.unpack_from("<I", desc)[0] if len(desc) < 8 else struct.unpack_from("<Q", desc)[0]
        return None


def elf_info(path: Path | str) -> ElfInfo:
    """Parse an ELF64 little-endian header and its PT_NOTE segments."""
    path = Path(path)
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 64 or ident[:4] != ELF_MAGIC:
            raise NotAKernel(f"{path} is not an ELF file", "pass an uncompressed vmlinux or a bzImage")
        if ident[4] != 2 or ident[5] != 1:
            raise NotAKernel(f"{path} is not a 64-bit little-endian ELF file", "banger runs x86_64 guests only")
        etype, machine = struct.unpack_from("<HH", ident, 16)
        phoff = struct.unpack_from("<Q", ident, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", ident, 0x36)
        notes: list[tuple[str, int, bytes]] = []
        if phentsize < 56 or phnum > 256:
            raise NotAKernel(f"{path}: malformed ELF program header table", "the file is damaged")
        f.seek(phoff)
        phdrs = f.read(phentsize * phnum)
        for i in range(phnum):
            p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", phdrs, i * phentsize)
            if p_type != PT_NOTE or p_filesz > 1 << 20:
                continue
            f.seek(p_offset)
            notes += _parse_notes(f.read(p_filesz))
    return ElfInfo(2, machine, etype, notes)


def _parse_notes(buf: bytes) -> list[tuple[str, int, bytes]]:
    out = []
    off = 0
    while off + 12 <= len(buf):
        namesz, descsz, ntype = struct.unpack_from("<III", buf, off)
        off += 12
        name = buf[off:off + namesz].rstrip(b"\0").decode("ascii", "replace")
        off += (namesz + 3) & ~3
        desc = buf[off:off + descsz]
        off += (descsz + 3) & ~3
        out.append((name, ntype, desc))
    return out


_LINUX_VERSION = re.compile(rb"Linux version (\d+\.\d+[^\s\x00]*) ")


def elf_release(path: Path | str) -> str:
    """The kernel release ('6.1.0-56-cloud-amd64') from the 'Linux version ...' banner inside a vmlinux."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return ""
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            mt = _LINUX_VERSION.search(m)
            return mt.group(1).decode("ascii", "replace") if mt else ""


def check_vmlinux(path: Path | str, *, require_pvh: bool = False) -> dict:
    """Validate an uncompressed kernel: ELF64 x86_64 executable, optionally with the PVH entry note."""
    info = elf_info(path)
    if info.machine != EM_X86_64 or info.etype != ET_EXEC:
        raise NotAKernel(f"{path} is an ELF file but not an x86_64 kernel executable "
                         f"(machine {info.machine}, type {info.etype})",
                         "pass the kernel build's vmlinux (or the bzImage)")
    pvh = info.pvh_entry
    if require_pvh and pvh is None:
        raise NotAKernel(f"{path} has no PVH entry note (Xen ELF note {XEN_ELFNOTE_PHYS32_ENTRY}); "
                         "Firecracker cannot boot it",
                         "use a kernel built with CONFIG_PVH=y")
    return {"pvh_entry": pvh, "release": elf_release(path)}


def config_has(config_text: str, option: str) -> bool:
    """True when a kernel .config sets ``option`` (e.g. 'CONFIG_PVH') to y or m."""
    for line in config_text.splitlines():
        if line.startswith(option + "="):
            return line.split("=", 1)[1].strip() in ("y", "m")
    return False
