"""Detached helper processes (VMM, UFFD handler, supervisor): spawn, identify, signal.

A process is identified by (pid, start time): field 22 of /proc/PID/stat, clock ticks since boot.
Every signal goes through a pidfd opened for that identity (``open_pidfd``): the pidfd pins the
process, so once its start time has been checked a signal can never reach a process that later
took over the pid.

Helper processes that run banger's own Python code (``helper_argv``) start isolated from the
caller: ``python -I`` (no cwd, PYTHONPATH or user site on sys.path), cwd ``/``, a scrubbed
environment, umask 077, and the ``banger`` package loaded from exactly the directory the caller's
banger was imported from (a ``banger/`` planted in the caller's cwd or on its PYTHONPATH is never
seen).
"""

from __future__ import annotations

import math
import os
import select
import signal
import sys
import time
from contextlib import contextmanager

# What a helper process gets as its environment: nothing of the caller's.
HELPER_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}

# python -I -c BOOTSTRAP PKG_DIR MODULE ARGS...: load the package ``banger`` from PKG_DIR (and only
# from there: sys.path is left as -I made it), then run MODULE as __main__ with ARGS as its argv.
_BOOTSTRAP = (
    "import sys, importlib.util as u, runpy\n"
    "d, m = sys.argv[1], sys.argv[2]\n"
    "del sys.argv[1:3]\n"
    "s = u.spec_from_file_location('banger', d + '/__init__.py', submodule_search_locations=[d])\n"
    "b = u.module_from_spec(s)\n"
    "sys.modules['banger'] = b\n"
    "s.loader.exec_module(b)\n"
    "runpy.run_module(m, run_name='__main__', alter_sys=True)\n"
)


def banger_package_dir() -> str:
    """The directory of the ``banger`` package this process runs (the one helpers must load too)."""
    import banger

    path = getattr(banger, "__file__", None)
    if not path or not os.path.isfile(path):
        raise RuntimeError("the banger package is not a plain directory on disk; cannot start helpers from it")
    return os.path.dirname(os.path.abspath(path))


def helper_argv(module: str, *args) -> list[str]:
    """argv that runs ``python -m MODULE ARGS`` isolated: see the module docstring.

    ``module`` must be a banger module (``banger.…``)."""
    if not module.startswith("banger."):
        raise ValueError(f"helper module must be part of banger, got {module!r}")
    return [sys.executable, "-I", "-c", _BOOTSTRAP, banger_package_dir(), module, *(str(a) for a in args)]


def _stat(pid: int) -> tuple[bytes, int] | None:
    """(state letter, start time) of ``pid`` from /proc/PID/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = data[data.rfind(b")") + 2:].split()
    try:
        return rest[0], int(rest[19])
    except (IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    """The process start time in clock ticks since boot (field 22 of /proc/PID/stat), or None if gone."""
    st = _stat(pid)
    if st is None or st[0] == b"Z":
        return None  # a zombie is as good as gone
    return st[1]


def alive(pid: int | None, started: int | None) -> bool:
    """True only if ``pid`` runs and is the same process we spawned (a reused pid is not ours)."""
    if not pid:
        return False
    st = start_time(pid)
    return st is not None and (started is None or st == started)


def pidfd_exited(fd: int) -> bool:
    """True once the process behind pidfd ``fd`` has exited (a zombie counts as exited)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def open_pidfd(pid: int | None, started: int | None, *, zombie: bool = False) -> int | None:
    """A pidfd for our process ``(pid, started)``, or None when it is gone or the pid is someone else's.

    ``started=None`` accepts whatever runs under ``pid`` now; ``zombie`` accepts one that has exited
    but is not reaped yet (to reap it). The start time is read after the pidfd is open and the pidfd
    is then checked to still be running: so the process read is the one the pidfd holds (a pid is
    not reused while its process exists, zombie or not)."""
    if not pid or pid <= 0:
        return None
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # ESRCH: no such process (EINVAL: not a process leader; EMFILE...)
        return None
    ok = False
    try:
        st = _stat(pid)
        if st is not None and (started is None or st[1] == started):
            ok = (zombie and st[0] == b"Z") or (st[0] != b"Z" and not pidfd_exited(fd))
    finally:
        if not ok:
            os.close(fd)
    return fd if ok else None


def signal_pidfd(fd: int, sig: int) -> bool:
    """Send ``sig`` (0: only check) through pidfd ``fd``; False when the process has already exited."""
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        return False
    return True


def wait_pidfd(fd: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the process behind ``fd`` to exit; reap it if it is our child.

    Returns True once it has exited."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    deadline = time.monotonic() + max(0.0, timeout)
    while not p.poll(max(0, math.ceil((deadline - time.monotonic()) * 1000))):
        if time.monotonic() >= deadline:
            return False
    _reap(fd)
    return True


def _reap(fd: int) -> None:
    try:
        os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its parent (or init) reaps it
    except OSError:
        pass


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
                   pass_fds: tuple = (), cwd: str | None = None, umask: int = 0o077) -> tuple[int, int]:
    """Start ``argv`` in a new session so it outlives this command; return (pid, start_time)."""
    import subprocess

    out = open(stdout_path, "ab") if stdout_path else subprocess.DEVNULL
    try:
        p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, close_fds=True, pass_fds=pass_fds, env=env, cwd=cwd,
                             umask=umask)
    finally:
        if stdout_path:
            out.close()
    st = start_time(p.pid)
    # Popen keeps a handle; detach it so no ResourceWarning and no reaping by us later.
    p.returncode = 0
    announce(p.pid, st or 0, argv)
    return p.pid, st or 0


def spawn_helper(module: str, *args, stdout_path: str | None = None, pass_fds: tuple = ()) -> tuple[int, int]:
    """Spawn banger's ``module`` as an isolated, detached helper (see the module docstring)."""
    return spawn_detached(helper_argv(module, *args), stdout_path=stdout_path, env=dict(HELPER_ENV),
                          pass_fds=pass_fds, cwd="/", umask=0o077)


def kill_pidfd(fd: int, sig: int = signal.SIGKILL, wait: float = 5.0) -> bool:
    """Signal the process behind pidfd ``fd`` and wait up to ``wait`` s for it to go (True if gone).

    ``sig=0`` sends nothing: it only waits."""
    if pidfd_exited(fd):
        _reap(fd)
        return True
    if sig and not signal_pidfd(fd, sig):
        _reap(fd)
        return True
    return wait_pidfd(fd, wait)


def kill(pid: int | None, started: int | None, sig: int = signal.SIGKILL, wait: float = 5.0) -> bool:
    """Signal our process (never a reused pid: through a pidfd checked against the start time) and wait
    for it to go. Returns True if it is gone. ``sig=0`` only waits."""
    fd = open_pidfd(pid, started, zombie=True)
    if fd is None:
        return True
    try:
        return kill_pidfd(fd, sig, wait)
    finally:
        os.close(fd)
