# ruff: noqa: F811  (pytest fixtures imported from tests.support are re-declared as arguments)
"""FirecrackerDriver against the strict double: boot sequence, errors, control, snapshot, restore.

Every test also checks, from the double's own record, that the driver never sent a
request the double rejected (unless the test provokes one on purpose).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from banger.errors import BangerError, ExternalError
from banger.host import procs
from tests.support.fc import (  # noqa: F401
    events,
    fc_cfg,
    fc_record,
    make_spec,
    requests_sent,
    tap,
    tap2,
    wait_event,
    write_bzimage,
)


@pytest.fixture
def driver(fc_cfg):
    from banger.vmm.firecracker.driver import FirecrackerDriver

    d = FirecrackerDriver(fc_cfg)
    launched = []
    d._test_launched = launched
    yield d
    for h in launched:
        d.kill(h)


def launch(driver, spec):
    h = driver.launch(spec)
    driver._test_launched.append(h)
    return h


def all_accepted(record, pid):
    bad = [r for r in requests_sent(record, pid) if r["status"] >= 300]
    assert not bad, f"the driver sent requests the double rejected: {bad}"


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def wait_gone(pid, start, timeout=10.0):
    deadline = time.monotonic() + timeout
    while procs.alive(pid, start):
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} still alive after {timeout}s")
        time.sleep(0.02)


# ---------------------------------------------------------------------------- boot
def test_boot_sequence_is_accepted_in_order(driver, fc_cfg, fc_record, tmp_path, tap):
    spec = make_spec(fc_cfg, tmp_path, tap)
    h = launch(driver, spec)
    assert driver.is_running(h)
    reqs = requests_sent(fc_record, h["pid"])
    seq = [(r["method"], r["path"]) for r in reqs if r["path"] != "/"]
    assert seq == [("PUT", "/machine-config"), ("PUT", "/boot-source"), ("PUT", "/drives/rootfs"),
                   ("PUT", "/drives/overlay"), ("PUT", "/drives/work"), ("PUT", "/network-interfaces/eth0"),
                   ("PUT", "/entropy"), ("PUT", "/actions")]
    all_accepted(fc_record, h["pid"])
    boot = events(fc_record, h["pid"], "boot")[0]
    # boot contract: vda image read-only, vdb overlay, vdc work; no root device -> no root= appended
    assert boot["disks"]["vda"]["drive_id"] == "rootfs" and boot["disks"]["vda"]["read_only"] is True
    assert boot["disks"]["vdb"]["drive_id"] == "overlay" and boot["disks"]["vdb"]["read_only"] is False
    assert boot["disks"]["vdc"]["drive_id"] == "work" and boot["disks"]["vdc"]["read_only"] is False
    assert "root=" not in boot["cmdline"].replace("banger.root=", "")
    assert "banger.root=/dev/vda" in boot["cmdline"] and "console=ttyS0" in boot["cmdline"]
    assert boot["cmdline"].startswith(spec.cmdline)
    # overlay/work are relative to the VM dir (Firecracker's cwd), the shared image is absolute
    assert boot["disks"]["vdb"]["path_on_host"] == "overlay.ext4"
    assert Path(boot["disks"]["vda"]["path_on_host"]).is_absolute()
    assert boot["kernel"] == str(spec.vmlinux) and boot["initrd"] == str(spec.initrd)
    assert boot["ifaces"] == [{"iface_id": "eth0", "host_dev_name": tap, "guest_mac": spec.mac}]
    assert boot["entropy"] is True and boot["machine"]["mem_size_mib"] == 128
    start = events(fc_record, h["pid"], "start")[0]
    assert start["cwd"] == str(spec.vm_dir)
    assert driver.describe(h)["state"] == "Running"
    # the serial console (the double's stdout) lands in serial.log, through the console pump
    wait_for(lambda: "Command line:" in Path(spec.serial_log).read_text(), 10, "the console in serial.log")
    assert procs.alive(h["console_pid"], h["console_pid_start"])


def test_stale_api_socket_is_removed_before_spawn(driver, fc_cfg, fc_record, tmp_path, tap):
    spec = make_spec(fc_cfg, tmp_path, tap)
    Path(spec.run_dir).mkdir(parents=True)
    stale = Path(spec.run_dir) / "fc.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    ino = stale.stat().st_ino
    h = launch(driver, spec)  # the double, like Firecracker, would refuse to bind the existing path
    assert Path(h["api_sock"]).stat().st_ino != ino
    assert driver.describe(h)["state"] == "Running"


def test_second_launch_after_vmm_died_reuses_paths(driver, fc_cfg, fc_record, tmp_path, tap):
    """A VMM killed without cleanup leaves its socket (Firecracker never removes it); the next start works."""
    spec = make_spec(fc_cfg, tmp_path, tap)
    h1 = launch(driver, spec)
    os.kill(h1["pid"], signal.SIGKILL)
    wait_gone(h1["pid"], h1["pid_start"])
    assert Path(h1["api_sock"]).exists()
    h2 = launch(driver, spec)
    assert h2["pid"] != h1["pid"] and driver.describe(h2)["state"] == "Running"
    all_accepted(fc_record, h2["pid"])


# ---------------------------------------------------------------------------- errors
def test_error_carries_fault_message_and_leaves_nothing(driver, fc_cfg, fc_record, tmp_path, tap):
    from banger.vmm.firecracker.api import FirecrackerApiError

    spec = make_spec(fc_cfg, tmp_path, tap, vmlinux=write_bzimage(tmp_path / "bzImage"))
    with pytest.raises(FirecrackerApiError) as ei:
        driver.launch(spec)
    e = ei.value
    assert e.status == 400 and "ELF" in e.fault_message
    assert e.fault_message in e.message and "ELF vmlinux" in e.hint
    assert e.details["path"] == "/actions"
    start = [r for r in fc_record.glob("*.jsonl")]
    assert len(start) == 1
    pid = int(start[0].name.rsplit("-", 1)[1].split(".")[0])
    wait_gone(pid, None)
    assert not Path(spec.run_dir, "fc.sock").exists() and not Path(spec.run_dir, "serial.in").exists()


def test_missing_tap_error(driver, fc_cfg, fc_record, tmp_path):
    from banger.vmm.firecracker.api import FirecrackerApiError

    spec = make_spec(fc_cfg, tmp_path, "bfcnosuch0")
    with pytest.raises(FirecrackerApiError) as ei:
        driver.launch(spec)
    assert "Open tap device failed" in ei.value.fault_message and "TAP" in ei.value.hint
    assert ei.value.exit_code == 8


def test_missing_binary_is_a_host_error(fc_cfg, tmp_path, tap):

    from banger.errors import HostError
    from banger.vmm.firecracker.driver import FirecrackerDriver

    d = FirecrackerDriver(fc_cfg.replace(firecracker_bin="/nonexistent/firecracker"))
    with pytest.raises(HostError) as ei:
        d.launch(make_spec(fc_cfg, tmp_path, tap))
    assert "--backend qemu" in ei.value.hint


def test_api_client_surfaces_fault_message_for_any_path(driver, fc_cfg, fc_record, tmp_path, tap):
    from banger.vmm.firecracker.api import FirecrackerApi, FirecrackerApiError

    h = launch(driver, make_spec(fc_cfg, tmp_path, tap))
    with FirecrackerApi(h["api_sock"]) as api:
        with pytest.raises(FirecrackerApiError) as ei:
            api.machine_config.put(vcpu_count=1, mem_size_mib=64)  # after boot: refused
        assert "not supported after starting" in ei.value.fault_message
        with pytest.raises(ExternalError):
            api.drive("bad-id")  # never even sent: invalid Firecracker ID
    driver.kill(h)
    with FirecrackerApi(h["api_sock"]) as api:
        with pytest.raises(ExternalError) as ei:
            api.describe()
        assert "cannot reach" in ei.value.message


# ---------------------------------------------------------------------------- control
def test_pause_resume_shutdown(driver, fc_cfg, fc_record, tmp_path, tap):
    h = launch(driver, make_spec(fc_cfg, tmp_path, tap))
    driver.pause(h)
    assert driver.describe(h)["state"] == "Paused"
    driver.resume(h)
    assert driver.describe(h)["state"] == "Running"
    driver.request_shutdown(h)  # SendCtrlAltDel: the guest reboots, Firecracker exits 0
    wait_gone(h["pid"], h["pid_start"])
    assert events(fc_record, h["pid"], "exit")[0]["code"] == 0
    all_accepted(fc_record, h["pid"])


def test_kill_removes_process_and_sockets(driver, fc_cfg, fc_record, tmp_path, tap):
    h = launch(driver, make_spec(fc_cfg, tmp_path, tap))
    driver.kill(h)
    assert not driver.is_running(h)
    assert not procs.alive(h["console_pid"], h["console_pid_start"])
    assert not Path(h["api_sock"]).exists() and not Path(h["serial_in"]).exists()
    driver.kill(h)  # idempotent


def test_a_guest_flooding_its_console_stays_under_the_cap(fc_cfg, fc_record, tmp_path, tap, monkeypatch):
    from banger.guest import console
    from banger.vmm.firecracker.driver import FirecrackerDriver

    monkeypatch.setenv("FAKE_FIRECRACKER_SERIAL_FLOOD", str(3 << 20))   # 3 MiB, 48 x the cap
    d = FirecrackerDriver(fc_cfg.replace(console_log_max_kib=64))
    spec = make_spec(fc_cfg, tmp_path, tap)
    h = d.launch(spec)
    try:
        log = Path(spec.serial_log)
        wait_for(lambda: b"fake-guest: flood done" in console.read_all(log), 30, "the end of the flood")
        sizes = [os.path.getsize(p) for p in (log, console.rotated(log))]
        assert all(0 < n <= 64 * 1024 for n in sizes), sizes
        text = console.read_all(log).decode()
        assert "Command line:" not in text  # the oldest output rotated away, the newest kept
        assert console.tail(log, 1) == "fake-guest: flood done"
        assert procs.alive(h["console_pid"], h["console_pid_start"])
    finally:
        d.kill(h)
    assert not procs.alive(h["console_pid"], h["console_pid_start"])  # the pump goes with the VM


def test_console_line_reaches_the_guest(driver, fc_cfg, fc_record, tmp_path, tap):
    h = launch(driver, make_spec(fc_cfg, tmp_path, tap))
    driver.send_console(h, "@banger net 172.30.0.9/24 172.30.0.1 06:00:ac:1e:00:09 clone-1")
    ev = wait_event(fc_record, h["pid"], "guest_net")
    assert ev["ip"] == "172.30.0.9/24" and ev["mac"] == "06:00:ac:1e:00:09" and ev["hostname"] == "clone-1"
    driver.kill(h)
    with pytest.raises(BangerError):
        driver.send_console(h, "@banger net x")


# ---------------------------------------------------------------------------- snapshot + restore
def take_snapshot(driver, fc_cfg, tmp_path, tap):
    spec = make_spec(fc_cfg, tmp_path, tap)
    h = launch(driver, spec)
    dest = tmp_path / "snap"
    meta = driver.snapshot(h, dest)
    assert driver.describe(h)["state"] == "Paused"
    return spec, h, dest, meta


def restore_spec(fc_cfg, tmp_path, tap, meta, src_spec):
    """A new VM dir holding copies of the snapshot's per-VM disks under the recorded names."""
    from banger.host.fsutil import reflink_or_sparse_copy

    spec = make_spec(fc_cfg, tmp_path, tap)
    for d in meta["drives"]:
        if not Path(d["path_on_host"]).is_absolute():
            reflink_or_sparse_copy(Path(src_spec.vm_dir) / d["path_on_host"], Path(spec.vm_dir) / d["path_on_host"])
    return spec


def test_snapshot_writes_state_and_memory(driver, fc_cfg, fc_record, tmp_path, tap):
    spec, h, dest, meta = take_snapshot(driver, fc_cfg, tmp_path, tap)
    assert (dest / "vm.state").exists() and (dest / "vm.mem").stat().st_size == 128 << 20
    assert meta["mem_bytes"] == 128 << 20 and meta["backend"] == "firecracker"
    assert [d["drive_id"] for d in meta["drives"]] == ["rootfs", "overlay", "work"]
    seq = [(r["method"], r["path"]) for r in requests_sent(fc_record, h["pid"])][-4:-1]  # then GET / (test)
    assert seq == [("GET", "/"), ("PATCH", "/vm"), ("PUT", "/snapshot/create")]
    driver.resume(h)
    assert driver.describe(h)["state"] == "Running"
    all_accepted(fc_record, h["pid"])


@pytest.mark.parametrize("uffd_env", ["1", "0"])
def test_restore_end_to_end(driver, fc_cfg, fc_record, tmp_path, tap, tap2, monkeypatch, uffd_env):
    monkeypatch.setenv("BANGER_UFFD", uffd_env)
    src_spec, h, dest, meta = take_snapshot(driver, fc_cfg, tmp_path, tap)
    seed = events(fc_record, h["pid"], "boot")[0]["seed"]
    spec = restore_spec(fc_cfg, tmp_path, tap2, meta, src_spec)
    r = driver.restore(spec, dest, meta)
    driver._test_launched.append(r)
    load = wait_event(fc_record, r["pid"], "snapshot_load")
    assert load["seed"] == seed
    assert load["ifaces"] == [{"iface_id": "eth0", "host_dev_name": tap2}]  # network_overrides took effect
    by_id = {d["drive_id"]: d for d in load["drives"]}
    assert by_id["overlay"]["abs_path"] == str(Path(spec.vm_dir) / "overlay.ext4")  # the clone's own disk
    assert driver.describe(r)["state"] == "Running"
    verified = wait_event(fc_record, r["pid"], "memory_verified", timeout=120)
    assert verified["pages"] == (128 << 20) // 4096 and verified["bytes"] == 128 << 20
    assert verified["mismatched_vs_pattern"] == 0
    if uffd_env == "1":
        assert r["mem_backend"] == "Uffd" and procs.alive(r["uffd_pid"], r["uffd_pid_start"])
        assert load["backend"]["type"] == "Uffd"
        assert verified["backend"] == "Uffd" and verified["mismatched_vs_file"] == 0
        hs = wait_event(fc_record, r["pid"], "uffd_handshake")
        assert hs["regions"] == [128 << 20]
    else:
        assert r["mem_backend"] == "File" and not r.get("uffd_pid")
        assert load["backend"] == {"type": "File", "path": str(dest / "vm.mem")}
    all_accepted(fc_record, r["pid"])
    print(f"restore timings ({'uffd' if uffd_env == '1' else 'file'}): {r['restore_timings']}, "
          f"verify {verified['ms']} ms")


def test_handler_and_vmm_die_together(driver, fc_cfg, fc_record, tmp_path, tap, tap2, monkeypatch):
    monkeypatch.setenv("BANGER_UFFD", "1")
    src_spec, h, dest, meta = take_snapshot(driver, fc_cfg, tmp_path, tap)
    driver.kill(h)
    # 1. the handler dies -> the VMM is killed (a guest without its handler would freeze forever)
    spec = restore_spec(fc_cfg, tmp_path, tap2, meta, src_spec)
    r = driver.restore(spec, dest, meta)
    driver._test_launched.append(r)
    assert procs.alive(r["supervisor_pid"], r["supervisor_pid_start"])
    os.kill(r["uffd_pid"], signal.SIGKILL)
    wait_gone(r["pid"], r["pid_start"])
    wait_gone(r["supervisor_pid"], r["supervisor_pid_start"])
    driver.kill(r)
    # 2. the VMM dies -> the handler goes too
    spec = restore_spec(fc_cfg, tmp_path, tap2, meta, src_spec)
    r = driver.restore(spec, dest, meta)
    driver._test_launched.append(r)
    os.kill(r["pid"], signal.SIGKILL)
    wait_gone(r["uffd_pid"], r["uffd_pid_start"])
    wait_gone(r["supervisor_pid"], r["supervisor_pid_start"])


def test_failed_restore_leaves_nothing(driver, fc_cfg, fc_record, tmp_path, tap, tap2, monkeypatch):
    from banger.vmm.firecracker.api import FirecrackerApiError

    monkeypatch.setenv("BANGER_UFFD", "0")
    src_spec, h, dest, meta = take_snapshot(driver, fc_cfg, tmp_path, tap)
    spec = restore_spec(fc_cfg, tmp_path, "bfcnosuch1", meta, src_spec)  # the clone's TAP is missing
    before = {f.name for f in fc_record.glob("*.jsonl")}
    with pytest.raises(FirecrackerApiError) as ei:
        driver.restore(spec, dest, meta)
    assert "Failed to restore from snapshot" in ei.value.fault_message and "TAP" in ei.value.hint
    deadline = time.monotonic() + 30  # the fake writes its record file itself: on a loaded host, a little later
    while not (new := [f for f in fc_record.glob("*.jsonl") if f.name not in before]):
        assert time.monotonic() < deadline, "the restored VMM's record file never appeared"
        time.sleep(0.02)
    pid = int(new[0].name.rsplit("-", 1)[1].split(".")[0])
    wait_gone(pid, None)
    assert events(fc_record, pid, "exit")[0]["code"] == 1  # a failed load is fatal to the VMM
    assert not any(Path(spec.run_dir).glob("*.sock")) and not Path(spec.run_dir, "serial.in").exists()


def test_restore_refuses_missing_disk_copies(driver, fc_cfg, fc_record, tmp_path, tap, tap2):
    from banger.errors import NotFound

    src_spec, h, dest, meta = take_snapshot(driver, fc_cfg, tmp_path, tap)
    spec = make_spec(fc_cfg, tmp_path, tap2)
    os.unlink(Path(spec.vm_dir) / "work.ext4")
    with pytest.raises(NotFound) as ei:
        driver.restore(spec, dest, meta)
    assert "work" in ei.value.message


def test_load_is_bounded_when_the_handler_does_not_serve(driver, fc_cfg, fc_record, tmp_path, tap, tap2,
                                                          monkeypatch):
    """Faults arrive during PUT /snapshot/load; a handler that never serves must not hang banger forever."""
    import banger.uffd as uffd_pkg
    import banger.vmm.firecracker.driver as fcmod
    from banger.errors import GuestTimeout

    monkeypatch.setenv("BANGER_UFFD", "1")
    src_spec, h, dest, meta = take_snapshot(driver, fc_cfg, tmp_path, tap)
    driver.kill(h)
    real = uffd_pkg.spawn_handler
    spawned = {}

    def stalled_handler(*a, **kw):
        pid, st = real(*a, **kw)
        os.kill(pid, signal.SIGSTOP)  # alive and listening (the kernel queues the connect) but serving nothing
        spawned.update(pid=pid, st=st)
        return pid, st

    monkeypatch.setattr(uffd_pkg, "spawn_handler", stalled_handler)
    monkeypatch.setattr(fcmod, "LOAD_TIMEOUT", 3.0)
    spec = restore_spec(fc_cfg, tmp_path, tap2, meta, src_spec)
    before = {f.name for f in fc_record.glob("*.jsonl")}
    t0 = time.monotonic()
    with pytest.raises(GuestTimeout) as ei:
        driver.restore(spec, dest, meta)
    assert time.monotonic() - t0 < 20
    assert "/snapshot/load" in ei.value.message
    deadline = time.monotonic() + 30  # the fake writes its record file itself: on a loaded host, a little later
    while not (new := [f for f in fc_record.glob("*.jsonl") if f.name not in before]):
        assert time.monotonic() < deadline, "the restored VMM's record file never appeared"
        time.sleep(0.02)
    pid = int(new[0].name.rsplit("-", 1)[1].split(".")[0])
    wait_gone(pid, None)
    wait_gone(spawned["pid"], spawned["st"])
    assert not Path(spec.run_dir, "uffd.sock").exists() and not Path(spec.run_dir, "fc.sock").exists()


def test_second_restore_replays_the_recorded_access_log(driver, fc_cfg, fc_record, tmp_path, tap, tap2,
                                                        monkeypatch):
    """The first UFFD restore records which pages the guest touched (beside the snapshot); the next one
    prefetches them. Both serve every byte correctly."""
    import json as _json

    monkeypatch.setenv("BANGER_UFFD", "1")
    src_spec, h, dest, meta = take_snapshot(driver, fc_cfg, tmp_path, tap)
    driver.kill(h)
    modes = []
    for i in range(2):
        spec = restore_spec(fc_cfg, tmp_path, tap2, meta, src_spec)
        r = driver.restore(spec, dest, meta)
        driver._test_launched.append(r)
        v = wait_event(fc_record, r["pid"], "memory_verified", timeout=120)
        assert v["mismatched_vs_pattern"] == 0 and v["mismatched_vs_file"] == 0
        if i == 0:  # recording settles on the fault rate, then the log is published atomically
            deadline = time.monotonic() + 60
            while not (dest / "access.log").exists():
                assert time.monotonic() < deadline, "no access log recorded"
                time.sleep(0.1)
        driver.kill(r)
        wait_gone(r["uffd_pid"], r["uffd_pid_start"])
        modes.append(_json.loads((Path(spec.vm_dir) / "uffd-stats.json").read_text())["mode"])
    assert modes == ["record", "replay"]
