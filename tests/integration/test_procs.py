"""banger.host.procs with real processes: signals go through pidfds and never reach a reused pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from banger.host import procs

NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"


def _sleeper(*, detached: bool = True):
    argv = [sys.executable, "-c", "import time; time.sleep(300)"]
    if detached:
        return procs.spawn_detached(argv)
    p = subprocess.Popen(argv)
    return p, procs.start_time(p.pid)


def _wait_tick_passes(start: int) -> None:
    """Make sure a process started from now on has a start time different from ``start``."""
    hz = os.sysconf("SC_CLK_TCK")
    time.sleep(2.5 / hz)


def _take_pid(pid: int, attempts: int = 200) -> subprocess.Popen | None:
    """Start a stranger process that gets exactly ``pid`` (a real pid reuse), or None if others keep
    winning the race for it. Uses ns_last_pid (root): the next pid handed out is the one after it."""
    for _ in range(attempts):
        with open(NS_LAST_PID, "w") as f:
            f.write(str(pid - 1))
        p = subprocess.Popen(["sleep", "300"])
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    return None


def _gone_and_reused(pid: int, start: int) -> subprocess.Popen:
    # our process exits and is reaped; then a stranger takes over its pid
    procs.kill(pid, start, signal.SIGKILL)
    assert procs.start_time(pid) is None
    _wait_tick_passes(start)
    stranger = _take_pid(pid)
    assert stranger is not None, f"could not get pid {pid} reused (the host forks too fast?)"
    assert procs.start_time(stranger.pid) != start
    return stranger


def test_kill_never_hits_a_process_that_reused_the_pid():
    pid, start = _sleeper()
    stranger = _gone_and_reused(pid, start)
    try:
        assert not procs.alive(pid, start)
        assert procs.kill(pid, start, signal.SIGKILL) is True  # ours is gone: nothing to do
        assert procs.kill(pid, start, signal.SIGTERM, wait=0.2) is True
        time.sleep(0.05)
        assert stranger.poll() is None, "procs.kill signalled the process that reused the pid"
        assert procs.open_pidfd(pid, start) is None
    finally:
        stranger.kill()
        stranger.wait()


def test_a_pidfd_opened_before_the_exit_never_reaches_the_successor():
    pid, start = _sleeper()
    fd = procs.open_pidfd(pid, start)
    assert fd is not None
    try:
        stranger = _gone_and_reused(pid, start)
        try:
            assert procs.pidfd_exited(fd)
            assert procs.signal_pidfd(fd, signal.SIGKILL) is False
            assert procs.kill_pidfd(fd, signal.SIGKILL, wait=0.2) is True
            time.sleep(0.05)
            assert stranger.poll() is None
        finally:
            stranger.kill()
            stranger.wait()
    finally:
        os.close(fd)


def test_kill_signals_ours_waits_and_reaps_a_child():
    p, start = _sleeper(detached=False)
    p.returncode = 0  # we reap through procs, not Popen
    assert procs.alive(p.pid, start)
    assert procs.kill(p.pid, start, signal.SIGTERM, wait=10) is True
    # reaped: no zombie left behind under our pid
    assert not os.path.exists(f"/proc/{p.pid}") or procs.start_time(p.pid) not in (None, start)
    with pytest.raises(ChildProcessError):
        os.waitpid(p.pid, os.WNOHANG)


def test_kill_reaps_a_child_that_already_exited():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    start = procs.start_time(p.pid)
    p.returncode = 0
    deadline = time.monotonic() + 10
    while procs.alive(p.pid, start) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not procs.alive(p.pid, start)  # a zombie now
    assert procs.kill(p.pid, start) is True
    with pytest.raises(ChildProcessError):
        os.waitpid(p.pid, os.WNOHANG)


def test_wrong_start_time_is_not_our_process():
    pid, start = _sleeper()
    try:
        assert procs.kill(pid, start + 1, signal.SIGKILL, wait=0.1) is True  # "ours is gone"
        assert procs.alive(pid, start), "a process with another start time was signalled"
        assert procs.open_pidfd(pid, start + 1) is None
    finally:
        assert procs.kill(pid, start)
    assert not procs.alive(pid, start)


def test_sig_zero_only_waits():
    pid, start = _sleeper()
    try:
        t = time.monotonic()
        assert procs.kill(pid, start, 0, wait=0.3) is False
        assert time.monotonic() - t >= 0.25
        assert procs.alive(pid, start)
    finally:
        procs.kill(pid, start)
