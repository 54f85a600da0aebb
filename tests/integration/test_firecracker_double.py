# ruff: noqa: F811  (pytest fixtures imported from tests.support are re-declared as arguments)
"""The Firecracker double is strict: every rejection class, triggered by deliberately wrong requests.

These talk to the double directly with a raw HTTP/1.1 client (never through banger),
so each test proves the double refuses what real Firecracker refuses.  The driver
tests (test_firecracker_driver.py) then show banger never triggers any of these.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from tests.support.fc import (  # noqa: F401
    FAKE_FC,
    RawApi,
    del_tap,
    events,
    fc_record,
    make_tap,
    start_double,
    stop_double,
    tap,
    write_bzimage,
    write_fake_vmlinux,
)


@pytest.fixture
def files(tmp_path):
    k = write_fake_vmlinux(tmp_path / "vmlinux")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x" * 100)
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 65536)
    return {"kernel": str(k), "initrd": str(initrd), "disk": str(disk), "dir": tmp_path}


@pytest.fixture
def fc(tmp_path, fc_record):
    sock = tmp_path / "api.sock"
    p = start_double(sock, "--id", "contract")
    api = RawApi(sock)
    yield api, p, sock
    api.close()
    stop_double(p)


def fault(resp) -> str:
    status, body, _ = resp
    assert status == 400, resp
    assert set(body) == {"fault_message"}, body
    return body["fault_message"]


def boot_minimal(api, files):
    assert api.request("PUT", "/boot-source", {"kernel_image_path": files["kernel"],
                                               "initrd_path": files["initrd"], "boot_args": "console=ttyS0"})[0] == 204
    assert api.request("PUT", "/drives/d1", {"drive_id": "d1", "path_on_host": files["disk"],
                                             "is_root_device": False})[0] == 204
    assert api.request("PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204


def test_describe_instance(fc):
    api, p, _ = fc
    status, body, headers = api.request("GET", "/")
    assert status == 200
    assert body == {"id": "contract", "state": "Not started", "vmm_version": "1.16.1", "app_name": "Firecracker"}
    assert headers["content-type"] == "application/json"


def test_body_schema_rejections(fc):
    api, _, _ = fc
    assert "unknown field `foo`" in fault(api.request("PUT", "/machine-config",
                                                      {"vcpu_count": 1, "mem_size_mib": 128, "foo": 1}))
    assert "missing field `mem_size_mib`" in fault(api.request("PUT", "/machine-config", {"vcpu_count": 1}))
    assert "invalid type" in fault(api.request("PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 128}))
    assert "invalid type" in fault(api.request("PUT", "/machine-config", {"vcpu_count": True, "mem_size_mib": 128}))
    assert "unknown variant" in fault(api.request("PUT", "/actions", {"action_type": "Reboot"}))
    assert "unknown field" in fault(api.request("PUT", "/entropy", {"rate_limiter": {"bandwidth": {
        "size": 1, "refill_time": 1, "extra": 2}}}))  # nested objects are strict too
    assert "deserializing" in fault(api.request("PUT", "/machine-config", raw_body=b"{not json"))


def test_vcpu_range_and_smt(fc):
    api, _, _ = fc
    for bad in ({"vcpu_count": 0, "mem_size_mib": 128}, {"vcpu_count": 33, "mem_size_mib": 128},
                {"vcpu_count": 3, "mem_size_mib": 128, "smt": True}):
        assert "vCPU" in fault(api.request("PUT", "/machine-config", bad))
    assert api.request("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 128, "smt": True})[0] == 204
    assert api.request("PUT", "/machine-config", {"vcpu_count": 3, "mem_size_mib": 128})[0] == 204
    assert "invalid value" in fault(api.request("PUT", "/machine-config", {"vcpu_count": 256, "mem_size_mib": 1}))


def test_ids_in_paths(fc, files):
    api, _, _ = fc
    body = {"drive_id": "root", "path_on_host": files["disk"], "is_root_device": False}
    assert "does not match" in fault(api.request("PUT", "/drives/other", body))
    assert "Invalid ID" in fault(api.request("PUT", "/drives/bad-id", {**body, "drive_id": "bad-id"}))
    assert "Invalid ID" in fault(api.request("PUT", "/drives/a.b", {**body, "drive_id": "a.b"}))
    assert api.request("PUT", "/drives/root", body)[0] == 204


def test_http_level_rejections(fc, files):
    api, _, _ = fc
    assert "Empty PUT request" in fault(api.request("PUT", "/machine-config", None, content_length=False))
    assert "Empty PATCH request" in fault(api.request("PATCH", "/vm", None, content_length=True))
    assert "GET request cannot have a body" in fault(api.request("GET", "/", raw_body=b"{}"))
    assert "Invalid request method and/or path" in fault(api.request("GET", "/nonexistent"))
    assert "Invalid request method and/or path" in fault(api.request("DELETE", "/drives/x"))
    assert "Invalid request method and/or path" in fault(api.request("POST", "/actions",
                                                                     {"action_type": "InstanceStart"}))
    # the connection is still usable afterwards (keep-alive), requests are answered in order
    assert api.request("GET", "/")[0] == 200


def test_chunked_body_refused_and_connection_closed(fc):
    api, _, sock = fc
    raw = (b"PUT /machine-config HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n0\r\n\r\n")
    assert "chunked" in fault(api.send_raw(raw))


def test_files_must_exist_at_request_time(fc, files):
    api, _, _ = fc
    missing = str(files["dir"] / "nope")
    assert "kernel file cannot be opened" in fault(api.request("PUT", "/boot-source", {"kernel_image_path": missing}))
    assert "initrd" in fault(api.request("PUT", "/boot-source", {"kernel_image_path": files["kernel"],
                                                                 "initrd_path": missing}))
    assert "No such file" in fault(api.request("PUT", "/drives/d", {"drive_id": "d", "path_on_host": missing,
                                                                    "is_root_device": False}))
    assert "No such file" in fault(api.request("PUT", "/logger", {"log_path": missing}))


def test_one_root_device(fc, files):
    api, _, _ = fc
    d = {"path_on_host": files["disk"], "is_root_device": True}
    assert api.request("PUT", "/drives/a", {"drive_id": "a", **d})[0] == 204
    assert "root block device already exists" in fault(api.request("PUT", "/drives/b", {"drive_id": "b", **d}))
    assert "partuuid" in fault(api.request("PUT", "/drives/c", {"drive_id": "c", "path_on_host": files["disk"],
                                                                "is_root_device": False, "partuuid": "x"}))


def test_tap_must_exist_and_is_really_opened(fc, tmp_path, tap, fc_record):
    api, _, _ = fc
    assert "Open tap device failed" in fault(api.request("PUT", "/network-interfaces/eth0", {
        "iface_id": "eth0", "host_dev_name": "bangernotap0"}))
    assert not os.path.exists("/sys/class/net/bangernotap0")  # and it did not create one
    assert "MAC" in fault(api.request("PUT", "/network-interfaces/eth0", {
        "iface_id": "eth0", "host_dev_name": tap, "guest_mac": "zz:00:00:00:00:00"}))
    assert api.request("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": tap,
                                                           "guest_mac": "06:00:00:00:00:01"})[0] == 204
    # a second VMM cannot attach the same TAP (single-queue TAP, already attached): EBUSY, like Firecracker
    sock2 = tmp_path / "api2.sock"
    p2 = start_double(sock2, "--id", "second")
    try:
        api2 = RawApi(sock2)
        assert "Device or resource busy" in fault(api2.request("PUT", "/network-interfaces/eth0", {
            "iface_id": "eth0", "host_dev_name": tap}))
        api2.close()
    finally:
        stop_double(p2)


def test_order_rules(fc, files):
    api, p, _ = fc
    assert "without kernel configuration" in fault(api.request("PUT", "/actions", {"action_type": "InstanceStart"}))
    assert "not supported before starting" in fault(api.request("PATCH", "/vm", {"state": "Paused"}))
    assert "not supported before starting" in fault(api.request("PUT", "/snapshot/create", {
        "snapshot_path": "/tmp/x", "mem_file_path": "/tmp/y"}))
    assert "not supported before starting" in fault(api.request("PUT", "/actions", {"action_type": "SendCtrlAltDel"}))
    assert api.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})[0] == 204
    # boot-specific resources configured: snapshot load refused (not fatal: the process lives on)
    assert "not allowed after configuring boot-specific resources" in fault(api.request("PUT", "/snapshot/load", {
        "snapshot_path": "/tmp/x", "mem_backend": {"backend_type": "File", "backend_path": "/tmp/y"}}))
    assert p.poll() is None
    boot_minimal(api, files)
    assert api.request("GET", "/")[1]["state"] == "Running"
    assert "not supported after starting" in fault(api.request("PUT", "/actions", {"action_type": "InstanceStart"}))
    assert "not supported after starting" in fault(api.request("PUT", "/machine-config",
                                                               {"vcpu_count": 1, "mem_size_mib": 64}))
    assert "not supported after starting" in fault(api.request("PUT", "/boot-source",
                                                               {"kernel_image_path": files["kernel"]}))
    assert "not paused" in fault(api.request("PUT", "/snapshot/create", {
        "snapshot_path": str(files["dir"] / "s"), "mem_file_path": str(files["dir"] / "m")}))
    assert api.request("PATCH", "/vm", {"state": "Paused"})[0] == 204
    assert api.request("GET", "/")[1]["state"] == "Paused"
    assert "Diff snapshots are not allowed" in fault(api.request("PUT", "/snapshot/create", {
        "snapshot_path": str(files["dir"] / "s"), "mem_file_path": str(files["dir"] / "m"), "snapshot_type": "Diff"}))
    assert api.request("PUT", "/snapshot/create", {"snapshot_path": str(files["dir"] / "s"),
                                                   "mem_file_path": str(files["dir"] / "m")})[0] == 204
    assert os.path.getsize(files["dir"] / "m") == 64 << 20


def test_snapshot_load_params_validated_before_anything(fc, files):
    api, p, _ = fc
    assert "but not both" in fault(api.request("PUT", "/snapshot/load", {"snapshot_path": "/x"}))
    assert "but not both" in fault(api.request("PUT", "/snapshot/load", {
        "snapshot_path": "/x", "mem_file_path": "/y", "mem_backend": {"backend_type": "File", "backend_path": "/y"}}))
    assert "missing field `backend_path`" in fault(api.request("PUT", "/snapshot/load", {
        "snapshot_path": "/x", "mem_backend": {"backend_type": "File"}}))
    assert p.poll() is None  # parse errors are not fatal


def test_failed_snapshot_load_answers_400_then_exits(fc, files):
    api, p, sock = fc
    # logger + metrics do not count as boot-specific: the load is attempted, fails, and the process exits
    log = files["dir"] / "fc.log"
    log.write_text("")
    assert api.request("PUT", "/logger", {"log_path": str(log), "level": "Debug"})[0] == 204
    msg = fault(api.request("PUT", "/snapshot/load", {
        "snapshot_path": str(files["dir"] / "missing.state"),
        "mem_backend": {"backend_type": "File", "backend_path": str(files["dir"] / "missing.mem")}}))
    assert "Failed to restore from snapshot" in msg
    assert p.wait(timeout=10) == 1
    assert sock.exists()  # Firecracker never removes its API socket


def test_uffd_backend_unreachable_is_fatal(fc, files):
    api, p, _ = fc
    # a real snapshot first (from another double) so the failure is the UFFD connect, not the state file
    d = files["dir"]
    sock2 = d / "src.sock"
    p2 = start_double(sock2, "--id", "src")
    try:
        a2 = RawApi(sock2)
        boot_minimal(a2, files)
        a2.request("PATCH", "/vm", {"state": "Paused"})
        assert a2.request("PUT", "/snapshot/create", {"snapshot_path": str(d / "s.state"),
                                                      "mem_file_path": str(d / "s.mem")})[0] == 204
        a2.close()
    finally:
        stop_double(p2)
    msg = fault(api.request("PUT", "/snapshot/load", {
        "snapshot_path": str(d / "s.state"),
        "mem_backend": {"backend_type": "Uffd", "backend_path": str(d / "no-handler.sock")}}))
    assert "No such file" in msg and "UFFD" in msg
    assert p.wait(timeout=10) == 1


def test_existing_api_socket_path_is_refused(tmp_path, fc_record):
    sock = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))
    s.close()  # a stale socket file, nobody listening
    cp = subprocess.run([str(FAKE_FC), "--api-sock", str(sock)], capture_output=True, text=True, timeout=20)
    assert cp.returncode == 1
    assert "Failed to open the API socket" in cp.stderr


def test_log_path_must_exist(tmp_path, fc_record):
    cp = subprocess.run([str(FAKE_FC), "--api-sock", str(tmp_path / "a.sock"), "--log-path", str(tmp_path / "no.log")],
                        capture_output=True, text=True, timeout=20)
    assert cp.returncode == 1 and "logger" in cp.stderr.lower()
    cp = subprocess.run([str(FAKE_FC), "--api-sock", str(tmp_path / "b.sock"), "--id", "bad id!"],
                        capture_output=True, text=True, timeout=20)
    assert cp.returncode == 153


def test_bzimage_refused_at_instance_start(fc, files):
    api, _, _ = fc
    bz = write_bzimage(files["dir"] / "bzImage")
    assert api.request("PUT", "/boot-source", {"kernel_image_path": str(bz)})[0] == 204  # opened, not parsed yet
    assert "ELF" in fault(api.request("PUT", "/actions", {"action_type": "InstanceStart"}))


def test_ctrl_alt_del_exits_zero(fc, files):
    api, p, sock = fc
    boot_minimal(api, files)
    assert api.request("PUT", "/actions", {"action_type": "SendCtrlAltDel"})[0] == 204
    assert p.wait(timeout=10) == 0
    assert sock.exists()


def test_requests_served_one_at_a_time_across_connections(fc):
    api, _, sock = fc
    others = [RawApi(sock) for _ in range(5)]
    try:
        for _i in range(3):  # interleave keep-alive connections
            for o in others:
                assert o.request("GET", "/")[0] == 200
            assert api.request("GET", "/version")[1] == {"firecracker_version": "1.16.1"}
        # pipelined: two requests in one write on one connection, answered in order
        raw = (b"GET / HTTP/1.1\r\n\r\nPUT /machine-config HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        st1, b1, _ = api.send_raw(raw)
        st2, b2, _ = api.read_response()
        assert (st1, st2) == (200, 400) and "missing field" in b2["fault_message"]
    finally:
        for o in others:
            o.close()


def test_sigterm_is_not_handled(fc):
    _, p, sock = fc
    p.terminate()
    assert p.wait(timeout=10) == -15
    assert sock.exists()


def test_payload_limit(fc):
    api, _, _ = fc
    big = {"vcpu_count": 1, "mem_size_mib": 128, "x": "a" * 60000}
    assert "larger than the limit" in fault(api.request("PUT", "/machine-config", big))


@pytest.fixture
def snap(files, tap, fc_record):
    """A snapshot taken from a booted double that had one network interface (on ``tap``)."""
    d = files["dir"]
    sock = d / "snapsrc.sock"
    p = start_double(sock, "--id", "snapsrc")
    try:
        a = RawApi(sock)
        assert a.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})[0] == 204
        assert a.request("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": tap})[0] == 204
        boot_minimal(a, files)
        a.request("PATCH", "/vm", {"state": "Paused"})
        assert a.request("PUT", "/snapshot/create", {"snapshot_path": str(d / "s.state"),
                                                     "mem_file_path": str(d / "s.mem")})[0] == 204
        a.close()
    finally:
        stop_double(p)
    return {"state": str(d / "s.state"), "mem": str(d / "s.mem"), "tap": tap}


def test_snapshot_create_into_missing_directory(fc, files):
    api, _, _ = fc
    boot_minimal(api, files)
    api.request("PATCH", "/vm", {"state": "Paused"})
    msg = fault(api.request("PUT", "/snapshot/create", {"snapshot_path": str(files["dir"] / "no" / "s"),
                                                        "mem_file_path": str(files["dir"] / "m")}))
    assert "No such file or directory" in msg


def test_uffd_socket_without_listener_is_econnrefused_and_fatal(fc, snap, files):
    api, p, _ = fc
    dead = files["dir"] / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))
    s.close()  # the path exists, nobody listens
    msg = fault(api.request("PUT", "/snapshot/load", {
        "snapshot_path": snap["state"], "mem_backend": {"backend_type": "Uffd", "backend_path": str(dead)}}))
    assert "Connection refused" in msg
    assert p.wait(timeout=10) == 1


def test_network_override_must_name_a_known_interface(fc, snap):
    api, p, _ = fc
    msg = fault(api.request("PUT", "/snapshot/load", {
        "snapshot_path": snap["state"], "mem_backend": {"backend_type": "File", "backend_path": snap["mem"]},
        "network_overrides": [{"iface_id": "eth9", "host_dev_name": snap["tap"]}]}))
    assert "no network interface with id eth9" in msg
    assert p.wait(timeout=10) == 1


def test_snapshot_tap_must_exist_without_override(fc, snap):
    api, p, _ = fc
    del_tap(snap["tap"])  # the snapshot names a TAP that is gone and no override is given
    msg = fault(api.request("PUT", "/snapshot/load", {
        "snapshot_path": snap["state"], "mem_backend": {"backend_type": "File", "backend_path": snap["mem"]}}))
    assert "Open tap device failed" in msg
    assert p.wait(timeout=10) == 1


def test_memory_file_must_match_the_snapshot(fc, snap, files):
    api, p, _ = fc
    short = files["dir"] / "short.mem"
    short.write_bytes(open(snap["mem"], "rb").read()[: 16 << 20])
    msg = fault(api.request("PUT", "/snapshot/load", {
        "snapshot_path": snap["state"], "mem_backend": {"backend_type": "File", "backend_path": str(short)}}))
    assert "memory file is" in msg
    assert p.wait(timeout=10) == 1


def test_loaded_vm_is_paused_then_runtime_only(fc, snap, fc_record):
    api, p, _ = fc
    assert api.request("PUT", "/snapshot/load", {
        "snapshot_path": snap["state"], "mem_backend": {"backend_type": "File", "backend_path": snap["mem"]}})[0] == 204
    assert api.request("GET", "/")[1]["state"] == "Paused"
    assert "not supported after starting" in fault(api.request("PUT", "/snapshot/load", {
        "snapshot_path": snap["state"], "mem_backend": {"backend_type": "File", "backend_path": snap["mem"]}}))
    assert "not supported after starting" in fault(api.request("PUT", "/actions", {"action_type": "InstanceStart"}))
    assert api.request("PATCH", "/vm", {"state": "Resumed"})[0] == 204
    v = [e for e in events(fc_record, p.pid, "memory_verified")]
    deadline = time.monotonic() + 60
    while not v and time.monotonic() < deadline:
        time.sleep(0.05)
        v = events(fc_record, p.pid, "memory_verified")
    assert v and v[0]["mismatched_vs_pattern"] == 0 and v[0]["pages"] == (32 << 20) // 4096
