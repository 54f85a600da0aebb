"""Detached helper processes (VMM, UFFD handler): spawn in a new session, identify by pid + start time."""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager


def start_time(pid: int) -> int | None:
    """The process start time in clock ticks since boot (field 22 of /proc/PID/stat), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = data[data.rfind(b")") + 2:].split()
    try:
        if rest[0] == b"Z":
            return None  # a zombie is as good as gone
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def alive(pid: int | None, started: int | None) -> bool:
    """True only if ``pid`` runs and is the same process we spawned (a reused pid is not ours)."""
    if not pid:
        return False
    st = start_time(pid)
    return st is not None and (started is None or st == started)


# Callbacks of the enclosing ``recording()`` blocks: every detached process is announced to them the
# moment it exists, so its owner can write it down before doing anything slow (banger gc knows our
# processes only from such records: pid + start time, never from their command lines).
_WATCHERS: list = []


@contextmanager
def recording(callback):
    """Within the block, call ``callback(pid, start, argv)`` for each detached process spawned."""
    _WATCHERS.append(callback)
    try:
        yield
    finally:
        _WATCHERS.remove(callback)


def announce(pid: int, start: int, argv: list[str]) -> None:
    """Tell the ``recording()`` callbacks about a just-spawned detached process. Every spawner of a
    process that outlives its command calls this right after the spawn; if a callback fails (it could
    not write its record), the process is killed and the error raised: an unrecorded helper must not
    be left running."""
    try:
        for cb in list(_WATCHERS):
            cb(pid, start, [str(a) for a in argv])
    except BaseException:
        kill(pid, start)
        raise


def spawn_detached(argv: list[str], *, stdout_path: str | None = None, env: dict | None = None,
                   pass_fds: tuple = (), cwd: str | None = None) -> tuple[int, int]:
    """Start ``argv`` in a new session so it outlives this command; return (pid, start_time)."""
    import subprocess

    out = open(stdout_path, "ab") if stdout_path else subprocess.DEVNULL
    try:
        p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, close_fds=True, pass_fds=pass_fds, env=env, cwd=cwd)
    finally:
        if stdout_path:
            out.close()
    st = start_time(p.pid)
    # Popen keeps a handle; detach it so no ResourceWarning and no reaping by us later.
    p.returncode = 0
    announce(p.pid, st or 0, argv)
    return p.pid, st or 0


def kill(pid: int | None, started: int | None, sig: int = signal.SIGKILL, wait: float = 5.0) -> bool:
    """Signal our process (never a reused pid) and wait for it to go. Returns True if it is gone."""
    if not alive(pid, started):
        return True
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            # reap it if it is our child (it is not, once detached from a previous command)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not alive(pid, started):
            return True
        time.sleep(0.02)
    return not alive(pid, started)
