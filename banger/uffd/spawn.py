"""Start the handler process for one restore and wait until its socket listens."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path

from banger.errors import Conflict, ExternalError, NotFound, UsageError
from banger.host import procs

HANDLER_MODULE = "banger.uffd.handler"


def handler_args(socket_path, mem_file, *, access_log=None, stats_path=None, prefetch: bool = True,
                 connect_timeout: float = 30.0, vmm_pid: int | None = None,
                 extra_args: Sequence[str] = ()) -> list[str]:
    """The handler's command-line arguments. Paths are made absolute: the handler runs in ``/``."""
    argv = [os.path.abspath(socket_path), "--mem-file", os.path.abspath(mem_file),
            "--connect-timeout", f"{connect_timeout:g}"]
    if access_log:
        argv += ["--access-log", os.path.abspath(access_log)]
    if stats_path:
        argv += ["--stats", os.path.abspath(stats_path)]
    if not prefetch:
        argv.append("--no-prefetch")
    if vmm_pid:
        argv += ["--vmm-pid", str(vmm_pid)]
    return argv + [str(a) for a in extra_args]


def handler_argv(socket_path, mem_file, **kw) -> list[str]:
    """The whole isolated argv spawn_handler runs (``python -I -c BOOTSTRAP PKG banger.uffd.handler ...``)."""
    return procs.helper_argv(HANDLER_MODULE, *handler_args(socket_path, mem_file, **kw))


def spawn_handler(socket_path, mem_file, *, access_log=None, stats_path=None, prefetch: bool | None = None,
                  connect_timeout: float = 30.0, log_path=None, vmm_pid: int | None = None,
                  extra_args: Sequence[str] = (), ready_timeout: float = 15.0) -> tuple[int, int]:
    """Spawn ``python -m banger.uffd.handler`` detached; return (pid, start_time) once the socket listens.

    The handler starts isolated from the caller (procs.spawn_helper: ``python -I``, cwd ``/``, a scrubbed
    environment, banger loaded from where this process's banger lives).

    ``prefetch=None`` follows BANGER_UFFD_PREFETCH. A stale socket at ``socket_path`` is removed first.
    If the handler dies or is not listening within ``ready_timeout`` seconds, it is killed and an
    ExternalError carrying the tail of its log is raised (nothing is left behind).
    """
    from banger.uffd.flags import prefetch_enabled

    socket_path, mem_file = Path(socket_path), Path(mem_file)
    if not mem_file.is_file():
        raise NotFound(f"memory file {mem_file} does not exist", "the snapshot is incomplete; re-create it")
    if len(os.fsencode(str(socket_path))) > 100:
        raise UsageError(f"UFFD socket path is too long for AF_UNIX: {socket_path}",
                         "use a shorter runtime directory (BANGER_RUN)")
    try:
        st = os.lstat(socket_path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise Conflict(f"{socket_path} exists and is not a socket", "remove it or pick another path")
        os.unlink(socket_path)  # stale: a handler's socket disappears once a VMM connects or it exits
    if prefetch is None:
        prefetch = prefetch_enabled()
    args = handler_args(socket_path, mem_file, access_log=access_log, stats_path=stats_path, prefetch=prefetch,
                        connect_timeout=connect_timeout, vmm_pid=vmm_pid, extra_args=extra_args)
    pid, started = procs.spawn_helper(HANDLER_MODULE, *args, stdout_path=str(log_path) if log_path else None)
    deadline = time.monotonic() + ready_timeout
    delay = 0.002
    while True:
        try:
            if stat.S_ISSOCK(os.lstat(socket_path).st_mode):
                return pid, started
        except FileNotFoundError:
            pass
        if not procs.alive(pid, started):
            procs.kill(pid, started)  # reaps it if it is our child
            raise ExternalError(f"the UFFD handler exited before listening on {socket_path}"
                                + _tail(log_path), "see the handler log; banger doctor checks userfaultfd")
        if time.monotonic() > deadline:
            procs.kill(pid, started)
            raise ExternalError(f"the UFFD handler did not listen on {socket_path} within {ready_timeout:g}s"
                                + _tail(log_path), "the host may be overloaded; retry")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _tail(log_path) -> str:
    if not log_path:
        return ""
    try:
        lines = Path(log_path).read_text(errors="replace").strip().splitlines()[-10:]
    except OSError:
        return ""
    return ("\n" + "\n".join(lines)) if lines else ""
