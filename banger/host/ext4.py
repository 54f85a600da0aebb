"""ext4 image tools (e2fsprogs), always as argv lists."""

from __future__ import annotations

import os
from pathlib import Path

from banger.host.runner import require, run

MiB = 1 << 20


def mkfs(path: Path | str, size_mib: int, *, src_dir: Path | str | None = None, label: str | None = None,
         root_owner: str | None = "0:0") -> None:
    """Create a sparse ext4 image of ``size_mib`` at ``path``, optionally populated from ``src_dir``.

    Journal and inode tables are initialised lazily so creation costs milliseconds, not
    seconds; the file stays sparse.
    """
    path = Path(path)
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    # one -E: mke2fs applies only the last -E it is given
    ext = ["lazy_itable_init=1", "lazy_journal_init=1", "nodiscard"] + ([f"root_owner={root_owner}"] if root_owner else [])
    argv = [require("mkfs.ext4", "e2fsprogs"), "-q", "-F", "-t", "ext4", "-E", ",".join(ext), "-m", "0"]
    if label:
        argv += ["-L", label[:16]]
    if src_dir is not None:
        argv += ["-d", str(src_dir)]
    argv += [str(path)]
    try:
        run(argv, timeout=600)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def fsck(path: Path | str, *, fix: bool = False) -> None:
    """Raise CommandFailed unless the filesystem is clean (``-n``) or was repaired (``-p``)."""
    argv = [require("e2fsck", "e2fsprogs"), "-f", "-p" if fix else "-n", str(path)]
    cp = run(argv, check=False, timeout=600)
    # 0 clean, 1 errors corrected; anything else is a problem
    if cp.returncode not in ((0, 1) if fix else (0,)):
        from banger.errors import CommandFailed

        raise CommandFailed(argv, cp.returncode, (cp.stdout or "") + (cp.stderr or ""),
                            "the filesystem image is damaged; rebuild or re-pull it")


def grow(path: Path | str, size_mib: int) -> bool:
    """Grow the image file and its filesystem to ``size_mib``. Never shrinks. Returns True if grown."""
    path = Path(path)
    size = size_mib * MiB
    if os.path.getsize(path) >= size:
        return False
    with open(path, "r+b") as f:
        f.truncate(size)
    cp = run([require("resize2fs", "e2fsprogs"), str(path)], check=False, timeout=300)
    if cp.returncode != 0:
        # resize2fs sometimes insists on a forced check first
        fsck(path, fix=True)
        run([require("resize2fs", "e2fsprogs"), str(path)], timeout=300)
    return True


def used_bytes(path: Path | str) -> int:
    """Bytes actually allocated on the host for a (sparse) image."""
    return os.stat(path).st_blocks * 512
