"""The console pump as a real process: a flood stays under the cap, the newest lines survive, control
lines reach the VMM side, it runs isolated from the caller's cwd / PYTHONPATH, never writes through
a link, and exits by itself when the VMM side closes."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from banger.guest import console
from banger.host import procs

CAP = 64 * 1024


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def wait_gone(pid, start, timeout=10.0):
    wait_for(lambda: not procs.alive(pid, start), timeout, f"pump {pid} to exit")


@pytest.fixture
def vm_dir(tmp_path):
    d = tmp_path / "vm"
    d.mkdir()
    return d


def _spawn(vm_dir, vmm_fd, control_fd=None, cap=CAP):
    pid, start = console.spawn_pump(vm_id="test", vm_dir=vm_dir, log_name="serial.log", cap=cap, vmm_fd=vmm_fd,
                                    control_fd=control_fd, diag_path=vm_dir / console.PUMP_LOG)
    return pid, start


def test_a_flood_through_a_pipe_stays_under_the_cap_and_keeps_the_newest_lines(vm_dir):
    r, w = os.pipe()
    pid, start = _spawn(vm_dir, r)
    os.close(r)
    try:
        lines = [f"line {i:07d} " + "y" * 50 + "\n" for i in range(60000)]   # ~3.8 MiB, 60 x the cap
        blob = "".join(lines).encode()
        for i in range(0, len(blob), 65536):
            os.write(w, blob[i:i + 65536])
        os.write(w, b"LAST-LINE\n")
    finally:
        os.close(w)
    wait_gone(pid, start)  # EOF: the VMM side is gone, so is the pump
    log, old = vm_dir / "serial.log", vm_dir / "serial.log.1"
    assert log.stat().st_size <= CAP and old.stat().st_size <= CAP
    assert stat_mode(log) == 0o600
    data = console.read_all(log).decode()
    assert data.endswith("line 0059999 " + "y" * 50 + "\nLAST-LINE\n")
    got = data.splitlines()[:-1]
    assert len(got) > CAP // 64  # both files hold whole lines, in order, without a gap
    first = int(got[0].split()[1])
    assert got == [s.rstrip("\n") for s in lines[first:]]
    assert "LAST-LINE" in console.tail(log, 3)


def stat_mode(p: Path) -> int:
    return os.stat(p).st_mode & 0o777


def test_control_lines_reach_the_vmm_and_output_reaches_the_log(vm_dir, tmp_path):
    vmm, pump_end = socket.socketpair()
    sock_path = str(tmp_path / "serial.sock")
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl.bind(sock_path)
    ctl.listen(8)
    pid, start = _spawn(vm_dir, pump_end.fileno(), ctl.fileno())
    pump_end.close()
    ctl.close()
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(sock_path)
        c.sendall(b"@banger net 172.30.0.9/24 172.30.0.1 06:00:ac:1e:00:09 clone-1\n")
        c.close()  # hanging up at once loses nothing: the pump read it all
        vmm.settimeout(10)
        got = b""
        while not got.endswith(b"\n"):
            got += vmm.recv(4096)
        assert got == b"@banger net 172.30.0.9/24 172.30.0.1 06:00:ac:1e:00:09 clone-1\n"
        vmm.sendall(b"banger-init: net 172.30.0.9/24\r\n")
        wait_for(lambda: b"banger-init: net" in console.read_all(vm_dir / "serial.log"), 10, "the guest's answer")
    finally:
        vmm.close()
    wait_gone(pid, start)


def test_the_pump_runs_isolated_from_a_planted_banger_package(vm_dir, tmp_path, monkeypatch):
    evil = tmp_path / "evil"
    (evil / "banger" / "guest").mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    payload = f"open({str(marker)!r}, 'w').write('x')\n"
    for rel in ("banger/__init__.py", "banger/guest/__init__.py", "banger/guest/console.py"):
        (evil / rel).write_text(payload)
    (evil / "sitecustomize.py").write_text(payload)
    monkeypatch.chdir(evil)
    monkeypatch.setenv("PYTHONPATH", str(evil))
    r, w = os.pipe()
    pid, start = _spawn(vm_dir, r)
    os.close(r)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    os.write(w, b"hello from the guest\n")
    wait_for(lambda: b"hello" in console.read_all(vm_dir / "serial.log"), 10, "the pump's output")
    os.close(w)
    wait_gone(pid, start)
    assert not marker.exists()


def test_the_pump_never_writes_through_a_link_at_the_log_path(vm_dir, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, vm_dir / "serial.log")
    r, w = os.pipe()
    pid, start = _spawn(vm_dir, r)
    os.close(r)
    os.write(w, b"x" * 1000 + b"\n")
    os.close(w)
    wait_gone(pid, start)
    assert victim.read_text() == "precious\n"
    assert "cannot open serial.log" in (vm_dir / console.PUMP_LOG).read_text()


def test_an_oversized_log_from_before_the_cap_is_rotated_at_start(vm_dir):
    (vm_dir / "serial.log").write_bytes(b"old\n" * (CAP // 2))   # 2 x the cap
    r, w = os.pipe()
    pid, start = _spawn(vm_dir, r)
    os.close(r)
    os.write(w, b"new boot\n")
    os.close(w)
    wait_gone(pid, start)
    assert (vm_dir / "serial.log").read_bytes() == b"new boot\n"
    assert (vm_dir / "serial.log.1").stat().st_size == 2 * CAP  # kept as it was, replaced at the next rotation


def test_follow_survives_rotations(vm_dir):
    r, w = os.pipe()
    pid, start = _spawn(vm_dir, r, cap=16 * 1024)
    os.close(r)
    out = bytearray()
    import threading

    done = threading.Event()
    t = threading.Thread(target=console.follow, args=(vm_dir / "serial.log", out.extend),
                         kwargs={"keep_going": lambda: not done.is_set(), "poll_s": 0.01})
    t.start()
    try:
        sent = b""
        for i in range(400):       # 400 lines of 100 bytes, written slowly enough to follow: 2.5 x the cap
            line = f"{i:05d}".encode() + b"z" * 94 + b"\n"
            os.write(w, line)
            sent += line
            if i % 40 == 0:
                n = len(sent)
                wait_for(lambda n=n: len(out) >= n - 4096, 10, "the follower to catch up")
    finally:
        os.close(w)
        wait_gone(pid, start)
        done.set()
        t.join(10)
    assert bytes(out) == sent
