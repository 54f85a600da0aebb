"""How fast does a restored guest's working set become resident?

For a memory file (default 1 GiB) and a scattered working set (default 256 MiB
in runs of 1-64 pages, touched in a random run order by --threads "vCPU"
threads), time from the UFFD handshake until every working-set page has been
touched, for:

  (a) ref       a one-page on-demand reference handler in C, written here the
                way Firecracker's example handler works: read one uffd_msg,
                align down, one-page UFFDIO_COPY from a MAP_POPULATE'd
                read-only MAP_PRIVATE mapping of the memory file;
  (b) banger    banger's handler, prefetch off (on demand);
  (c) prefetch  banger's handler replaying an access log recorded by an
                earlier (untimed) restore of the same working set;
  (d) file      the File backend: MAP_PRIVATE of the memory file, touch pages;
  (e) memcpy    an eager memcpy of the working-set runs into fresh anonymous
                memory from a populated mapping of the file: the lower bound;
  (f) fill      (info) banger's handler with no log: sequential background fill.

The guest side is tests/support/uffd_peer.py (real userfaultfd, real faults);
touching and the reference handler are C compiled here with gcc and called
through ctypes (GIL released). The page cache holds the memory file throughout.

Targets: (c) at least 5x faster than (a), and within 1.5x of (e).

    python bench/uffd.py [--size-mib 1024] [--ws-mib 256] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import array
import ctypes
import json
import os
import random
import resource
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from banger.host.runner import run  # noqa: E402
from banger.uffd import spawn_handler  # noqa: E402
from bench.targets import target  # noqa: E402
from tests.support.uffd_peer import UffdPeer  # noqa: E402

PS = 4096

C_SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

/* Read one byte of each listed page of [base...]: a guest touching its working set. */
uint64_t touch(uint64_t base, const uint32_t *pages, uint64_t n, uint64_t ps)
{
    uint64_t sum = 0;
    for (uint64_t i = 0; i < n; i++)
        sum += *(volatile const uint8_t *)(uintptr_t)(base + (uint64_t)pages[i] * ps);
    return sum;
}

/* Copy runs (first page, count) from src to dst: the eager lower bound. */
void copy_runs(uint64_t dst, uint64_t src, const uint64_t *runs, uint64_t nruns, uint64_t ps)
{
    for (uint64_t i = 0; i < nruns; i++)
        memcpy((void *)(uintptr_t)(dst + runs[2 * i] * ps), (const void *)(uintptr_t)(src + runs[2 * i] * ps),
               runs[2 * i + 1] * ps);
}

/* The reference on-demand handler loop (like Firecracker's example): one message per read,
 * align down, one-page UFFDIO_COPY. Returns the number of faults served, or -errno. */
int64_t ref_serve(int uffd, int conn, uint64_t map, int nreg, const uint64_t *base, const uint64_t *size,
                  const uint64_t *off, uint64_t ps)
{
    int64_t faults = 0;
    struct pollfd p[2] = {{.fd = uffd, .events = POLLIN}, {.fd = conn, .events = POLLIN | POLLRDHUP}};
    for (;;) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (p[1].revents)
            return faults;
        for (;;) {
            struct uffd_msg m;
            if (read(uffd, &m, sizeof m) != sizeof m) {
                if (errno == EAGAIN)
                    break;
                return -errno;
            }
            if (m.event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t a = m.arg.pagefault.address & ~(ps - 1);
            for (int i = 0; i < nreg; i++) {
                if (a >= base[i] && a < base[i] + size[i]) {
                    struct uffdio_copy c = {.dst = a, .src = map + off[i] + (a - base[i]), .len = ps, .mode = 0};
                    if (ioctl(uffd, UFFDIO_COPY, &c) < 0 && errno != EEXIST && errno != EAGAIN)
                        return -errno;
                    faults++;
                    break;
                }
            }
        }
    }
}
"""


def build_helper(workdir: Path) -> ctypes.CDLL:
    src = workdir / "bench_uffd.c"
    so = workdir / "bench_uffd.so"
    src.write_text(C_SOURCE)
    run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(so), str(src)])
    lib = ctypes.CDLL(str(so))
    lib.touch.restype = ctypes.c_uint64
    lib.touch.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64]
    lib.copy_runs.restype = None
    lib.copy_runs.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64]
    lib.ref_serve.restype = ctypes.c_int64
    lib.ref_serve.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
    return lib


# -- the reference handler process ------------------------------------------------
def ref_handler_main(sock_path: str, mem_file: str, stats_path: str, so_path: str) -> int:
    import mmap

    lib = ctypes.CDLL(so_path)
    lib.ref_serve.restype = ctypes.c_int64
    lib.ref_serve.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
    fd = os.open(mem_file, os.O_RDONLY)
    size = os.fstat(fd).st_size
    m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0x8000), prot=mmap.PROT_READ)
    addr = _mmap_address(m)
    tmp = sock_path + ".tmp"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(tmp)
    s.listen(1)
    os.rename(tmp, sock_path)
    conn, _ = s.accept()
    os.unlink(sock_path)
    msg, anc, _, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(4))
    uffd = struct.unpack("i", anc[0][2][:4])[0]
    regions = json.loads(msg)
    n = len(regions)
    bases = (ctypes.c_uint64 * n)(*[r["base_host_virt_addr"] for r in regions])
    sizes = (ctypes.c_uint64 * n)(*[r["size"] for r in regions])
    offs = (ctypes.c_uint64 * n)(*[r["offset"] for r in regions])
    ps = regions[0].get("page_size") or regions[0].get("page_size_kib") or PS
    faults = lib.ref_serve(uffd, conn.fileno(), addr, n, bases, sizes, offs, ps)
    Path(stats_path).write_text(json.dumps({"faults": faults}))
    return 0


def _mmap_address(m) -> int:
    """The address of a (read-only) mmap object, via the buffer protocol."""
    class Py_buffer(ctypes.Structure):
        _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                    ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                    ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                    ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]

    view = Py_buffer()
    ctypes.pythonapi.PyObject_GetBuffer.argtypes = [ctypes.py_object, ctypes.POINTER(Py_buffer), ctypes.c_int]
    ctypes.pythonapi.PyBuffer_Release.argtypes = [ctypes.POINTER(Py_buffer)]
    if ctypes.pythonapi.PyObject_GetBuffer(m, ctypes.byref(view), 0) != 0:
        raise OSError("cannot get the mmap's address")
    addr = view.buf
    ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))
    return addr


# -- the workload --------------------------------------------------------------------
def make_memory_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    chunk = 64 << 20
    with open(path, "wb") as f:
        for _ in range(0, size, chunk):
            f.write(os.urandom(min(chunk, size)))
        f.truncate(size)


def warm_page_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


def make_working_set(npages: int, ws_pages: int, seed: int) -> list[tuple[int, int]]:
    """Non-overlapping runs of 1-64 pages scattered over the file, in a random touch order."""
    rnd = random.Random(seed)
    taken = bytearray(npages)
    runs: list[tuple[int, int]] = []
    total = 0
    while total < ws_pages:
        length = min(ws_pages - total, rnd.choice((1, 2, 4, 8, 16, 32, 64)))
        start = rnd.randrange(0, npages - length)
        if any(taken[start:start + length]):
            continue
        taken[start:start + length] = b"\1" * length
        runs.append((start, length))
        total += length
    rnd.shuffle(runs)
    return runs


class Guest:
    """The vCPUs: each thread touches its share of the runs, in order, one byte per page."""

    def __init__(self, lib, runs, threads: int):
        self.lib = lib
        self.shares = []
        for k in range(threads):
            pages = array.array("I")
            for start, length in runs[k::threads]:
                pages.extend(range(start, start + length))
            self.shares.append(pages)
        self.pages = sum(len(s) for s in self.shares)

    def touch(self, base: int) -> None:
        def work(pages):
            addr, _ = pages.buffer_info()
            self.lib.touch(base, addr, len(pages), PS)

        ts = [threading.Thread(target=work, args=(p,)) for p in self.shares]
        for t in ts:
            t.start()
        for t in ts:
            t.join()


def wait_exit(pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, 9)
    raise RuntimeError(f"handler {pid} did not exit")


def wait_path(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout}s")
        time.sleep(0.002)


def uffd_restore(guest: Guest, mem: Path, size: int, sock: Path, spawn, stats: Path) -> dict:
    """Spawn a handler (spawn() returns its pid once listening), restore, touch, return timings."""
    pid = spawn()
    peer = UffdPeer([size])
    try:
        t0 = time.perf_counter()
        peer.handshake(sock)
        guest.touch(peer.bases[0])
        dt = time.perf_counter() - t0
    finally:
        peer.close()
    rc = wait_exit(pid)
    if rc != 0:
        raise RuntimeError(f"handler exited {rc}")
    return {"seconds": dt, "stats": json.loads(stats.read_text())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--ws-mib", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="guest vCPU threads touching the working set")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", help="work directory (default: a temp dir under /tmp, removed afterwards)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--handler-arg", action="append", default=[], help="extra banger handler flag (repeatable)")
    ap.add_argument("--ref-handler", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.ref_handler:
        return ref_handler_main(*a.ref_handler)

    import mmap

    size = a.size_mib << 20
    workdir = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="bub-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        lib = build_helper(workdir)
        mem = workdir / "mem"
        make_memory_file(mem, size)
        warm_page_cache(mem)
        runs = make_working_set(size // PS, (a.ws_mib << 20) // PS, a.seed)
        guest = Guest(lib, runs, a.threads)
        sock = workdir / "h.sock"
        stats = workdir / "stats.json"
        log = workdir / "mem.access"
        results: dict[str, list[dict]] = {k: [] for k in ("ref", "banger", "prefetch", "file", "memcpy", "fill")}

        def spawn_ref():
            from banger.host.procs import spawn_detached

            pid, _ = spawn_detached([sys.executable, str(Path(__file__).resolve()), "--ref-handler", str(sock),
                                     str(mem), str(stats), str(workdir / "bench_uffd.so")])
            wait_path(sock)
            return pid

        def spawn_banger(**kw):
            def go():
                pid, _ = spawn_handler(sock, mem, stats_path=stats, log_path=workdir / "handler.log",
                                       extra_args=a.handler_arg, **kw)
                return pid
            return go

        # record the working set once (untimed), as the first restore of a snapshot would
        if log.exists():
            log.unlink()
        pid = spawn_banger(prefetch=True, access_log=log)()
        peer = UffdPeer([size])
        peer.handshake(sock)
        guest.touch(peer.bases[0])
        wait_path(log, 60)  # written once the fault rate settles
        peer.close()
        wait_exit(pid)
        rec = json.loads(stats.read_text())

        for _ in range(a.repeat):
            r = uffd_restore(guest, mem, size, sock, spawn_ref, stats)
            results["ref"].append({"seconds": r["seconds"], "faults": r["stats"]["faults"]})
            for name, kw in (("banger", {"prefetch": False}), ("prefetch", {"prefetch": True, "access_log": log}),
                             ("fill", {"prefetch": True})):
                r = uffd_restore(guest, mem, size, sock, spawn_banger(**kw), stats)
                s = r["stats"]["serve"]
                results[name].append({"seconds": r["seconds"], "faults": s["faults"],
                                      "prefetched": s["prefetch_pages"],
                                      "handler": {k: s[k] for k in ("prefetch_ms", "plan_done_ms", "hot_pages",
                                                                    "prefetch_batches", "service_mean_us",
                                                                    "first_fault_ms", "last_fault_ms")}
                                      | {k: s.get(k) for k in ("serve_cpu_ms", "copier_cpu_ms", "copier_pages",
                                                               "ev_wait_ms")}
                                      | {"serving_ms": r["stats"].get("serving_ms")}})
            # (d) File backend
            fd = os.open(mem, os.O_RDONLY)
            m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            guest.touch(_mmap_address(m))
            dt = time.perf_counter() - t0
            results["file"].append({"seconds": dt,
                                    "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0})
            m.close()
            os.close(fd)
            # (e) eager memcpy of the same runs into fresh anonymous memory
            fd = os.open(mem, os.O_RDONLY)
            src = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE | 0x8000, prot=mmap.PROT_READ)  # MAP_POPULATE
            dst = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)  # MAP_NORESERVE
            plan = array.array("Q")
            for start, length in runs:
                plan.extend((start, length))
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            lib.copy_runs(_mmap_address(dst), _mmap_address(src), plan.buffer_info()[0], len(runs), PS)
            dt = time.perf_counter() - t0
            results["memcpy"].append({"seconds": dt,
                                      "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0})
            dst.close()
            src.close()
            os.close(fd)

        med = {k: statistics.median(x["seconds"] for x in v) for k, v in results.items()}
        ws_pages = guest.pages
        report = {
            "size_mib": a.size_mib, "ws_mib": ws_pages * PS >> 20, "ws_pages": ws_pages, "runs": len(runs),
            "threads": a.threads, "repeat": a.repeat, "recorded_pages": rec.get("log_pages"),
            "variants": {
                k: {"median_ms": round(med[k] * 1000, 2),
                    "all_ms": [round(x["seconds"] * 1000, 2) for x in v],
                    "faults": int(statistics.median(x["faults"] for x in v)),
                    "prefetched": int(statistics.median(x.get("prefetched", 0) for x in v)),
                    "pages_per_s": round(ws_pages / med[k]),
                    "handler": [x["handler"] for x in v if "handler" in x],
                    "vs_ref": round(med["ref"] / med[k], 2),
                    "vs_memcpy": round(med[k] / med["memcpy"], 2)}
                for k, v in results.items()
            },
        }
        c_vs_a = med["ref"] / med["prefetch"]
        c_vs_e = med["prefetch"] / med["memcpy"]
        report["targets"] = [
            target("prefetch_speedup_vs_ref", c_vs_a, ">=", 5.0, "x"),
            target("prefetch_over_memcpy", c_vs_e, "<=", 1.5, "x"),
        ]
        if a.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"memory {a.size_mib} MiB, working set {report['ws_mib']} MiB ({ws_pages} pages in "
                  f"{len(runs)} runs), {a.threads} guest threads, median of {a.repeat}")
            print(f"{'variant':<10} {'ms':>9} {'faults':>8} {'prefetched':>10} {'pages/s':>11} {'vs ref':>7} "
                  f"{'/memcpy':>8}")
            labels = {"ref": "(a) ref", "banger": "(b) banger", "prefetch": "(c) prefetch", "file": "(d) file",
                      "memcpy": "(e) memcpy", "fill": "(f) fill"}
            for k in ("ref", "banger", "prefetch", "file", "memcpy", "fill"):
                v = report["variants"][k]
                print(f"{labels[k]:<12} {v['median_ms']:>7} {v['faults']:>8} {v['prefetched']:>10} "
                      f"{v['pages_per_s']:>11} {v['vs_ref']:>6}x {v['vs_memcpy']:>7}x")
            for t in report["targets"]:
                print(f"target {t['name']} {t['op']} {t['limit']}{t['unit']}: {t['value']}{t['unit']} "
                      f"{'MET' if t['met'] else 'MISSED'}")
        return 0
    finally:
        if not a.dir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
