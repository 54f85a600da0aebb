"""Cross-process locks over flock (the filelock package).

Lock names are ``vm/<id>``, ``workspace/<id>``, ``image/<name>``,
``kernel/<name>``, ``snapshot/<name>``, ``template/<key>``, ``vmpool/<key>``, ``pool``, ``names`` and ``hostnet``; each maps to a file under
``$BANGER_HOME/locks``.  Lock files are never deleted: unlinking a lock file
while another process waits on its inode would let two holders in at once.

Lock order (ARCHITECTURE.md): vm and workspace are never held together;
vmpool -> template -> vm -> snapshot -> image/kernel -> pool -> names -> hostnet; SQLite transactions
innermost and short.
A process records who holds a lock inside the file (pid, command) so a timeout
can name the holder.
"""

from __future__ import annotations

import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from banger.errors import LockTimeout, UsageError

_KINDS = {"vm", "workspace", "image", "kernel", "snapshot", "template", "vmpool"}
_SINGLETONS = {"pool", "hostnet", "diskpool", "names"}  # names: VM name sync (banger.vms.hostnames)
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def lock_path(locks_dir: Path, name: str) -> Path:
    if name in _SINGLETONS:
        return locks_dir / f"{name}.lock"
    kind, _, key = name.partition("/")
    if kind not in _KINDS or not _SAFE.match(key):
        raise UsageError(f"invalid lock name {name!r}")
    return locks_dir / kind / f"{key}.lock"


class Locks:
    def __init__(self, locks_dir: Path, default_timeout: float = 600.0):
        self.dir = Path(locks_dir)
        self.default_timeout = default_timeout

    def path(self, name: str) -> Path:
        return lock_path(self.dir, name)

    @contextmanager
    def hold(self, name: str, timeout: float | None = None, purpose: str = ""):
        """Hold lock ``name``; raise LockTimeout naming the holder if it cannot be had in time.

        An uncontended lock is taken with one non-blocking flock on the lock file (the very lock a
        filelock holder takes, so both kinds exclude each other); only a lock someone else holds goes
        through filelock's waiting (its import costs ~25 ms of CPU, more than the rest of a `vm create`'s
        locking, and most commands never wait)."""
        p = self.path(name)
        fd = _try_flock(p)
        if fd is not None:
            try:
                self._write_holder(p, purpose)
                yield p
            finally:
                os.close(fd)  # closing the only descriptor releases the flock
            return
        from filelock import FileLock, Timeout

        lk = FileLock(str(p), mode=0o600)
        t = self.default_timeout if timeout is None else timeout
        try:
            lk.acquire(timeout=t, poll_interval=0.02)
        except Timeout:
            holder = self.holder(name)
            raise LockTimeout(
                f"lock {name} is held by another banger process{f' ({holder})' if holder else ''}; "
                f"waited {t:g}s",
                "wait for that command to finish, or check it is still alive (banger gc cleans up after dead ones)",
                details={"lock": name, "holder": holder},
            ) from None
        try:
            self._write_holder(p, purpose)
            yield p
        finally:
            lk.release()

    @staticmethod
    def _write_holder(p: Path, purpose: str) -> None:
        # The lock file itself carries the holder; we hold the flock, so nobody else writes it now.
        info = f"pid={os.getpid()} cmd={' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:4]))}"
        if purpose:
            info += f" purpose={purpose}"
        info += f" since={time.strftime('%H:%M:%S')}"
        try:
            with open(p, "r+") as f:
                f.seek(0)
                f.write(info + "\n")
                f.truncate()
        except OSError:
            pass

    def holder(self, name: str) -> str:
        try:
            return self.path(name).read_text().strip()
        except OSError:
            return ""

    def is_held(self, name: str) -> bool:
        p = self.path(name)
        if not p.exists():
            return False
        fd = _try_flock(p, create=False)
        if fd is None:
            return p.exists()  # (vanished meanwhile: nobody holds it)
        os.close(fd)
        return False


def _try_flock(p: Path, *, create: bool = True) -> int | None:
    """An fd holding an exclusive flock on ``p`` (created 0600 if missing), or None when another
    holder has it (or, with ``create=False``, when ``p`` is gone)."""
    import fcntl

    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    try:
        fd = os.open(p, flags, 0o600)
    except FileNotFoundError:
        if not create:
            return None
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd
