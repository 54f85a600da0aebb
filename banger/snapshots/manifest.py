"""A snapshot's manifest: the size and a content checksum of every file it is made of.

Written when the snapshot is taken (into the snapshot row's meta, so a damaged or missing file
on disk cannot take its own checksum with it); checked when a clone is restored:

- before anything is reserved: every file is there with its size, and every small file (the VMM
  state, known_hosts) hashes right -- a few milliseconds;
- the big files (guest memory, disks) hash in a background thread while the restore copies disks and
  starts the VMM; the restore joins it before the clone counts as restored (so its cost hides behind
  work that happens anyway), and unwinds the clone if a checksum is wrong.

Both checksums run over the file's non-zero 1 MiB blocks, each prefixed by its offset, then the file
size: any changed byte changes them, and they do not depend on how the filesystem stores zeros (a
hole and a written zero block hash alike), so sparse disks cost the time their data takes to read.
Small files get SHA-256 (``sha256z``); the big ones (guest memory, disks) CRC-32 (``crc32z``): it
catches every flipped byte and every burst up to 32 bits, which is what damage on a disk or a partial
copy looks like, at a third of SHA-256's cost (0.2 vs 0.6 s per GiB here). It is not meant to stop a
forger: the files are 0600 in 0700 directories, and whoever can write them is root on the host.
"""

from __future__ import annotations

import hashlib
import os
import threading
import zlib
from pathlib import Path

from banger.errors import EXIT_NOT_FOUND, IntegrityError

BLOCK = 1 << 20
SMALL = 8 << 20  # files up to this size are verified synchronously, before the restore reserves anything
ALGOS = ("sha256z", "crc32z")
_ZERO = bytes(BLOCK)


class SnapshotDamaged(IntegrityError):
    code = "snapshot_damaged"


class SnapshotIncomplete(IntegrityError):
    code = "snapshot_incomplete"
    exit_code = EXIT_NOT_FOUND


def _hint(snapshot: str) -> str:
    return (f"its files changed or were lost since it was taken; remove it (banger snapshot rm {snapshot}) and "
            "snapshot the VM again")


def _blocks(fd: int, size: int):
    """Indices of the 1 MiB blocks that hold data (holes skipped through SEEK_DATA/SEEK_HOLE)."""
    off = 0
    last = -1
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        for i in range(start // BLOCK, (end - 1) // BLOCK + 1):
            if i > last:
                last = i
                yield i
        off = end


class _Crc:
    def __init__(self):
        self.v = 0

    def update(self, b) -> None:
        self.v = zlib.crc32(b, self.v)  # releases the GIL for big buffers, like hashlib

    def hexdigest(self) -> str:
        return f"{self.v:08x}"


def checksum(path: Path | str, stop: threading.Event | None = None, algo: str = "sha256z") -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return checksum_fd(fd, stop, algo)
    finally:
        os.close(fd)


def checksum_fd(fd: int, stop: threading.Event | None = None, algo: str = "sha256z") -> str:
    h = hashlib.sha256() if algo == "sha256z" else _Crc()
    size = os.fstat(fd).st_size
    for i in _blocks(fd, size):
        if stop is not None and stop.is_set():
            return ""
        data = os.pread(fd, BLOCK, i * BLOCK)
        if data != _ZERO[:len(data)]:
            h.update((i * BLOCK).to_bytes(8, "little"))
            h.update(data)
    h.update(size.to_bytes(8, "little"))
    return h.hexdigest()


def build(d: Path, skip: tuple[str, ...] = ()) -> dict:
    """{name: {"size", "sha256z" | "crc32z"}} for every regular file directly in ``d`` (but ``skip``)."""
    out = {}
    for p in sorted(d.iterdir()):
        if p.name in skip or p.is_symlink() or not p.is_file():
            continue
        size = p.stat().st_size
        algo = "sha256z" if size <= SMALL else "crc32z"
        out[p.name] = {"size": size, algo: checksum(p, algo=algo)}
    return out


def check_present(snapshot: str, d: Path, files: dict) -> list[str]:
    """Every file there with its recorded size, every small one hashing right; returns the big ones' names
    (for :class:`Verifier`). Raises SnapshotIncomplete / SnapshotDamaged."""
    big = []
    for name, want in sorted(files.items()):
        p = d / name
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise SnapshotIncomplete(f"snapshot {snapshot!r} incomplete: {name} is missing from {d}",
                                     _hint(snapshot), details={"file": name}) from None
        if st.st_size != want["size"]:
            raise SnapshotDamaged(f"snapshot {snapshot!r} damaged: {name} is {st.st_size} bytes, "
                                  f"{want['size']} when it was taken", _hint(snapshot),
                                  details={"file": name, "size": st.st_size, "expected_size": want["size"]})
        if st.st_size <= SMALL:
            _compare(snapshot, p, want)
        else:
            big.append(name)
    return big


def _compare(snapshot: str, p: Path, want: dict, stop: threading.Event | None = None, fd: int | None = None) -> None:
    algo = next((a for a in ALGOS if a in want), None)
    if algo is None:
        raise SnapshotDamaged(f"snapshot {snapshot!r} damaged: no known checksum recorded for {p.name}",
                              _hint(snapshot))
    got = checksum(p, stop, algo) if fd is None else checksum_fd(fd, stop, algo)
    if got and got != want[algo]:
        raise SnapshotDamaged(f"snapshot {snapshot!r} damaged: {p.name} does not match its checksum "
                              f"({algo} {got[:16]}, recorded {want[algo][:16]})", _hint(snapshot),
                              details={"file": p.name, "checksum": got, "expected": want[algo]})


class Verifier:
    """Hash the big files in a background thread (hashlib and zlib release the GIL); ``result()`` joins it
    and raises what it found. ``cancel()`` (an unwinding restore) stops it at the next block. Every file is
    opened up front (the caller holds snapshot/<name>), so the caller may release that lock and join later:
    an `rm` meanwhile unlinks names, not the open files."""

    def __init__(self, snapshot: str, d: Path, files: dict, names: list[str]):
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._fds: dict[str, int] = {}
        try:
            for n in names:
                self._fds[n] = os.open(d / n, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as e:
            self._close()
            raise SnapshotIncomplete(f"snapshot {snapshot!r} incomplete: {Path(e.filename).name} is missing "
                                     f"from {d}", _hint(snapshot)) from None
        self._t = threading.Thread(target=self._run, args=(snapshot, d, files, names), daemon=True,
                                   name="snapshot-verify")
        self._t.start()

    def _close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def _run(self, snapshot, d, files, names):
        import time

        t0 = time.monotonic()
        try:  # this thread only (Linux: a tid is a PRIO_PROCESS target): the VMM and handler come first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass
        try:
            for n in names:
                _compare(snapshot, d / n, files[n], self.stop, self._fds[n])
        except BaseException as e:  # noqa: BLE001 - handed to the joining thread
            self.error = e
        finally:
            self._close()
        self.seconds = time.monotonic() - t0

    def result(self) -> float:
        self._t.join()
        if self.error is not None:
            raise self.error
        return self.seconds

    def cancel(self) -> None:
        self.stop.set()
