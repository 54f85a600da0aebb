# ruff: noqa: F811  (pytest fixtures imported from tests.support are re-declared as arguments)
"""Helper processes (the UFFD handler, the Firecracker supervisor) start isolated from their caller.

The caller runs in a directory holding a planted ``banger/`` package and planted stdlib modules
(argparse, json, runpy), with PYTHONPATH pointing at another planted ``banger/``: every planted
module writes a marker file when imported. The helpers must never import any of them (python -I,
cwd /, scrubbed environment, banger loaded from exactly where the caller's banger lives), and must
still work: the handler serves real page faults, the supervisor takes the VMM down with its handler.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from banger.host import procs
from tests.support.fc import fc_cfg, fc_record, make_spec, tap, tap2, wait_event  # noqa: F401
from tests.support.uffd_peer import PAGE_4K, UffdPeer, make_mem_file

PLANT = """import os
with open({marker!r}, "a") as f:
    f.write(f"{{os.getpid()}} imported {{__name__}} from {{__file__}}\\n")
"""


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """cwd with a planted banger/ + stdlib shadows, PYTHONPATH at a second planted banger/; yields the marker."""
    marker = tmp_path / "PLANTED-CODE-RAN"
    cwd, pp = tmp_path / "cwd", tmp_path / "pythonpath"
    for root in (cwd, pp):
        for pkg in ("banger", "banger/uffd", "banger/vmm", "banger/vmm/firecracker", "banger/host"):
            (root / pkg).mkdir(parents=True)
            (root / pkg / "__init__.py").write_text(PLANT.format(marker=str(marker)))
        for mod in ("banger/uffd/handler.py", "banger/vmm/firecracker/driver.py", "banger/host/procs.py"):
            (root / mod).write_text(PLANT.format(marker=str(marker)))
    for mod in ("argparse.py", "json.py", "runpy.py"):
        (cwd / mod).write_text(PLANT.format(marker=str(marker)))
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PYTHONPATH", str(pp))
    monkeypatch.setenv("PYTHONSTARTUP", str(cwd / "json.py"))
    monkeypatch.setenv("CALLER_SECRET", "must-not-reach-helpers")
    return marker


def assert_isolated(pid: int, marker: Path) -> None:
    assert not marker.exists(), f"planted code ran in a helper:\n{marker.read_text()}"
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    env = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
    assert set(env) <= set(procs.HELPER_ENV), env  # nothing of the caller's environment
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[1] == b"-I"
    with open(f"/proc/{pid}/status") as f:
        umask = next(line.split()[1] for line in f if line.startswith("Umask:"))
    assert int(umask, 8) == 0o077


def test_uffd_handler_ignores_planted_banger_and_serves(hostile):
    import banger
    from banger.uffd import spawn_handler

    d = Path(tempfile.mkdtemp(prefix="bi-", dir="/tmp"))  # short: AF_UNIX paths are limited
    peer = None
    pid = started = 0
    try:
        size = 64 * PAGE_4K
        data = make_mem_file(d / "mem", size)
        pid, started = spawn_handler(d / "h.sock", d / "mem", prefetch=False, stats_path=d / "st.json",
                                     log_path=d / "h.log", connect_timeout=20)
        assert_isolated(pid, hostile)
        # it runs the caller's banger: its C extension is mapped from the caller's package directory
        pkg = os.path.dirname(os.path.abspath(banger.__file__))
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert os.path.join(pkg, "uffd", "_uffd") in maps
        peer = UffdPeer([size])
        peer.handshake(d / "h.sock")
        assert peer.read(0, 0, size) == data  # every page a real fault served by the isolated handler
        peer.close()
        peer = None
        deadline = time.monotonic() + 20
        while procs.alive(pid, started) and time.monotonic() < deadline:
            time.sleep(0.01)
        got, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, (d / "h.log").read_text()
        assert not hostile.exists(), hostile.read_text()
    finally:
        if peer is not None:
            peer.close()
        procs.kill(pid, started)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def driver(fc_cfg):
    from banger.vmm.firecracker.driver import FirecrackerDriver

    d = FirecrackerDriver(fc_cfg)
    d._test_launched = []
    yield d
    for h in d._test_launched:
        d.kill(h)


def test_supervisor_and_handler_ignore_planted_banger(driver, fc_cfg, fc_record, tmp_path, tap, tap2, hostile,
                                                      monkeypatch):
    from banger.host.fsutil import reflink_or_sparse_copy

    monkeypatch.setenv("BANGER_UFFD", "1")
    src = make_spec(fc_cfg, tmp_path, tap)
    h = driver.launch(src)
    driver._test_launched.append(h)
    meta = driver.snapshot(h, tmp_path / "snap")
    driver.kill(h)
    spec = make_spec(fc_cfg, tmp_path, tap2)
    for dd in meta["drives"]:
        if not Path(dd["path_on_host"]).is_absolute():
            reflink_or_sparse_copy(Path(src.vm_dir) / dd["path_on_host"], Path(spec.vm_dir) / dd["path_on_host"])
    r = driver.restore(spec, tmp_path / "snap", meta)
    driver._test_launched.append(r)
    # the handler served the restore: the double's guest memory matches the snapshot
    v = wait_event(fc_record, r["pid"], "memory_verified", timeout=120)
    assert v["backend"] == "Uffd" and v["mismatched_vs_file"] == 0
    for pid in (r["uffd_pid"], r["supervisor_pid"]):
        assert_isolated(pid, hostile)
    # the supervisor works: the handler dies -> it kills the VMM, then exits
    os.kill(r["uffd_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while (procs.alive(r["pid"], r["pid_start"]) or procs.alive(r["supervisor_pid"], r["supervisor_pid_start"])) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not procs.alive(r["pid"], r["pid_start"]), "the supervisor did not take the VMM down"
    assert not procs.alive(r["supervisor_pid"], r["supervisor_pid_start"])
    assert not hostile.exists(), hostile.read_text()
