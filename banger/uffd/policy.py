"""Prefetch and recording policy: the access log, prefetch plans, and when a recording has settled.

Access log (beside the snapshot, written atomically): a 32-byte header
``<8s I I Q Q`` = magic ``BGRUFFDL``, version 1, page size, memory file size,
page count, then that many little-endian uint32 memory-file page indices in the
order the guest first touched them.

A plan is what the C loop prefetches: uint64 pairs (first memory-file page,
page count), copied in order, each run in batches, skipping pages already there;
a fault inside the plan also starts a copy along the plan from that point.
"""

from __future__ import annotations

import array
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from banger.host.fsutil import atomic_write_bytes

MAGIC = b"BGRUFFDL"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")


class LogInvalid(ValueError):
    pass


def encode_log(pages: array.array, page_size: int, file_size: int) -> bytes:
    if pages.typecode != "I":
        raise TypeError("pages must be array('I')")
    body = array.array("I", pages)
    if sys.byteorder != "little":
        body.byteswap()
    return _HEADER.pack(MAGIC, VERSION, page_size, file_size, len(body)) + body.tobytes()


def decode_log(data: bytes, page_size: int, file_size: int) -> array.array:
    """The page list of a log recorded for this page size and memory file size; LogInvalid otherwise."""
    if len(data) < _HEADER.size:
        raise LogInvalid("access log is shorter than its header")
    magic, version, ps, fsize, count = _HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise LogInvalid("not a banger access log (bad magic or version)")
    if ps != page_size or fsize != file_size:
        raise LogInvalid(f"access log was recorded for page size {ps} / file size {fsize}, "
                         f"not {page_size} / {file_size}")
    if len(data) != _HEADER.size + 4 * count:
        raise LogInvalid(f"access log length {len(data)} does not match its {count} entries")
    pages = array.array("I")
    pages.frombytes(data[_HEADER.size:])
    if sys.byteorder != "little":
        pages.byteswap()
    npages = file_size // page_size
    if pages and max(pages) >= npages:
        raise LogInvalid("access log names pages past the end of the memory file")
    return pages


def read_log(path: Path | str, page_size: int, file_size: int) -> array.array | None:
    """The recorded pages, or None when there is no log. Raises LogInvalid for a log that does not fit."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    return decode_log(data, page_size, file_size)


def peek_log_page_size(path: Path | str) -> int | None:
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
    except FileNotFoundError:
        return None
    if len(head) < _HEADER.size:
        return None
    magic, version, ps, _fsize, _count = _HEADER.unpack(head)
    return ps if magic == MAGIC and version == VERSION else None


def write_log(path: Path | str, pages: array.array, page_size: int, file_size: int) -> None:
    # never re-create the snapshot directory: the log is written after restore has released the
    # snapshot lock, and `snapshot rm` may have removed it meanwhile (FileNotFoundError, logged)
    atomic_write_bytes(path, encode_log(pages, page_size, file_size), 0o600, mkdir=False)


def plan_from_touch_order(pages, npages: int) -> array.array:
    """Turn a first-touch order into prefetch runs that keep that order (the default).

    A page joins the run that ends right before it, whenever that run began, so
    vCPUs walking different buffers at once (interleaved page by page in the log)
    come out as one run each, in the order the runs began: the order in which the
    replaying guest will want them. Duplicates and pages past ``npages`` are dropped.
    """
    from banger.uffd import _uffd

    if not isinstance(pages, array.array) or pages.typecode != "I":
        pages = array.array("I", pages)
    out = array.array("Q")
    out.frombytes(_uffd.touch_order_runs(pages.tobytes(), npages))
    return out


def merge_logs(old, new) -> array.array:
    """A refreshed log: the old order, then first touches the old log lacked (in their order)."""
    out = array.array("I", old)
    have = set(out)
    out.extend(p for p in new if p not in have)
    return out


def plan_from_log(pages, npages: int, *, first_chunk: int = 64, max_chunk: int = 512) -> array.array:
    """Turn a first-touch order into prefetch runs.

    The log is cut into chunks that double in size (the earliest-touched pages
    go first and soon); each chunk is sorted and coalesced into contiguous runs
    so the C loop can copy many pages per UFFDIO_COPY. Duplicates are dropped.
    (``--plan-order chunked``; sorting loses the order inside a chunk, which
    plan_from_touch_order keeps.)
    """
    seen = bytearray(npages)
    out = array.array("Q")
    i, chunk, n = 0, max(1, first_chunk), len(pages)
    while i < n:
        part = []
        for p in pages[i:i + chunk]:
            if p < npages and not seen[p]:
                seen[p] = 1
                part.append(p)
        part.sort()
        j = 0
        while j < len(part):
            start = part[j]
            k = j + 1
            while k < len(part) and part[k] == part[k - 1] + 1:
                k += 1
            out.append(start)
            out.append(k - j)
            j = k
        i += chunk
        chunk = min(chunk * 2, max_chunk)
    return out


def fill_plan(regions, page_size: int) -> array.array:
    """A sequential plan over every region, in memory-file order (the no-log background fill)."""
    out = array.array("Q")
    for r in sorted(regions, key=lambda r: r.offset):
        out.append(r.offset // page_size)
        out.append(r.size // page_size)
    return out


def plan_pages(plan: array.array) -> int:
    return sum(plan[1::2])


@dataclass
class Settler:
    """Decides when a recording has settled: fewer than ``quiet_faults`` new first-touch pages
    per interval for ``intervals`` consecutive intervals, counted only after the first fault."""

    quiet_faults: int = 16
    intervals: int = 8
    quiet: int = 0
    last: int = 0

    def observe(self, recorded: int) -> bool:
        new, self.last = recorded - self.last, recorded
        if recorded == 0:
            return False
        self.quiet = self.quiet + 1 if new < self.quiet_faults else 0
        return self.quiet >= self.intervals
