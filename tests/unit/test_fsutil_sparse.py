"""reflink_or_sparse_copy across filesystems (a memfd -> a file: copy_file_range refuses, so sendfile, and
pread/pwrite when sendfile is refused too): the data lands at the same offsets, holes stay holes, and the
refused call is asked once, not once per chunk."""

from __future__ import annotations

import errno
import os

import pytest

from banger.host import fsutil

MiB = 1 << 20


def _memfd_with_extents() -> tuple[str, dict[int, bytes], int]:
    fd = os.memfd_create("bgtest")
    size = 64 * MiB
    os.ftruncate(fd, size)
    chunks = {0: os.urandom(4096), 3 * MiB + 512: os.urandom(3 * MiB), 40 * MiB: os.urandom(MiB + 7)}
    for off, data in chunks.items():
        os.pwrite(fd, data, off)
    return fd, chunks, size


@pytest.mark.parametrize("sendfile_refused", [False, True])
def test_sparse_copy_from_a_memfd(tmp_path, monkeypatch, sendfile_refused):
    fd, chunks, size = _memfd_with_extents()
    calls = {"cfr": 0, "sendfile": 0}
    real_sf = os.sendfile

    def cfr(*a):
        calls["cfr"] += 1
        raise OSError(errno.EXDEV, "cross-device")  # what Linux >= 5.19 says across filesystems

    def sf(*a):
        calls["sendfile"] += 1
        if sendfile_refused:
            raise OSError(errno.EINVAL, "no")
        return real_sf(*a)

    monkeypatch.setattr(os, "copy_file_range", cfr)
    monkeypatch.setattr(os, "sendfile", sf)
    try:
        dst = tmp_path / "copy.ram"
        assert fsutil.reflink_or_sparse_copy(f"/proc/self/fd/{fd}", dst) == "sparse"
        assert os.path.getsize(dst) == size
        with open(dst, "rb") as f:
            for off, data in chunks.items():
                f.seek(off)
                assert f.read(len(data)) == data
            f.seek(20 * MiB)
            assert f.read(MiB) == bytes(MiB)  # a hole reads as zeros
        assert os.stat(dst).st_blocks * 512 < 16 * MiB  # and takes no room
        assert calls["cfr"] == 1  # refused once, then never asked again
        assert calls["sendfile"] == (1 if sendfile_refused else 3)  # one call per extent when it works
    finally:
        os.close(fd)
