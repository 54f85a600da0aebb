"""The UFFD handler process against real userfaultfd faults made by tests/support/uffd_peer.py.

Every test spawns the real handler (banger.uffd.spawn_handler -> python -m
banger.uffd.handler), plays Firecracker's side with real anonymous (or hugetlb)
memory registered with a real userfaultfd, and compares guest memory byte for
byte with the memory file.
"""

from __future__ import annotations

import array
import ctypes
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from banger.host import procs
from banger.uffd import policy, spawn_handler
from tests.support.uffd_peer import (
    PAGE_2M,
    PAGE_4K,
    UFFD_FEATURE_EVENT_REMOVE,
    UFFD_FEATURE_EVENT_UNMAP,
    UffdPeer,
    hugepages,
    make_mem_file,
    thread_blocked_in_uffd,
)

ROOT = Path(__file__).resolve().parents[2]
PS = PAGE_4K
MB = 1 << 20


def _uffd_usable() -> str | None:
    """A reason to skip on a host without userfaultfd. Never in CI (the build machines have it, so a
    skip there would hide a failure), and a missing C extension is a failure everywhere."""
    if os.environ.get("CI"):
        return None
    if os.geteuid() != 0:
        return "needs root"
    from banger.uffd import _uffd  # ImportError = the extension was not built: fail, don't skip

    try:
        _uffd.probe()
    except OSError as e:
        return f"userfaultfd unavailable: {e}"
    return None


pytestmark = pytest.mark.skipif(_uffd_usable() is not None, reason=str(_uffd_usable()))


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    delay = 0.002
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Handler:
    pid: int
    started: int
    sock: Path
    stats_path: Path
    log_path: Path
    rc: int | None = None

    def wait(self, timeout: float = 20) -> int:
        """The handler's exit code (negative: killed by that signal)."""
        def done():
            if self.rc is None:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.rc = os.waitstatus_to_exitcode(status)
            return self.rc is not None
        wait_for(done, timeout, f"the handler (pid {self.pid}) to exit; log:\n{self.log()}")
        return self.rc

    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text())

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""


@pytest.fixture
def udir():
    d = Path(tempfile.mkdtemp(prefix="bu-", dir="/tmp"))  # short: AF_UNIX paths are limited
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start(udir):
    started: list[Handler] = []
    count = [0]

    def _start(mem: Path, *, prefetch: bool | None = False, access_log=None, connect_timeout: float = 20,
               extra=(), vmm_pid=None) -> Handler:
        count[0] += 1
        n = count[0]
        h = Handler(0, 0, udir / f"h{n}.sock", udir / f"h{n}.stats.json", udir / f"h{n}.log")
        h.pid, h.started = spawn_handler(h.sock, mem, access_log=access_log, stats_path=h.stats_path,
                                         prefetch=prefetch, connect_timeout=connect_timeout, log_path=h.log_path,
                                         vmm_pid=vmm_pid, extra_args=list(extra))
        started.append(h)
        return h

    yield _start
    for h in started:
        if h.rc is None:
            procs.kill(h.pid, h.started)


@pytest.fixture
def peers():
    made: list[UffdPeer] = []

    def _make(sizes, page_size=PS) -> UffdPeer:
        p = UffdPeer(sizes, page_size)
        made.append(p)
        return p

    yield _make
    for p in made:
        p.close()


class PeerProc:
    """A fake VMM in its own process (so the handler may kill it)."""

    def __init__(self, sock: Path, sizes, *, bad: str | None = None, then: str = "hold", page_size=PS,
                 mem_file=None, extra=()):
        argv = [sys.executable, "-m", "tests.support.uffd_peer", "--socket", str(sock),
                "--regions", ",".join(str(s) for s in sizes), "--page-size", str(page_size), "--then", then]
        if bad:
            argv += ["--bad", bad]
        if mem_file:
            argv += ["--mem-file", str(mem_file)]
        argv += list(extra)
        self.p = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: list[str] = []

    def expect(self, prefix: str, timeout: float = 20) -> str:
        box: dict = {}
        t = threading.Thread(target=lambda: box.setdefault("line", self.p.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        line = box.get("line")
        assert line is not None, f"peer printed nothing within {timeout}s (wanted {prefix})"
        self.lines.append(line)
        assert line.startswith(prefix), f"peer said {line!r}, wanted {prefix!r}"
        return line

    def rest(self) -> list[str]:
        """The remaining output lines (after the peer exited)."""
        return [ln.strip() for ln in self.p.stdout.read().splitlines()]

    def send(self, line: str) -> None:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def wait(self, timeout: float = 20) -> int:
        return self.p.wait(timeout)

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


@pytest.fixture
def peer_procs():
    made: list[PeerProc] = []

    def _make(*a, **kw) -> PeerProc:
        pp = PeerProc(*a, **kw)
        made.append(pp)
        return pp

    yield _make
    for pp in made:
        pp.kill()


def memfile(udir: Path, size: int, seed: int = 1) -> tuple[Path, bytes]:
    path = udir / "mem"
    return path, make_mem_file(path, size, seed)


def offsets(sizes):
    out, off = [], 0
    for s in sizes:
        out.append(off)
        off += s
    return out


# ---------------------------------------------------------------------------- serving


def test_multi_region_4k_concurrent_threads_every_byte(udir, start, peers):
    sizes = [3 * MB, 1 * MB, 2 * MB + 64 * PS]
    mem, data = memfile(udir, sum(sizes))
    h = start(mem)
    peer = peers(sizes)
    peer.handshake(h.sock)
    wait_for(lambda: not h.sock.exists(), 10, "the socket file to go once the VMM connected")
    rnd = random.Random(5)
    for i, size in enumerate(sizes):
        pages = list(range(size // PS))
        rnd.shuffle(pages)
        peer.touch_pages(i, pages, threads=4)
    for i, (size, off) in enumerate(zip(sizes, offsets(sizes), strict=True)):
        assert peer.read(i, 0, size) == data[off:off + size], f"region {i} differs from the memory file"
    peer.close()
    assert h.wait() == 0
    st = h.stats()
    total = sum(sizes) // PS
    assert st["ok"] and st["exit_reason"] == "peer_closed" and st["mode"] == "on_demand"
    assert st["serve"]["fault_pages"] + st["serve"]["eexist"] >= total
    assert st["serve"]["fault_pages"] == total  # each page copied exactly once
    assert st["serve"]["prefetch_pages"] == 0
    assert st["page_size"] == PS and len(st["regions"]) == 3
    assert sorted(p.name for p in udir.iterdir()) == ["h1.log", "h1.stats.json", "mem"]


def test_regions_at_arbitrary_file_offsets(udir, start, peers):
    """Regions need not be in file order: each maps to its own offset."""
    sizes = [1 * MB, 2 * MB]
    mem, data = memfile(udir, 4 * MB)
    h = start(mem)
    peer = peers(sizes)
    file_offsets = [3 * MB, 0]
    peer.handshake(h.sock, mem_file_offsets=file_offsets)
    for i, (size, off) in enumerate(zip(sizes, file_offsets, strict=True)):
        assert peer.read(i, 0, size) == data[off:off + size]
    peer.close()
    assert h.wait() == 0


@pytest.mark.parametrize("fields", [{"page_size": None}, {"page_size": None, "page_size_kib": None}],
                         ids=["fc1.7-1.11", "fc<=1.6"])
def test_older_firecracker_page_size_fields(udir, start, peers, fields):
    sizes = [1 * MB]
    mem, data = memfile(udir, sum(sizes))
    h = start(mem)
    peer = peers(sizes)
    peer.handshake(h.sock, extra_fields=fields)
    assert peer.read(0, 0, MB) == data
    peer.close()
    assert h.wait() == 0
    assert h.stats()["page_size"] == PS


def test_remove_then_read_gives_zeros(udir, start, peers):
    sizes = [2 * MB, 1 * MB]
    mem, data = memfile(udir, sum(sizes))
    h = start(mem)
    peer = peers(sizes)
    peer.handshake(h.sock)
    assert peer.read(0, 0, 2 * MB) == data[:2 * MB]
    # remove a populated range and a never-touched one
    peer.madvise_remove(0, 100 * PS, 20 * PS)
    peer.madvise_remove(1, 0, 8 * PS)
    assert peer.read(0, 100 * PS, 20 * PS) == bytes(20 * PS)
    assert peer.read(1, 0, 8 * PS) == bytes(8 * PS)
    # neighbours keep the file's bytes
    assert peer.read(0, 0, 100 * PS) == data[:100 * PS]
    assert peer.read(0, 120 * PS, 2 * MB - 120 * PS) == data[120 * PS:2 * MB]
    assert peer.read(1, 8 * PS, MB - 8 * PS) == data[2 * MB + 8 * PS:]
    # a removed page written and removed again reads back as zeros again
    peer.write(0, 100 * PS, b"x" * 10)
    peer.madvise_remove(0, 100 * PS, PS)
    assert peer.read(0, 100 * PS, PS) == bytes(PS)
    peer.close()
    assert h.wait() == 0
    s = h.stats()["serve"]
    assert s["removes"] == 3
    assert s["removed_pages"] == 20 + 8 + 1
    assert s["zero_pages"] == 20 + 8 + 1


def all_stopped(pid: int) -> bool:
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            data = f.read()
        states.append(data[data.rfind(b")") + 2:data.rfind(b")") + 3])
    return all(s in (b"T", b"t") for s in states)


def test_eagain_while_remove_unread_and_faults_pending(udir, start, peers):
    """Freeze the handler, queue a fault and then a REMOVE, thaw it: the fault's UFFDIO_COPY
    meets the unread REMOVE (EAGAIN), is deferred and retried after the events are drained."""
    sizes = [1 * MB, 1 * MB]
    mem, data = memfile(udir, sum(sizes))
    h = start(mem)
    peer = peers(sizes)
    peer.handshake(h.sock)
    assert peer.read(0, 0, 64 * PS) == data[:64 * PS]
    got: dict = {}
    os.kill(h.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: all_stopped(h.pid), 10, "the handler to stop")
        ft = threading.Thread(target=lambda: got.setdefault("fault", peer.read(1, 0, 16 * PS)), daemon=True)
        ft.start()
        wait_for(lambda: ft.native_id and thread_blocked_in_uffd(ft.native_id), 10, "the fault to be queued")
        rt = threading.Thread(target=lambda: got.setdefault("remove", peer.madvise_remove(0, 0, 32 * PS)),
                              daemon=True)
        rt.start()
        wait_for(lambda: rt.native_id and thread_blocked_in_uffd(rt.native_id), 10, "the REMOVE to be queued")
        assert ft.is_alive() and rt.is_alive()
    finally:
        os.kill(h.pid, signal.SIGCONT)
    ft.join(20)
    rt.join(20)
    assert not ft.is_alive() and not rt.is_alive()
    assert got["fault"] == data[MB:MB + 16 * PS]
    assert peer.read(0, 0, 32 * PS) == bytes(32 * PS)
    assert peer.read(0, 32 * PS, MB - 32 * PS) == data[32 * PS:MB]
    assert peer.read(1, 0, MB) == data[MB:]
    peer.close()
    assert h.wait() == 0
    s = h.stats()["serve"]
    assert s["eagain"] >= 1, s
    assert s["eagain_retries"] >= 1, s
    assert s["removes"] == 1 and s["zero_pages"] == 32


class MmapLockHog:
    """A thread of the guest process holding its mmap lock for writing, over and over (mprotect of a
    populated scratch mapping, as a VMM changing its mappings). A MADV_DONTNEED whose REMOVE has been
    read takes that lock again before it zaps, so it waits: the window between the handler reading a
    REMOVE and the kernel zapping the range opens wide. Faults and UFFDIO_COPY take the per-VMA lock
    of the guest memory (kernels >= 6.4 / 6.8) and go on meanwhile; older kernels just race less."""

    SIZE = 32 << 20

    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mmap.restype = ctypes.c_void_p
        self.libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_long]
        self.libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        prot_rw, private_anon_populate = 0x1 | 0x2, 0x02 | 0x20 | 0x8000
        self.addr = self.libc.mmap(None, self.SIZE, prot_rw, private_anon_populate, -1, 0)
        assert self.addr not in (None, ctypes.c_void_p(-1).value), "mmap of the lock hog's scratch memory failed"
        ctypes.memset(self.addr, 1, self.SIZE)  # private pages of our own: each mprotect walks them all
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        k = 0
        while not self.stop.is_set():
            self.libc.mprotect(self.addr, self.SIZE, 0x1 if k % 2 else 0x1 | 0x2)  # GIL released
            k += 1

    def close(self):
        self.stop.set()
        self.t.join(10)
        self.libc.munmap(self.addr, self.SIZE)


def _fault_then_remove_while_frozen(h, peer, page: int) -> bytes:
    """With the handler stopped, queue a fault on `page` and then a REMOVE of it; thaw the handler and
    wait for both. Returns what the faulting read got."""
    got: dict = {}
    os.kill(h.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: all_stopped(h.pid), 10, "the handler to stop")
        ft = threading.Thread(target=lambda: got.setdefault("fault", peer.read(0, page * PS, PS)), daemon=True)
        ft.start()
        wait_for(lambda: ft.native_id and thread_blocked_in_uffd(ft.native_id), 10, f"a fault on page {page}")
        rt = threading.Thread(target=lambda: peer.madvise_remove(0, page * PS, PS), daemon=True)
        rt.start()
        wait_for(lambda: rt.native_id and thread_blocked_in_uffd(rt.native_id), 10, f"a REMOVE of page {page}")
    finally:
        os.kill(h.pid, signal.SIGCONT)
    ft.join(20)
    rt.join(20)
    assert not ft.is_alive() and not rt.is_alive()
    return got["fault"]


def test_fault_deferred_by_a_remove_then_zapped_refaults_as_zeros(udir, start, peers):
    """Freeze the handler, queue a fault on a page and then a REMOVE of that page, thaw it: the fault
    meets the unread REMOVE (EAGAIN) and is retried right after the REMOVE is read, which may be before
    the kernel zaps the range (the lock hog makes that likely). Then the zap takes the zero page away
    again and the next read faults once more: it must read zeros (the discard returned, nothing wrote),
    not the memory file's bytes. Many rounds, so that both orders of retry and zap occur."""
    size = 4 * MB
    mem, data = memfile(udir, size, seed=3)
    h = start(mem)
    peer = peers([size])
    peer.handshake(h.sock)
    rounds, wrong = 100, []
    hog = MmapLockHog()
    try:
        for r in range(rounds):
            page = (3 + 9 * r) % (size // PS)  # a page never touched before
            got = _fault_then_remove_while_frozen(h, peer, page)
            assert got in (bytes(PS), data[page * PS:(page + 1) * PS])  # it raced the discard: either
            if peer.read(0, page * PS, PS) != bytes(PS):
                wrong.append(page)
    finally:
        hog.close()
    assert not wrong, f"{len(wrong)} of {rounds} discarded pages read the file's bytes again: {wrong[:5]}"
    assert peer.read(0, 0, PS) == data[:PS]  # the rest is still served from the file
    peer.close()
    assert h.wait() == 0
    s = h.stats()["serve"]
    assert s["removes"] == rounds and s["eagain"] >= rounds, s
    assert s["refaults"] > 0, s  # some retries really landed before the zap (and were zapped again)


def test_2m_pages_multi_region_threads_and_remove(udir, start, peers):
    sizes = [8 * MB, 4 * MB]
    need = sum(sizes) // PAGE_2M
    with hugepages(need) as free:
        if free < need:
            pytest.skip(f"cannot reserve {need} 2 MiB hugetlb pages (only {free} free)")
        mem, data = memfile(udir, sum(sizes))
        h = start(mem)
        peer = peers(sizes, PAGE_2M)
        peer.handshake(h.sock)
        peer.touch_pages(0, [3, 0, 2, 1], threads=4)
        peer.touch_pages(1, [1, 0], threads=2)
        for i, (size, off) in enumerate(zip(sizes, offsets(sizes), strict=True)):
            assert peer.read(i, 0, size) == data[off:off + size]
        peer.madvise_remove(0, PAGE_2M, PAGE_2M)
        assert peer.read(0, PAGE_2M, PAGE_2M) == bytes(PAGE_2M)
        assert peer.read(0, 0, PAGE_2M) == data[:PAGE_2M]
        assert peer.read(0, 2 * PAGE_2M, 2 * PAGE_2M) == data[2 * PAGE_2M:8 * MB]
        peer.close()
        assert h.wait() == 0
        st = h.stats()
        assert st["page_size"] == PAGE_2M
        assert st["serve"]["fault_pages"] == need
        assert st["serve"]["zero_pages"] == 1 and st["serve"]["removes"] == 1


def test_2m_prefetch_fill(udir, start, peers):
    sizes = [6 * MB, 2 * MB]
    need = sum(sizes) // PAGE_2M
    with hugepages(need) as free:
        if free < need:
            pytest.skip(f"cannot reserve {need} 2 MiB hugetlb pages (only {free} free)")
        mem, data = memfile(udir, sum(sizes))
        h = start(mem, prefetch=True)  # no access log: sequential fill
        peer = peers(sizes, PAGE_2M)
        peer.handshake(h.sock)
        for i, (size, off) in enumerate(zip(sizes, offsets(sizes), strict=True)):
            assert peer.read(i, 0, size) == data[off:off + size]
        peer.close()
        assert h.wait() == 0
        s = h.stats()
        assert s["mode"] == "fill"
        assert s["serve"]["fault_pages"] + s["serve"]["prefetch_pages"] == need


def test_fill_without_log_while_threads_fault(udir, start, peers):
    sizes = [16 * MB, 4 * MB]
    mem, data = memfile(udir, sum(sizes))
    h = start(mem, prefetch=True)
    peer = peers(sizes)
    peer.handshake(h.sock)
    rnd = random.Random(9)
    peer.touch_pages(0, rnd.sample(range(16 * MB // PS), 500), threads=4)
    for i, (size, off) in enumerate(zip(sizes, offsets(sizes), strict=True)):
        assert peer.read(i, 0, size) == data[off:off + size]
    peer.close()
    assert h.wait() == 0
    s = h.stats()
    assert s["mode"] == "fill"
    total = sum(sizes) // PS
    assert s["serve"]["fault_pages"] + s["serve"]["prefetch_pages"] == total
    assert s["serve"]["prefetch_pages"] > 0


def _remove_ahead_of_the_fill(peer, removed: bytearray, bad: list, round_: int, seed: int) -> None:
    npages = len(removed)
    rnd = random.Random(seed)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and not bad:
        # just ahead of the fill's frontier (the first page not in yet): where the copies are
        frontier = peer.resident(0).find(b"\0")
        if frontier < 0:
            return  # the fill is through
        first, n = min(npages - 16, frontier + rnd.randint(0, 96)), rnd.randint(1, 8)
        peer.madvise_remove(0, first * PS, n * PS)
        removed[first:first + n] = b"\1" * n
        time.sleep(0.0003)  # a guest reads a discarded page later, if ever (a balloon's: never)
        if peer.read(0, first * PS, n * PS) != bytes(n * PS):
            bad.append(f"round {round_}: pages {first}+{n} read non-zero after MADV_DONTNEED")


@pytest.mark.parametrize("copy_threads", [1, 2])
def test_removes_racing_the_prefetch_read_zeros(udir, start, peers, copy_threads):
    """Guest threads MADV_DONTNEED ranges just ahead of the handler's prefetch while it runs (with the
    second copy thread: a page it checked, then copied after the REMOVE was read and the range
    zapped, would show the file's bytes where the guest must read zeros)."""
    size = 128 * MB
    npages = size // PS
    mem, data = memfile(udir, size, seed=5)
    raced = 0
    log = udir / "mem.access"  # a replayed log (the copier helps only with those) covering every page
    policy.write_log(log, array.array("I", range(npages)), PS, size)
    for round_ in range(3):
        h = start(mem, prefetch=True, access_log=log, extra=["--copy-threads", str(copy_threads), "--no-refresh"])
        peer = peers([size])
        peer.handshake(h.sock)
        removed = bytearray(npages)
        bad: list[str] = []
        ts = [threading.Thread(target=_remove_ahead_of_the_fill, args=(peer, removed, bad, round_, 10 * round_ + k),
                               daemon=True) for k in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not bad, bad[:3]
        got = peer.read(0, 0, size)
        for p in range(npages):
            want = bytes(PS) if removed[p] else data[p * PS:(p + 1) * PS]
            if got[p * PS:(p + 1) * PS] != want:
                raise AssertionError(f"page {p} ({'removed' if removed[p] else 'kept'}) has the wrong bytes")
        peer.close()
        assert h.wait() == 0
        st = h.stats()
        s = st["serve"]
        assert st["mode"] == "replay", st
        raced += s["removes"]
        if copy_threads == 2:
            assert s["copier_pages"] > 0, s
    assert raced > 50  # the removes really raced the prefetch


class CpuBurners:
    """Busy loops in other processes (the handler and its copier then get preempted at odd moments, as
    under a loaded CI machine). Ended by their own Popen objects."""

    def __init__(self, n: int):
        self.ps = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]

    def stop(self):
        for p in self.ps:
            p.kill()
            p.wait()


def _discard_and_reread(peer, window: int, first_page: int, seconds: float, bad: list, rnd: random.Random,
                        reads: list) -> int:
    """One remover MADV_DONTNEEDs parts of [first_page, +window) again and again while two readers keep
    faulting them in. Nothing writes there, so once the first discard (of all of it) has returned, every
    later read is zeros: a page served (zero-filled) after a REMOVE was read but before the kernel zapped
    the range is zapped again, and the fault that follows must not bring the file's bytes back.
    Returns the discards made; reads[0] counts the reads."""
    lo, hi = first_page * PS, (first_page + window) * PS
    discarded = threading.Event()
    stop = threading.Event()

    def reader():
        while not stop.is_set() and not bad:
            after = discarded.is_set()  # taken before the read: this read began after a discard returned
            got = peer.read(0, lo, hi - lo)
            reads[0] += 1
            if after and got != bytes(hi - lo):
                k = next(i for i in range(0, hi - lo, PS) if got[i:i + PS] != bytes(PS)) // PS
                bad.append(f"page {first_page + k} read non-zero after MADV_DONTNEED returned")

    ts = [threading.Thread(target=reader, daemon=True) for _ in range(2)]
    for t in ts:
        t.start()
    peer.madvise_remove(0, lo, hi - lo)
    discarded.set()
    n = 1
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not bad:
        a = rnd.randrange(window)
        b = rnd.randrange(a, window) + 1
        peer.madvise_remove(0, lo + a * PS, (b - a) * PS)
        n += 1
        if n % 4 == 0:
            time.sleep(0)  # let the readers at the GIL: their reads (no GIL) race the next discards
    stop.set()
    for t in ts:
        t.join(30)
    assert not any(t.is_alive() for t in ts), "a reader is stuck in a fault"
    return n


@pytest.mark.parametrize("copy_threads", [1, 2])
@pytest.mark.parametrize("mode", ["on_demand", "replay"])
def test_faults_between_remove_and_zap_stay_zero_under_load(udir, start, peers, copy_threads, mode):
    """The kernel zaps a MADV_DONTNEED range only after the handler has read its REMOVE. A fault served in
    between (a deferred one retried right after the REMOVE, or a new touch) installs a page that the zap
    then takes away again; the next fault on it must be served as zeros, never from the memory file
    (it once was: the page's state said "present", so the refault got the file's bytes). Raced many
    times, beside CPU burners, with and without the prefetch and its second copy thread."""
    size = 128 * MB if mode == "replay" else 32 * MB  # a plan that lasts, so the copier gets a core under load
    npages = size // PS
    mem, data = memfile(udir, size, seed=7)
    extra = ["--copy-threads", str(copy_threads)]
    log = None
    if mode == "replay":
        log = udir / "mem.access"  # the copier helps replayed plans: one covering every page
        policy.write_log(log, array.array("I", range(npages)), PS, size)
        extra += ["--no-refresh"]
    burners = CpuBurners(2)
    hog = MmapLockHog()
    try:
        rnd = random.Random(copy_threads * 31 + len(mode))
        bad: list[str] = []
        discards = 0
        reads = [0]
        h = start(mem, prefetch=mode == "replay", access_log=log, extra=extra)
        peer = peers([size])
        peer.handshake(h.sock)
        windows = rnd.sample(range(0, npages // 8), 200)  # 8-page windows, spread over the region
        done: set[int] = set()
        deadline = time.monotonic() + 90  # enough racing, however loaded the machine: it just takes longer
        for w in windows:
            if bad or time.monotonic() > deadline or (discards > 2000 and reads[0] > 2000 and len(done) >= 240):
                break
            discards += _discard_and_reread(peer, 8, w * 8, 0.08, bad, rnd, reads)
            done.update(range(w * 8, w * 8 + 8))
        assert not bad, bad[:3]
        got = peer.read(0, 0, size)
        for p in range(npages):
            want = bytes(PS) if p in done else data[p * PS:(p + 1) * PS]
            if got[p * PS:(p + 1) * PS] != want:
                raise AssertionError(f"page {p} ({'discarded' if p in done else 'kept'}) has the wrong bytes")
        peer.close()
        assert h.wait() == 0
        st = h.stats()
        assert st["mode"] == mode, st
        s = st["serve"]
        assert s["removes"] >= discards > 1000, (discards, s)
        assert reads[0] > 500, (reads, s)  # the readers really raced the discards
        assert s["refaults"] > 0, s  # pages served between a REMOVE and its zap were faulted again
        if copy_threads == 2 and mode == "replay":
            assert s["copier_pages"] > 0, s
    finally:
        hog.close()
        burners.stop()


@pytest.mark.parametrize("copy_threads", [1, 2])
def test_unmapped_then_remapped_ranges_read_zeros_during_the_prefetch(udir, start, copy_threads):
    """A VMM that negotiated UNMAP events munmaps ranges just ahead of the prefetch, maps fresh memory
    there and registers it again. The handler must mark them (no copy into the hole, which would be
    ENOENT: fatal, nor into the new mapping, which would show stale file bytes) and serve them as zeros
    (fresh anonymous memory), the rest from the file."""
    size = 128 * MB
    npages = size // PS
    mem, data = memfile(udir, size, seed=9)
    log = udir / "mem.access"
    policy.write_log(log, array.array("I", range(npages)), PS, size)
    h = start(mem, prefetch=True, access_log=log, extra=["--copy-threads", str(copy_threads), "--no-refresh"])
    peer = UffdPeer([size], features=UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP)
    try:
        if not peer.features & UFFD_FEATURE_EVENT_UNMAP:
            pytest.fail(f"the kernel did not grant UFFD_FEATURE_EVENT_UNMAP (features {peer.features:#x})")
        peer.handshake(h.sock)
        rnd = random.Random(copy_threads)
        fresh = bytearray(npages)
        unmaps = frontier = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            res = peer.resident(0)  # the prefetch's frontier: the first page neither in nor remapped
            while frontier < npages and (res[frontier] or fresh[frontier]):
                frontier += 1
            if frontier >= npages - 8:
                break
            first, n = min(npages - 8, frontier + rnd.randint(0, 64)), rnd.randint(1, 8)
            # munmap waits until the handler reads its UNMAP: a dead handler would hang it for good
            t = threading.Thread(target=peer.unmap_and_remap, args=(0, first * PS, n * PS), daemon=True)
            t.start()
            t.join(20)
            assert not t.is_alive(), f"munmap still waits for the handler to read its UNMAP; log:\n{h.log()}"
            fresh[first:first + n] = b"\1" * n
            unmaps += 1
        got = peer.read(0, 0, size)
        for p in range(npages):
            want = bytes(PS) if fresh[p] else data[p * PS:(p + 1) * PS]
            if got[p * PS:(p + 1) * PS] != want:
                raise AssertionError(f"page {p} ({'remapped' if fresh[p] else 'kept'}) has the wrong bytes")
    finally:
        peer.close()
    assert h.wait() == 0, h.log()
    st = h.stats()
    s = st["serve"]
    assert st["mode"] == "replay" and st["copy_threads"] == copy_threads, st
    assert s["unmaps"] == unmaps > 3, (unmaps, s)


def working_set(npages: int, runs: int, run_len: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    starts = rnd.sample(range(0, npages - run_len, run_len), runs)
    order = []
    for s in starts:  # runs in random order, pages within a run ascending (a guest walking a buffer)
        order.extend(range(s, s + run_len))
    return order


def test_record_then_prefetch_replay(udir, start, peers):
    sizes = [48 * MB, 16 * MB]
    mem, data = memfile(udir, sum(sizes))
    log = udir / "mem.access"
    ws = working_set(sizes[0] // PS, runs=120, run_len=24, seed=11)
    settle = ["--settle-interval", "0.05", "--settle-intervals", "5", "--settle-faults", "8"]

    # 1st restore: on demand, recording first touches until the fault rate settles
    h1 = start(mem, prefetch=True, access_log=log, extra=settle)
    p1 = peers(sizes)
    p1.handshake(h1.sock)
    p1.touch_pages(0, ws, threads=1)
    wait_for(log.exists, 20, "the access log (recording settles once faults stop)")
    assert list(policy.read_log(log, PS, sum(sizes))) == ws  # exactly the first-touch order
    for i, (size, off) in enumerate(zip(sizes, offsets(sizes), strict=True)):  # the background fill kept bytes right
        assert p1.read(i, 0, size) == data[off:off + size]
    p1.close()
    assert h1.wait() == 0
    s1 = h1.stats()
    assert s1["mode"] == "record" and s1["log_reason"] == "settled" and s1["log_pages"] == len(ws)
    assert s1["serve"]["recorded"] == len(ws)
    assert s1["serve"]["fault_pages"] + s1["serve"]["prefetch_pages"] == sum(sizes) // PS

    # 2nd restore: the recorded working set arrives ahead of the guest
    h2 = start(mem, prefetch=True, access_log=log)
    p2 = peers(sizes)
    p2.handshake(h2.sock)
    p2.touch_pages(0, ws, threads=2)
    for k in range(0, len(ws), 24):
        first = ws[k]
        assert p2.read(0, first * PS, 24 * PS) == data[first * PS:(first + 24) * PS]
    p2.close()
    assert h2.wait() == 0
    s2 = h2.stats()
    assert s2["mode"] == "replay" and s2["plan_pages"] == len(ws)
    assert s2["copy_threads"] == (2 if len(os.sched_getaffinity(0)) > 1 else 1)  # the copier by default
    faults, pref = s2["serve"]["fault_pages"], s2["serve"]["prefetch_pages"]
    assert faults + pref == len(ws)
    assert faults < len(ws) // 4, f"{faults} of {len(ws)} working-set pages still faulted"
    assert s2["serve"]["prefetch_batches"] < len(ws) // 4  # many pages per UFFDIO_COPY
    assert s2["serve"]["recorded"] == 0 and "log_written" not in s2


def test_prefetch_switch_off_keeps_uffd_and_records_nothing(udir, start, peers, monkeypatch):
    monkeypatch.setenv("BANGER_UFFD_PREFETCH", "0")
    sizes = [4 * MB]
    mem, data = memfile(udir, sum(sizes))
    log = udir / "mem.access"
    h = start(mem, prefetch=None, access_log=log,
              extra=["--settle-interval", "0.02", "--settle-intervals", "2"])
    peer = peers(sizes)
    peer.handshake(h.sock)
    peer.touch_pages(0, range(0, 1024, 3), threads=2)
    assert peer.read(0, 0, 4 * MB) == data
    peer.close()
    assert h.wait() == 0
    s = h.stats()
    assert s["mode"] == "on_demand" and s["prefetch"] is False
    assert s["serve"]["prefetch_pages"] == 0 and s["serve"]["recorded"] == 0
    assert not log.exists()


def test_stale_or_foreign_log_is_ignored_and_rerecorded(udir, start, peers):
    sizes = [4 * MB]
    mem, data = memfile(udir, sum(sizes))
    log = udir / "mem.access"
    policy.write_log(log, __import__("array").array("I", [1, 2, 3]), PS, 8 * MB)  # another file's size
    h = start(mem, prefetch=True, access_log=log, extra=["--no-fill"])
    peer = peers(sizes)
    peer.handshake(h.sock)
    peer.touch_pages(0, [7, 5, 9], threads=1)
    peer.close()
    assert h.wait() == 0
    s = h.stats()
    assert s["mode"] == "record" and "recorded for" in s["log_ignored"]
    assert s["log_reason"] == "vmm_exit"
    assert list(policy.read_log(log, PS, 4 * MB)) == [7, 5, 9]


# ---------------------------------------------------------------------------- lifecycle


def test_exits_when_peer_process_dies(udir, start, peer_procs):
    sizes = [1 * MB]
    mem, _ = memfile(udir, sum(sizes))
    h = start(mem)
    pp = peer_procs(h.sock, sizes, then="touch_all", mem_file=mem)
    pp.expect("HANDSHAKE")
    pp.expect("TOUCHED")
    pp.kill()
    assert h.wait() == 0
    st = h.stats()
    assert st["exit_reason"] in ("peer_closed", "peer_exited")
    assert st["serve"]["fault_pages"] == MB // PS


def test_connect_timeout(udir, start):
    mem, _ = memfile(udir, MB)
    h = start(mem, connect_timeout=0.5)
    t = time.monotonic()
    assert h.wait(15) == 7  # EXIT_TIMEOUT
    assert time.monotonic() - t < 10
    st = h.stats()
    assert st["error"]["code"] == "uffd_connect_timeout"
    assert "never connected" in st["error"]["message"] and st["error"]["hint"]
    assert not h.sock.exists()


BAD = ["invalid_json", "not_array", "no_fd", "two_fds", "not_uffd", "unknown_page_size", "page_sizes_disagree",
       "overlap", "past_eof", "unaligned", "negative"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_handshake_in_process_peer_sees_eof(udir, start, peers, kind):
    sizes = [1 * MB, 1 * MB]
    mem, _ = memfile(udir, sum(sizes))
    h = start(mem)
    peer = peers(sizes)
    peer.bad_handshake(h.sock, kind)
    assert peer.wait_eof(10), "the handler left the peer hanging"
    assert h.wait() != 0
    st = h.stats()
    assert st["error"]["code"] == "uffd_handshake", st["error"]
    assert st["error"]["hint"]
    assert "peer_killed" not in st  # this peer is the handler's own parent: never a VMM to kill
    assert not h.sock.exists()


@pytest.mark.parametrize("kind, killed", [("invalid_json", True), ("unknown_page_size", True), ("overlap", True),
                                          ("past_eof", True), ("two_fds", True), ("no_fd", False)])
def test_bad_handshake_from_a_vmm_kills_it(udir, start, peer_procs, kind, killed):
    """A VMM that handed over its uffd with a bad handshake would freeze its guest: it is killed.
    A peer that sent no uffd has nothing to freeze and just sees the connection close."""
    sizes = [1 * MB, 1 * MB]
    mem, _ = memfile(udir, sum(sizes))
    h = start(mem)
    pp = peer_procs(h.sock, sizes, bad=kind)
    assert h.wait() == 8  # ExternalError
    st = h.stats()
    assert st["error"]["code"] == "uffd_handshake"
    if killed:
        assert pp.wait() == -signal.SIGKILL
        assert st["peer_killed"] is True
    else:
        assert pp.wait() == 0
        assert pp.rest()[-1] == "EOF"  # the handler hung up on it


def test_stranger_is_refused_not_killed(udir, start, peer_procs):
    sizes = [1 * MB]
    mem, _ = memfile(udir, sum(sizes))
    h = start(mem, vmm_pid=os.getpid())  # not the peer's pid
    pp = peer_procs(h.sock, sizes)
    assert pp.wait() == 0
    assert pp.rest()[-1] == "EOF"
    assert h.wait() == 8
    assert "expected the VMM pid" in h.stats()["error"]["message"]


def test_handler_failure_after_handshake_kills_the_vmm(udir, start, peer_procs):
    """The memory file shrinks under the handler: UFFDIO_COPY fails, the handler takes the VMM down."""
    sizes = [1 * MB]
    mem, data = memfile(udir, sum(sizes))
    h = start(mem)
    pp = peer_procs(h.sock, sizes, then="stdin")
    pp.expect("HANDSHAKE")
    import hashlib

    pp.send(f"read 0 0 {PS}")
    assert pp.expect("DATA").split()[1] == hashlib.sha256(data[:PS]).hexdigest()
    os.truncate(mem, 0)
    pp.send(f"read 0 {8 * PS} {PS}")
    assert pp.wait() == -signal.SIGKILL
    assert h.wait() == 8
    st = h.stats()
    assert st["error"]["code"] == "uffd_failed" and "UFFDIO_COPY" in st["error"]["message"]
    assert st["peer_killed"] is True


@pytest.mark.parametrize("prefetch, log", [(True, False), (True, True)])
def test_unregistered_regions_are_a_fatal_handshake_error(udir, start, peer_procs, prefetch, log):
    """A VMM that announces regions it never registered: the first copy there fails (ENOENT). That
    is not "the VMM went away": its guest would read zeros. The handler kills it, exits non-zero and
    says why (in its stats and its log)."""
    sizes = [1 * MB, 1 * MB]
    mem, _ = memfile(udir, sum(sizes))
    access_log = None
    if log:  # a replayed log: the plan's first copy hits the unregistered memory
        access_log = udir / "mem.access"
        policy.write_log(access_log, array.array("I", [3, 4, 5, 300]), PS, sum(sizes))
    h = start(mem, prefetch=prefetch, access_log=access_log)
    pp = peer_procs(h.sock, sizes, extra=["--no-register"])
    pp.expect("HANDSHAKE")
    assert pp.wait() == -signal.SIGKILL, "the handler left a VMM running whose memory it cannot serve"
    assert h.wait() == 8  # ExternalError, not 0 ("VMM went away")
    st = h.stats()
    assert st["error"]["code"] == "uffd_handshake", st["error"]
    assert "not registered" in st["error"]["message"] and st["error"]["hint"]
    assert st["peer_killed"] is True
    assert "not registered" in h.log() and "killed the VMM" in h.log()


def test_terminated_handler_takes_the_vmm_down(udir, start, peer_procs):
    sizes = [1 * MB]
    mem, _ = memfile(udir, sum(sizes))
    h = start(mem)
    pp = peer_procs(h.sock, sizes, then="touch_first", mem_file=mem)
    pp.expect("HANDSHAKE")
    pp.expect("TOUCHED")
    os.kill(h.pid, signal.SIGTERM)
    assert pp.wait() == -signal.SIGKILL
    assert h.wait() == 8
    st = h.stats()
    assert st["error"]["code"] == "uffd_failed" and "SIGTERM" in st["error"]["message"]


def test_spawn_handler_refuses_missing_file_and_non_socket(udir):
    from banger.errors import Conflict, NotFound

    with pytest.raises(NotFound):
        spawn_handler(udir / "s.sock", udir / "nope")
    mem, _ = memfile(udir, MB)
    (udir / "plain").write_text("x")
    with pytest.raises(Conflict):
        spawn_handler(udir / "plain", mem)


def test_spawn_handler_replaces_a_stale_socket(udir, start, peers):
    import socket as socketlib

    mem, data = memfile(udir, MB)
    stale = udir / "h1.sock"
    s = socketlib.socket(socketlib.AF_UNIX)
    s.bind(str(stale))
    s.close()  # bound, never listening: a leftover
    h = start(mem)
    peer = peers([MB])
    peer.handshake(h.sock)
    assert peer.read(0, 0, MB) == data
    peer.close()
    assert h.wait() == 0


# ---------------------------------------------------------------------------- sparse files, log refresh


def sparse_memfile(udir: Path, npages: int, data_pages: set[int]) -> tuple[Path, bytes]:
    """A memory file with file data only in ``data_pages`` (the rest are holes, as in a Diff snapshot)."""
    full = make_mem_file(udir / "dense", npages * PS)
    (udir / "dense").unlink()
    path = udir / "mem"
    expect = bytearray(npages * PS)
    with open(path, "wb") as f:
        f.truncate(npages * PS)
        for p in sorted(data_pages):
            f.seek(p * PS)
            f.write(full[p * PS:(p + 1) * PS])
            expect[p * PS:(p + 1) * PS] = full[p * PS:(p + 1) * PS]
    return path, bytes(expect)


def hole_pages_of(path: Path, npages: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        n, pos = 0, 0
        while True:
            try:
                h = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError:
                break
            if h >= npages * PS:
                break
            try:
                d = os.lseek(fd, h, os.SEEK_DATA)
            except OSError:
                d = npages * PS
            n += (d - h) // PS
            pos = d
            if d >= npages * PS:
                break
        return n
    finally:
        os.close(fd)


@pytest.mark.parametrize("prefetch", [False, True], ids=["on_demand", "fill"])
def test_sparse_memory_file_holes_are_zero_pages(udir, start, peers, prefetch):
    npages = 1024
    rnd = random.Random(3)
    data_pages = {p for p in range(npages) if rnd.random() < 0.3} | set(range(100, 164))
    mem, expect = sparse_memfile(udir, npages, data_pages)
    holes = hole_pages_of(mem, npages)
    if holes == 0:
        pytest.skip("this filesystem does not report holes (SEEK_HOLE)")
    h = start(mem, prefetch=prefetch)
    peer = peers([npages * PS])
    peer.handshake(h.sock)
    pages = list(range(npages))
    rnd.shuffle(pages)
    peer.touch_pages(0, pages, threads=3)
    assert peer.read(0, 0, npages * PS) == expect
    # a zero page is copy-on-write: writing to one keeps its neighbours (and the zero page) intact
    hole = next(p for p in range(npages) if p not in data_pages and expect[p * PS:(p + 1) * PS] == bytes(PS))
    peer.write(0, hole * PS + 5, b"written")
    assert peer.read(0, hole * PS, PS) == bytes(5) + b"written" + bytes(PS - 12)
    other = next(p for p in range(hole + 1, npages) if p not in data_pages)
    assert peer.read(0, other * PS, PS) == bytes(PS)
    peer.close()
    assert h.wait() == 0
    s = h.stats()["serve"]
    assert s["hole_pages"] == holes  # every hole page went in as a zero page, nothing else did
    assert s["fault_pages"] + s["prefetch_pages"] == npages


def test_replay_merges_many_new_pages_into_the_log(udir, start, peers):
    sizes = [16 * MB]
    mem, data = memfile(udir, sum(sizes))
    log = udir / "mem.access"
    ws1 = working_set(sizes[0] // PS, runs=40, run_len=16, seed=2)
    policy.write_log(log, __import__("array").array("I", ws1), PS, sum(sizes))
    fresh = [p for p in working_set(sizes[0] // PS, runs=40, run_len=16, seed=9) if p not in set(ws1)]
    assert len(fresh) >= 64

    # a replay that touches a few pages outside the log leaves the log alone
    h = start(mem, prefetch=True, access_log=log)
    peer = peers(sizes)
    peer.handshake(h.sock)
    peer.touch_pages(0, ws1 + fresh[:10], threads=2)
    peer.close()
    assert h.wait() == 0
    s = h.stats()
    assert s["mode"] == "replay" and s["serve"]["recorded"] == 10 and "log_refreshed" not in s
    assert list(policy.read_log(log, PS, sum(sizes))) == ws1

    # one that touches many: they are appended in first-touch order; planned pages are not recorded again
    h = start(mem, prefetch=True, access_log=log)
    peer = peers(sizes)
    peer.handshake(h.sock)
    peer.touch_pages(0, ws1, threads=2)
    peer.touch_pages(0, fresh, threads=1)
    for k in range(0, len(fresh), 16):
        p = fresh[k]
        assert peer.read(0, p * PS, PS) == data[p * PS:(p + 1) * PS]
    peer.close()
    assert h.wait() == 0
    s = h.stats()
    assert s["log_refreshed"] is True and s["log_pages_after"] == len(ws1) + len(fresh)
    assert s["serve"]["recorded"] == len(fresh)
    assert list(policy.read_log(log, PS, sum(sizes))) == ws1 + fresh
