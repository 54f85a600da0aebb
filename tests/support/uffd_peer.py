"""Firecracker's side of the UFFD handshake, for real, independent of banger's code.

UffdPeer does what Firecracker does on ``PUT /snapshot/load`` with a Uffd backend
(firecracker-facts.md section 4): map anonymous private MAP_NORESERVE memory per
region (MAP_HUGETLB|MAP_HUGE_2MB for 2 MiB pages), create a userfaultfd
(syscall, falling back to /dev/userfaultfd + USERFAULTFD_IOC_NEW), UFFDIO_API with
only UFFD_FEATURE_EVENT_REMOVE, UFFDIO_REGISTER every region MISSING, connect to
the handler's socket and send the JSON region list plus the fd in ONE sendmsg,
then keep the connection open. Touching the memory makes real page faults that
the handler must serve; madvise_remove() makes real UFFD_EVENT_REMOVE events.

Only ctypes and the standard library are used (never banger), so the handler is
checked against the kernel, not against itself. Memory accesses go through
ctypes calls, which release the GIL, so several threads really fault at once.

Run as a script (``python -m tests.support.uffd_peer --help``) it plays a VMM
in its own process, for tests that need the peer killed or watched.
"""

from __future__ import annotations

import argparse
import array
import ctypes
import json
import os
import select
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

PAGE_4K = 4096
PAGE_2M = 2 << 20

SYS_userfaultfd = 323  # x86_64
O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000
UFFD_API = 0xAA
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFDIO_REGISTER_MODE_MISSING = 1


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (0xAA << 8) | nr


UFFDIO_API = _iowr(0x3F, 24)
UFFDIO_REGISTER = _iowr(0x00, 32)
USERFAULTFD_IOC_NEW = (0xAA << 8) | 0x00

PROT_READ, PROT_WRITE = 1, 2
MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE, MAP_HUGETLB = 0x02, 0x20, 0x4000, 0x40000
MAP_HUGE_2MB = 21 << 26
MADV_DONTNEED = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.memchr.restype = ctypes.c_void_p
_libc.memchr.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]


class _UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _UffdioRegister(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


def _oserror(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def new_userfaultfd() -> int:
    fd = _libc.syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)
    if fd >= 0:
        return fd
    if ctypes.get_errno() not in (1, 38):  # EPERM, ENOSYS
        raise _oserror("userfaultfd")
    dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    try:
        fd = _libc.ioctl(dev, USERFAULTFD_IOC_NEW, ctypes.c_void_p(O_CLOEXEC | O_NONBLOCK))
        if fd < 0:
            raise _oserror("USERFAULTFD_IOC_NEW")
        return fd
    finally:
        os.close(dev)


def make_mem_file(path: Path | str, size: int, seed: int = 1) -> bytes:
    """Write ``size`` pseudo-random bytes (every page distinct, no page all zero) and return them."""
    import random

    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(size))
    for off in range(0, size, PAGE_4K):  # stamp the page index so a wrong page never matches by chance
        data[off:off + 8] = (off // PAGE_4K + 1).to_bytes(8, "little")
    Path(path).write_bytes(data)
    return bytes(data)


class UffdPeer:
    """One fake VMM: regions of anonymous memory registered with a fresh userfaultfd."""

    def __init__(self, region_sizes: list[int], page_size: int = PAGE_4K, *, register: bool = True,
                 features: int = UFFD_FEATURE_EVENT_REMOVE):
        """``register=False``: announce the regions in the handshake but never UFFDIO_REGISTER them
        (a broken VMM: its memory reads zeros instead of faulting to the handler). ``features``: what
        UFFDIO_API asks for (REMOVE events by default; add UFFD_FEATURE_EVENT_UNMAP for munmap events)."""
        if page_size not in (PAGE_4K, PAGE_2M):
            raise ValueError("page_size must be 4096 or 2097152")
        self.page_size = page_size
        self.region_sizes = list(region_sizes)
        self.bases: list[int] = []
        self.conn: socket.socket | None = None
        self.uffd = -1
        self.features = 0
        self._stuck: list[threading.Thread] = []  # touch threads still blocked in a fault
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
        if page_size == PAGE_2M:
            flags |= MAP_HUGETLB | MAP_HUGE_2MB
        try:
            for size in self.region_sizes:
                if size <= 0 or size % page_size:
                    raise ValueError(f"region size {size} is not a positive multiple of {page_size}")
                addr = _libc.mmap(None, size, PROT_READ | PROT_WRITE, flags, -1, 0)
                if addr in (None, ctypes.c_void_p(-1).value):
                    raise _oserror("mmap")
                self.bases.append(addr)
            self.uffd = new_userfaultfd()
            api = _UffdioApi(UFFD_API, features, 0)
            if _libc.ioctl(self.uffd, UFFDIO_API, ctypes.byref(api)) < 0:
                raise _oserror("UFFDIO_API")
            self.features = api.features
            for base, size in zip(self.bases, self.region_sizes, strict=False):
                if not register:
                    break
                reg = _UffdioRegister(base, size, UFFDIO_REGISTER_MODE_MISSING, 0)
                if _libc.ioctl(self.uffd, UFFDIO_REGISTER, ctypes.byref(reg)) < 0:
                    raise _oserror("UFFDIO_REGISTER")
        except BaseException:
            self.close()
            raise

    # -- the handshake --------------------------------------------------------
    def regions_doc(self, mem_file_offsets: list[int] | None = None, extra_fields=None) -> list[dict]:
        """The JSON Firecracker 1.12+ sends. ``extra_fields`` (a dict, or one per region) is merged
        into each entry; a value of None removes that key (to mimic older versions)."""
        if mem_file_offsets is None:
            mem_file_offsets, off = [], 0
            for size in self.region_sizes:
                mem_file_offsets.append(off)
                off += size
        doc = []
        for i, (base, size, off) in enumerate(zip(self.bases, self.region_sizes, mem_file_offsets, strict=True)):
            entry = {"base_host_virt_addr": base, "size": size, "offset": off,
                     "page_size": self.page_size, "page_size_kib": self.page_size}
            extra = extra_fields[i] if isinstance(extra_fields, list) else (extra_fields or {})
            for k, v in extra.items():
                if v is None:
                    entry.pop(k, None)
                else:
                    entry[k] = v
            doc.append(entry)
        return doc

    def handshake(self, socket_path, mem_file_offsets: list[int] | None = None, extra_fields=None,
                  timeout: float = 10) -> None:
        payload = json.dumps(self.regions_doc(mem_file_offsets, extra_fields)).encode()
        self.handshake_raw(socket_path, payload, [self.uffd], timeout=timeout)

    def handshake_raw(self, socket_path, payload: bytes, fds: list[int] | None = None, timeout: float = 10) -> None:
        """Connect and send ``payload`` with ``fds`` (default: the uffd) in one sendmsg; no retry, like Firecracker."""
        if fds is None:
            fds = [self.uffd]
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(str(socket_path))
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            sent = s.sendmsg([payload], anc)
            if sent != len(payload):
                raise OSError(f"short sendmsg: {sent} of {len(payload)} bytes")
        except BaseException:
            s.close()
            raise
        self.conn = s

    def bad_handshake(self, socket_path, kind: str, timeout: float = 10) -> None:
        """Send one of the malformed handshakes the handler must refuse."""
        ps = self.page_size
        if kind == "invalid_json":
            self.handshake_raw(socket_path, b'[{"base_host_virt_addr": 1, "size": ', timeout=timeout)
        elif kind == "not_array":
            self.handshake_raw(socket_path, b'{"regions": []}', timeout=timeout)
        elif kind == "no_fd":
            self.handshake_raw(socket_path, json.dumps(self.regions_doc()).encode(), [], timeout=timeout)
        elif kind == "two_fds":
            extra = os.open("/dev/null", os.O_RDONLY)
            try:
                self.handshake_raw(socket_path, json.dumps(self.regions_doc()).encode(), [self.uffd, extra],
                                   timeout=timeout)
            finally:
                os.close(extra)
        elif kind == "not_uffd":
            other = os.open("/dev/null", os.O_RDONLY)
            try:
                self.handshake_raw(socket_path, json.dumps(self.regions_doc()).encode(), [other], timeout=timeout)
            finally:
                os.close(other)
        elif kind == "unknown_page_size":
            self.handshake(socket_path, extra_fields={"page_size": 65536, "page_size_kib": 65536}, timeout=timeout)
        elif kind == "page_sizes_disagree":
            self.handshake(socket_path, extra_fields={"page_size": ps, "page_size_kib": 2 * ps}, timeout=timeout)
        elif kind == "overlap":
            doc = self.regions_doc()
            if len(doc) < 2:
                raise ValueError("overlap needs two regions")
            doc[1]["base_host_virt_addr"] = doc[0]["base_host_virt_addr"] + ps
            self.handshake_raw(socket_path, json.dumps(doc).encode(), timeout=timeout)
        elif kind == "past_eof":
            doc = self.regions_doc()
            doc[-1]["offset"] += ps
            self.handshake_raw(socket_path, json.dumps(doc).encode(), timeout=timeout)
        elif kind == "unaligned":
            doc = self.regions_doc()
            doc[0]["base_host_virt_addr"] += 512
            self.handshake_raw(socket_path, json.dumps(doc).encode(), timeout=timeout)
        elif kind == "negative":
            doc = self.regions_doc()
            doc[0]["size"] = -ps
            self.handshake_raw(socket_path, json.dumps(doc).encode(), timeout=timeout)
        else:
            raise ValueError(f"unknown bad handshake {kind!r}")

    BAD_KINDS = ("invalid_json", "not_array", "no_fd", "two_fds", "not_uffd", "unknown_page_size",
                 "page_sizes_disagree", "overlap", "past_eof", "unaligned", "negative")

    def wait_eof(self, timeout: float = 10) -> bool:
        """True once the handler has closed its end of the connection."""
        assert self.conn is not None
        deadline = time.monotonic() + timeout
        p = select.poll()
        p.register(self.conn, select.POLLIN | select.POLLHUP)
        while (left := deadline - time.monotonic()) > 0:
            if p.poll(int(left * 1000) + 1):
                try:
                    if self.conn.recv(4096, socket.MSG_DONTWAIT) == b"":
                        return True
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    return True
        return False

    # -- guest memory ---------------------------------------------------------
    def _addr(self, region_index: int, offset: int, length: int) -> int:
        size = self.region_sizes[region_index]
        if offset < 0 or length < 0 or offset + length > size:
            raise ValueError(f"[{offset}, +{length}) is outside region {region_index} ({size} bytes)")
        return self.bases[region_index] + offset

    def read(self, region_index: int, offset: int, length: int) -> bytes:
        """Copy guest memory out (faulting pages in). The copy runs without the GIL."""
        addr = self._addr(region_index, offset, length)
        buf = ctypes.create_string_buffer(length)
        ctypes.memmove(buf, addr, length)
        return buf.raw

    def write(self, region_index: int, offset: int, data: bytes) -> None:
        addr = self._addr(region_index, offset, len(data))
        ctypes.memmove(addr, data, len(data))

    def touch_pages(self, region_index: int, page_indices, threads: int = 4, timeout: float = 60) -> None:
        """Read one byte of each page from ``threads`` threads at once (pages dealt round-robin)."""
        pages = list(page_indices)
        for p in pages:
            self._addr(region_index, p * self.page_size, 1)
        base, ps = self.bases[region_index], self.page_size
        errors: list[BaseException] = []

        def work(mine):
            try:
                one = ctypes.create_string_buffer(1)
                for p in mine:
                    ctypes.memmove(one, base + p * ps, 1)
            except BaseException as e:  # noqa: B036
                errors.append(e)

        ts = [threading.Thread(target=work, args=(pages[k::threads],), daemon=True) for k in range(threads)]
        for t in ts:
            t.start()
        deadline = time.monotonic() + timeout
        for t in ts:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in ts):
            self._stuck.extend(t for t in ts if t.is_alive())
            raise TimeoutError(f"touching {len(pages)} pages did not finish within {timeout}s (handler stuck?)")
        if errors:
            raise errors[0]

    def resident(self, region_index: int) -> bytes:
        """mincore() of the region: one byte per page, bit 0 set where a page is in (served)."""
        size = self.region_sizes[region_index]
        vec = ctypes.create_string_buffer(size // PAGE_4K)
        if _libc.mincore(ctypes.c_void_p(self.bases[region_index]), size, vec) != 0:
            raise _oserror("mincore")
        return vec.raw

    def madvise_remove(self, region_index: int, offset: int, length: int) -> None:
        """MADV_DONTNEED: the kernel sends UFFD_EVENT_REMOVE and waits until the handler reads it."""
        addr = self._addr(region_index, offset, length)
        if _libc.madvise(addr, length, MADV_DONTNEED) != 0:
            raise _oserror("madvise(MADV_DONTNEED)")

    def unmap_and_remap(self, region_index: int, offset: int, length: int) -> None:
        """munmap a range of guest memory (UFFD_EVENT_UNMAP when negotiated: the kernel sends it after the
        unmap and waits until the handler reads it), then map fresh anonymous memory at the same place
        and register it with the userfaultfd again (a VMM replacing part of guest memory)."""
        addr = self._addr(region_index, offset, length)
        if _libc.munmap(addr, length) != 0:
            raise _oserror("munmap")
        got = _libc.mmap(addr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | 0x10,
                         -1, 0)  # MAP_FIXED
        if got != addr:
            raise _oserror("mmap(MAP_FIXED)")
        reg = _UffdioRegister(addr, length, UFFDIO_REGISTER_MODE_MISSING, 0)
        if _libc.ioctl(self.uffd, UFFDIO_REGISTER, ctypes.byref(reg)) < 0:
            raise _oserror("UFFDIO_REGISTER")

    def close(self) -> None:
        """Hang up, release the uffd, unmap. Closing the uffd first lets threads still blocked in a
        fault (a dead handler) finish on zero pages; memory they may still touch is left mapped."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1
        for t in self._stuck:
            t.join(5)
        if any(t.is_alive() for t in self._stuck):
            return  # never unmap under a running thread
        for base, size in zip(self.bases, self.region_sizes, strict=False):
            _libc.munmap(base, size)
        self.bases = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def thread_blocked_in_uffd(tid: int, pid: int | None = None) -> bool:
    """True if the thread sleeps in the kernel's userfaultfd code (a fault or event awaiting the handler)."""
    pid = pid or os.getpid()
    try:
        with open(f"/proc/{pid}/task/{tid}/wchan") as f:
            wchan = f.read()
        if "userfault" in wchan:
            return True
        with open(f"/proc/{pid}/task/{tid}/stack") as f:
            return "userfault" in f.read()
    except OSError:
        return False


# -- hugetlb pages --------------------------------------------------------------
_NR = "/proc/sys/vm/nr_hugepages"


def free_hugepages() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


@contextmanager
def hugepages(needed: int):
    """Make ``needed`` free 2 MiB hugetlb pages available; restore vm.nr_hugepages afterwards.

    Yields the number actually free (the caller skips if it is less than needed)."""
    with open(_NR) as f:
        before = int(f.read())
    changed = False
    try:
        free = free_hugepages()
        if free < needed:
            try:
                with open(_NR, "w") as f:
                    f.write(str(before + needed - free))
                changed = True
            except OSError:
                pass
        yield free_hugepages()
    finally:
        if changed:
            with open(_NR, "w") as f:
                f.write(str(before))


# -- script mode: a VMM in its own process ---------------------------------------
def _script(argv=None) -> int:
    ap = argparse.ArgumentParser(description="play Firecracker's side of the UFFD handshake in this process")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--regions", required=True, help="comma-separated region sizes in bytes")
    ap.add_argument("--page-size", type=int, default=PAGE_4K)
    ap.add_argument("--bad", choices=UffdPeer.BAD_KINDS, help="send this malformed handshake instead")
    ap.add_argument("--no-register", action="store_true", help="announce the regions but never register them")
    ap.add_argument("--mem-file", help="compare every touched byte with this file")
    ap.add_argument("--then", choices=("hold", "touch_all", "touch_first", "stdin"), default="hold",
                    help="after the handshake: hold the connection, touch every page, touch one page, or "
                         "obey stdin lines 'read REGION OFFSET LENGTH' (answers 'DATA <sha256>') / 'quit'")
    args = ap.parse_args(argv)
    peer = UffdPeer([int(x) for x in args.regions.split(",")], args.page_size, register=not args.no_register)
    try:
        if args.bad:
            peer.bad_handshake(args.socket, args.bad)
        else:
            peer.handshake(args.socket)
    except (BrokenPipeError, ConnectionResetError):
        print("EOF", flush=True)  # the handler hung up before we finished sending
        return 0
    print(f"HANDSHAKE {os.getpid()}", flush=True)
    if args.then in ("touch_all", "touch_first"):
        want = Path(args.mem_file).read_bytes() if args.mem_file else None
        off = 0
        for i, size in enumerate(peer.region_sizes):
            n = size if args.then == "touch_all" else args.page_size
            got = peer.read(i, 0, n)
            if want is not None and got != want[off:off + n]:
                print(f"MISMATCH region {i}", flush=True)
                return 3
            off += size
            if args.then == "touch_first":
                break
        print("TOUCHED", flush=True)
    if args.then == "stdin":
        import hashlib

        for line in sys.stdin:
            cmd = line.split()
            if cmd and cmd[0] == "read":
                got = peer.read(int(cmd[1]), int(cmd[2]), int(cmd[3]))
                print(f"DATA {hashlib.sha256(got).hexdigest()}", flush=True)
            elif cmd and cmd[0] == "quit":
                break
        peer.close()
        return 0
    # hold until the handler hangs up (or we are killed)
    eof = peer.wait_eof(timeout=3600)
    print("EOF" if eof else "NO_EOF", flush=True)
    peer.close()
    return 0


if __name__ == "__main__":
    sys.exit(_script())
