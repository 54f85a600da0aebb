"""Small filesystem helpers: atomic publication, sparse copies, reflinks."""

from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: Path | str, data: bytes, mode: int = 0o600, *, mkdir: bool = True,
                       durable: bool = True) -> None:
    """Write ``data`` to a sibling temp file, fsync it, then rename over ``path``.

    Readers see either the old or the new content, never a torn one. With ``mkdir=False`` a
    missing parent is an error (FileNotFoundError) instead of being re-created: for writers
    that must not resurrect a directory someone else removed. ``durable=False`` skips both fsyncs:
    for records of live processes (a VM's handles), which a host crash makes moot anyway; the rename
    still keeps every reader from a torn file while the host runs.
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with publish_by_rename(tmp, path, durable=durable):
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)


def fsync_dir(path: Path | str) -> None:
    """fsync a directory, so a rename (or create / unlink) inside it survives a host crash: a rename
    is durable only once its directory's entry is on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_durably(src: Path | str, dest: Path | str) -> None:
    """``os.rename`` then fsync the directory (both, if they differ) so the new name survives a crash."""
    os.rename(src, dest)
    fsync_dir(os.path.dirname(os.path.abspath(dest)))
    src_dir = os.path.dirname(os.path.abspath(src))
    if src_dir != os.path.dirname(os.path.abspath(dest)):
        fsync_dir(src_dir)


@contextmanager
def publish_by_rename(tmp: Path | str, dest: Path | str, *, durable: bool = True):
    """Fill ``tmp`` (a sibling of ``dest``) inside the block; on success rename it over ``dest``
    in one step (then, if ``durable``, fsync the directory: the new name survives a crash), on any
    failure remove it. Readers of ``dest`` never see a partial file."""
    try:
        yield tmp
        os.replace(tmp, dest)
        if durable:
            fsync_dir(os.path.dirname(os.path.abspath(dest)))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path | str, obj, mode: int = 0o600, *, durable: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode, durable=durable)


def read_json(path: Path | str, default=None):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default


def reflink_or_sparse_copy(src: Path | str, dst: Path | str) -> str:
    """Clone ``src`` to ``dst``: a reflink where the filesystem has one, a sparse copy otherwise.

    Returns "reflink" or "sparse".
    """
    import fcntl

    FICLONE = 0x40049409
    src, dst = str(src), str(dst)
    with open(src, "rb") as fs, open(dst, "wb") as fd:
        try:
            fcntl.ioctl(fd.fileno(), FICLONE, fs.fileno())
            return "reflink"
        except OSError:
            pass
        size = os.fstat(fs.fileno()).st_size
        _sparse_copy_fd(fs.fileno(), fd.fileno(), size)
        os.ftruncate(fd.fileno(), size)
        return "sparse"


def _sparse_copy_fd(sfd: int, dfd: int, size: int) -> None:
    """Copy the data extents of ``sfd`` into ``dfd`` at the same offsets: copy_file_range, else (another
    filesystem: e.g. a memfd or tmpfs -> ext4; Linux >= 5.19 refuses it across them) sendfile, asked once
    each, never again per chunk; else pread/pwrite through one reused buffer."""
    how = "cfr"
    buf = None
    off = 0
    while off < size:
        try:
            data_start = os.lseek(sfd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: no more data
            break
        hole = os.lseek(sfd, data_start, os.SEEK_HOLE)
        pos = data_start
        while pos < hole:
            n = -1
            if how == "cfr":
                try:
                    n = os.copy_file_range(sfd, dfd, min(hole - pos, 1 << 30), pos, pos)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    how = "sendfile"
            if how == "sendfile":
                try:
                    os.lseek(dfd, pos, os.SEEK_SET)
                    n = os.sendfile(dfd, sfd, pos, min(hole - pos, 1 << 30))
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    how = "rw"
            if how == "rw":
                if buf is None:
                    buf = memoryview(bytearray(1 << 20))
                n = os.preadv(sfd, [buf[:min(hole - pos, len(buf))]], pos)
                n = os.pwrite(dfd, buf[:n], pos) if n else 0
            if n == 0:
                break
            pos += n
        off = hole


def supports_reflink(directory: Path | str) -> bool:
    import fcntl

    FICLONE = 0x40049409
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    import tempfile

    with tempfile.NamedTemporaryFile(dir=directory) as a, tempfile.NamedTemporaryFile(dir=directory) as b:
        a.write(b"x" * 4096)
        a.flush()
        try:
            fcntl.ioctl(b.fileno(), FICLONE, a.fileno())
            return True
        except OSError:
            return False
