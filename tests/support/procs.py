"""Helpers to run Python snippets in real, separate processes (for flock/SQLite races)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def spawn_py(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env or os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Barrier:
    """A real start barrier for child processes (no wall-clock deadline): the parent holds an
    exclusive flock on a file; each child announces itself by creating ``<path>.ready.<pid>`` and
    blocks on a shared flock of the same file; ``release()`` waits until ``n`` children are
    waiting, then drops the exclusive lock so they all go at once.

    In the child: ``from tests.support.procs import barrier_wait; barrier_wait(path)``."""

    def __init__(self, path, n: int):
        import fcntl
        from pathlib import Path

        self.path, self.n = Path(path), n
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def ready(self) -> int:
        return len(list(self.path.parent.glob(self.path.name + ".ready.*")))

    def release(self, timeout: float = 120.0) -> None:
        import fcntl
        import time

        deadline = time.monotonic() + timeout
        while self.ready() < self.n:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.ready()} of {self.n} children reached the barrier")
            time.sleep(0.01)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def barrier_wait(path) -> None:
    """The child's half of Barrier: announce, then block until the parent releases."""
    import fcntl

    path = str(path)
    open(f"{path}.ready.{os.getpid()}", "w").close()
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def cpu_burners(n: int = 2, nice: int = -10) -> list[subprocess.Popen]:
    """``n`` CPU-bound processes (at a higher priority than the test's own when run as root), so a
    test runs on a loaded machine: its processes get preempted inside their critical windows."""
    argv = [sys.executable, "-c", "while True: pass"]
    if os.geteuid() == 0 and nice:
        argv = ["nice", "-n", str(nice), *argv]
    return [subprocess.Popen(argv) for _ in range(n)]
