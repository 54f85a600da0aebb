"""Kernel test support.

* ``pulled_default_kernel`` / ``default_kernel`` (session scope): pulls the real default
  kernel (Debian linux-image-cloud-amd64 through the host's apt) ONCE into a shared cache
  home, /var/tmp/banger-test-cache/kernels/<key>/home, keyed by the sources that shape
  the result (kernels.py, kernelfmt.py, initramfs.py, initramfs-init.sh, kernels.json), so
  reruns reuse it and a change to the builder rebuilds it. The .deb itself is cached
  across keys (cache/debs is shared). Concurrent test sessions are safe: the pull runs
  under banger's own ``kernel/<name>`` flock in that home. Returns resolve()'s dict
  (name, version, dir, vmlinux, bzimage, initrd, modules_dir, manifest).
* ``install_kernel(cfg, info)``: publish that kernel into a test's own BANGER_HOME via
  ``kernels.import_kernel`` of the directory (hard links + sha256 verification), fast.
* ``fake_elf_kernel`` / ``fake_bzimage``: small synthetic x86_64 "kernels" (ELF64 with a
  Xen PVH note and a 'Linux version' banner; a bzImage wrapping it with a real lz4 legacy
  / gzip / xz / zstd payload) for the download/lock/format tests, which must be fast.
* ``KernelServer``: a loopback HTTP server serving given bytes, recording every GET
  (path, start, end) so tests count downloads and measure overlap; optional throttle.
* ``write_catalog``: a test-only catalog file (for $BANGER_KERNEL_CATALOG).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import struct
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CACHE_ROOT = Path(os.environ.get("BANGER_TEST_CACHE", "/var/tmp/banger-test-cache")) / "kernels"
ROOT = Path(__file__).resolve().parents[2]
_KEY_SOURCES = ["banger/kernels/service.py", "banger/guest/kernelfmt.py", "banger/guest/initramfs.py",
                "banger/data/initramfs-init.sh", "banger/data/kernels.json"]


# ---------------------------------------------------------------- the real default kernel

def _cache_key() -> str:
    h = hashlib.sha256()
    for rel in _KEY_SOURCES:
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes())
    return h.hexdigest()[:16]


def pull_default_kernel_cached() -> dict:
    """Pull (or reuse) the default catalog kernel in the shared cache home; return resolve()'s dict."""
    from banger.config import load_config
    from banger.context import Ctx
    from banger.kernels import service as kernels

    home = CACHE_ROOT / _cache_key() / "home"
    (home / "cache").mkdir(parents=True, exist_ok=True)
    debs = CACHE_ROOT / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    link = home / "cache" / "debs"
    if not link.exists():
        try:
            link.symlink_to(debs)
        except FileExistsError:
            pass
    env = {"BANGER_HOME": str(home), "BANGER_RUN": str(CACHE_ROOT / "run")}
    saved = os.environ.pop("BANGER_KERNEL_CATALOG", None)
    try:
        ctx = Ctx(load_config(env))
        try:
            return kernels.resolve(ctx, None, auto_pull=True)
        finally:
            ctx.close()
    finally:
        if saved is not None:
            os.environ["BANGER_KERNEL_CATALOG"] = saved


@pytest.fixture(scope="session")
def pulled_default_kernel():
    return pull_default_kernel_cached()


@pytest.fixture(scope="session")
def default_kernel(pulled_default_kernel):
    return pulled_default_kernel


def install_kernel(cfg, info: dict, name: str | None = None) -> dict:
    """Publish a pulled kernel (``info`` from the fixture) into ``cfg``'s home under ``name``."""
    from banger.context import Ctx
    from banger.kernels import service as kernels

    ctx = Ctx(cfg)
    try:
        return kernels.import_kernel(ctx, name or info["name"], info["dir"], force=True)
    finally:
        ctx.close()


# ---------------------------------------------------------------- synthetic kernels

def fake_elf_kernel(release: str = "9.9.9-banger-test", size: int = 256 << 10, pvh: bool = True,
                    seed: int = 1, machine: int = 62, etype: int = 2) -> bytes:
    """An ELF64 x86_64 executable with a PT_NOTE (Xen PHYS32_ENTRY when ``pvh``) and a Linux banner."""
    notes = b""
    if pvh:
        desc = struct.pack("<Q", 0x1000000)
        notes = struct.pack("<III", 4, len(desc), 18) + b"Xen\0" + desc
    # an unrelated note too, so the parser has to walk
    notes = struct.pack("<III", 4, 4, 1) + b"GNU\0" + b"\1\2\3\4" + notes
    phoff = 64
    note_off = phoff + 56 * 2
    body_off = note_off + len(notes)
    banner = f"Linux version {release} (test@banger) (gcc) #1 SMP\n\0".encode()
    filler = _pseudo_random(max(0, size - body_off - len(banner)), seed)
    body = filler[: len(filler) // 2] + banner + filler[len(filler) // 2:]
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    ehdr += struct.pack("<HHIQQQIHHHHHH", etype, machine, 1, 0x1000000, phoff, 0, 0, 64, 56, 2, 64, 0, 0)
    ph_note = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(notes), len(notes), 4)
    ph_load = struct.pack("<IIQQQQQQ", 1, 5, body_off, 0x1000000, 0x1000000, len(body), len(body), 0x1000)
    return ehdr + ph_note + ph_load + notes + body


def _pseudo_random(n: int, seed: int) -> bytes:
    """Compressible-but-not-trivial filler (so lz4/xz have real work, sizes stay moderate)."""
    out = bytearray()
    x = seed
    while len(out) < n:
        x = (x * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
        out += hashlib.sha256(x.to_bytes(8, "little")).digest()[:8] * 4
    return bytes(out[:n])


def compress(data: bytes, kind: str) -> bytes:
    if kind == "lz4":
        cp = subprocess.run(["lz4", "-l", "-c", "-q"], input=data, capture_output=True, check=True)
        return cp.stdout
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "xz":
        import lzma

        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    if kind == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(write_checksum=True).compress(data)  # as the zstd CLI the kernel build uses
    if kind == "bzip2":
        import bz2

        return bz2.compress(data)
    raise ValueError(kind)


def fake_bzimage(elf: bytes, compression: str = "lz4", version: str = "9.9.9-banger-test (test@banger) #1 SMP",
                 truncate: int = 0) -> bytes:
    """An x86 bzImage (boot protocol 2.15) whose payload is ``elf`` compressed like the kernel build does."""
    setup_sects = 3
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)
    vstr = version.encode() + b"\0"
    struct.pack_into("<H", setup, 0x20E, 0x400 - 0x200)
    setup[0x400:0x400 + len(vstr)] = vstr
    payload = compress(elf, compression) + struct.pack("<I", len(elf))
    pm_prefix = b"\x90" * 0x80  # stands in for the decompressor code
    struct.pack_into("<II", setup, 0x248, len(pm_prefix), len(payload))
    img = bytes(setup) + pm_prefix + payload + b"\0" * 64
    if truncate:
        img = img[:-truncate - 64]
    return img


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_catalog(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"kernels": entries}, indent=1))
    return path


# ---------------------------------------------------------------- loopback HTTP server

class KernelServer:
    """Serve {path: bytes} on 127.0.0.1; ``requests`` records (path, start, end, status) per GET."""

    def __init__(self, files: dict[str, bytes], bytes_per_s: float | None = None):
        self.files = dict(files)
        self.bytes_per_s = bytes_per_s
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                rec = {"path": self.path, "start": time.time(), "end": None, "status": None}
                with server._lock:
                    server.requests.append(rec)
                data = server.files.get(self.path)
                if data is None:
                    rec["status"] = 404
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    rec["end"] = time.time()
                    return
                rec["status"] = 200
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                chunk = 64 << 10
                t0 = time.monotonic()
                try:
                    for off in range(0, len(data), chunk):
                        self.wfile.write(data[off:off + chunk])
                        if server.bytes_per_s:
                            ahead = (off + chunk) / server.bytes_per_s - (time.monotonic() - t0)
                            if ahead > 0:
                                time.sleep(ahead)  # throttle: pace the stream, not a wait for state
                except (BrokenPipeError, ConnectionResetError):
                    rec["status"] = "aborted"
                rec["end"] = time.time()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def gets(self, path: str) -> list[dict]:
        with self._lock:
            return [r for r in self.requests if r["path"] == path]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- inspecting results

def newc_entries(initrd: Path | str) -> dict[str, dict]:
    """Parse a gzip'd newc initramfs independently of banger's writer: name -> {mode, size, rdev, data}."""
    raw = gzip.decompress(Path(initrd).read_bytes())
    out = {}
    off = 0
    while True:
        assert raw[off:off + 6] == b"070701", f"bad newc magic at {off}"
        f = [int(raw[off + 6 + i * 8: off + 14 + i * 8], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = raw[off + 110: off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        data = raw[off: off + filesize]
        off = (off + filesize + 3) & ~3
        if name == "TRAILER!!!":
            break
        out[name] = {"mode": f[1], "size": filesize, "rdev": (f[9], f[10]), "data": data}
    return out


def download_log(cfg) -> list[dict]:
    p = cfg.cache_dir / "kernel-downloads.log"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def fake_module(name: str, depends: list[str] = (), vermagic: str = "9.9.9-banger-test SMP mod_unload ") -> bytes:
    """A minimal ELF64 relocatable with a .modinfo section (what module selection reads)."""
    modinfo = b"".join(f"{k}={v}".encode() + b"\0" for k, v in
                       (("license", "GPL"), ("depends", ",".join(depends)), ("name", name), ("vermagic", vermagic)))
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    data_off = 64
    modinfo_off = data_off
    shstr_off = modinfo_off + len(modinfo)
    shoff = (shstr_off + len(shstrtab) + 7) & ~7
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    ehdr += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    body = modinfo + shstrtab
    pad = b"\0" * (shoff - data_off - len(body))
    sh_null = b"\0" * 64
    sh_modinfo = struct.pack("<IIQQQQIIQQ", 1, 1, 2, 0, modinfo_off, len(modinfo), 0, 0, 1, 0)
    sh_shstr = struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, shstr_off, len(shstrtab), 0, 0, 1, 0)
    return ehdr + body + pad + sh_null + sh_modinfo + sh_shstr


def fake_module_tree(root: Path, release: str = "9.9.9-banger-test", extra: dict | None = None) -> Path:
    """lib/modules/<release>/kernel/... holding fake guest modules with the real dependency shape."""
    deps = {"virtio_ring": [], "virtio": [], "virtio_mmio": ["virtio", "virtio_ring"],
            "virtio_blk": ["virtio", "virtio_ring"], "failover": [], "net_failover": ["failover"],
            "virtio_net": ["net_failover", "virtio", "virtio_ring"], "overlay": [],
            "virtio-rng": ["virtio", "virtio_ring"], "unrelated_gpu": [], **(extra or {})}
    base = root / "lib" / "modules" / release
    for n, d in deps.items():
        p = base / "kernel" / ("drivers" if n != "overlay" else "fs") / f"{n}.ko"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(fake_module(n.replace("-", "_"), d, vermagic=f"{release} SMP mod_unload "))
    return base
