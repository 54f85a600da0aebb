"""Fixtures for the Firecracker backend tests: the strict double, TAPs, VM specs, the double's record.

The double (tests/support/fake_firecracker.py) is an executable banger finds through
``firecracker_bin`` in BANGER_CONFIG; it writes what it saw and did as JSON lines
under ``$FAKE_FIRECRACKER_RECORD``.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

FAKE_FC = Path(__file__).resolve().parent / "fake_firecracker.py"


def write_fake_vmlinux(path: Path) -> Path:
    """A file that passes the double's kernel check: a 64-bit little-endian ELF header (x86-64)."""
    hdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8 + struct.pack("<HHI", 2, 62, 1)
    path.write_bytes(hdr + b"\0" * (4096 - len(hdr)))
    return path


def write_bzimage(path: Path) -> Path:
    """Not an ELF: what Firecracker 1.16 on x86_64 refuses to boot."""
    data = bytearray(4096)
    data[0x202:0x206] = b"HdrS"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def fc_record(tmp_path, monkeypatch):
    d = tmp_path / "fc-record"
    d.mkdir()
    monkeypatch.setenv("FAKE_FIRECRACKER_RECORD", str(d))
    return d


@pytest.fixture
def fc_cfg(banger_env, tmp_path, monkeypatch, fc_record):
    """A Config whose firecracker_bin is the strict double."""
    from banger.config import load_config

    conf = tmp_path / "config.toml"
    conf.write_text(f'firecracker_bin = "{FAKE_FC}"\nbackend = "firecracker"\n')
    monkeypatch.setenv("BANGER_CONFIG", str(conf))
    return load_config()


def records(record_dir: Path, pid: int | None = None) -> list[dict]:
    out = []
    for f in sorted(Path(record_dir).glob("*.jsonl")):
        if pid is not None and not f.name.endswith(f"-{pid}.jsonl"):
            continue
        for line in f.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


def events(record_dir: Path, pid: int, kind: str) -> list[dict]:
    return [e for e in records(record_dir, pid) if e["event"] == kind]


def wait_event(record_dir: Path, pid: int, kind: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = events(record_dir, pid, kind)
        if ev:
            return ev[-1]
        time.sleep(0.02)
    raise AssertionError(f"no {kind!r} event from pid {pid} within {timeout}s; got "
                         f"{[e['event'] for e in records(record_dir, pid)]}")


def requests_sent(record_dir: Path, pid: int) -> list[dict]:
    return events(record_dir, pid, "request")


class Tap:
    def __init__(self, name: str):
        self.name = name


def _ip(*args, check=True):
    from banger.host.runner import run

    return run(["ip", *args], check=check)


def make_tap(prefix: str = "bfct") -> str:
    name = f"{prefix}{secrets.token_hex(3)}"
    _ip("tuntap", "add", "dev", name, "mode", "tap")
    return name


def del_tap(name: str) -> None:
    _ip("link", "del", name, check=False)


@pytest.fixture
def tap():
    name = make_tap()
    yield name
    del_tap(name)


@pytest.fixture
def tap2():
    name = make_tap()
    yield name
    del_tap(name)


def make_spec(cfg, tmp_path: Path, tap: str | None, *, memory_mib: int = 128, vcpu: int = 1, vm_id: str | None = None,
              vmlinux: Path | None = None):
    """A VmSpec laid out like banger's: shared image + kernel outside, overlay/work in the VM dir."""
    from banger.guest.bootargs import guest_cmdline
    from banger.vmm import registry
    from banger.vmm.base import Drive, VmSpec

    vm_id = vm_id or secrets.token_hex(6)
    shared = tmp_path / "shared"
    shared.mkdir(exist_ok=True)
    kern = vmlinux or write_fake_vmlinux(shared / "vmlinux")
    initrd = shared / "initrd.img"
    if not initrd.exists():
        initrd.write_bytes(b"\x07\x07\x07" * 100)
    rootfs = shared / "rootfs.ext4"
    if not rootfs.exists():
        with open(rootfs, "wb") as f:
            f.truncate(8 << 20)
    vm_dir = cfg.vm_dir(vm_id)
    vm_dir.mkdir(parents=True, exist_ok=True)
    for n in ("overlay.ext4", "work.ext4"):
        with open(vm_dir / n, "wb") as f:
            f.write(n.encode() + vm_id.encode())
            f.truncate(4 << 20)
    cmd = guest_cmdline(ip="172.30.0.5", prefixlen=24, gateway="172.30.0.1", hostname="fc-test",
                        extra=registry.backend("firecracker").boot_args())
    return VmSpec(vm_id=vm_id, name="fc-test", vcpu=vcpu, memory_mib=memory_mib, vmlinux=kern, bzimage=None,
                  initrd=initrd, cmdline=cmd,
                  drives=[Drive("rootfs", rootfs, True), Drive("overlay", vm_dir / "overlay.ext4"),
                          Drive("work", vm_dir / "work.ext4")],
                  tap=tap, mac="06:00:ac:1e:00:05", run_dir=cfg.vm_run_dir(vm_id), vm_dir=vm_dir,
                  serial_log=vm_dir / "serial.log")


class RawApi:
    """A deliberately low-level HTTP/1.1 client over the unix socket, for sending what banger never sends."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.path)
        self.buf = b""

    def close(self):
        self.sock.close()

    def send_raw(self, data: bytes):
        self.sock.sendall(data)
        return self.read_response()

    def request(self, method: str, path: str, body=None, *, content_length: bool = True,
                raw_body: bytes | None = None):
        data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else b"")
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
        if data or (content_length and method in ("PUT", "PATCH")):
            if content_length:
                head += f"Content-Length: {len(data)}\r\nContent-Type: application/json\r\n"
        return self.send_raw(head.encode() + b"\r\n" + data)

    def read_response(self):
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        n = int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, (json.loads(body) if body else None), headers


def start_double(sock: Path, *extra, cwd=None, stdin=None, env=None) -> subprocess.Popen:
    """Run the double directly (not through banger) and wait for its socket."""
    p = subprocess.Popen([str(FAKE_FC), "--api-sock", str(sock), *map(str, extra)], cwd=cwd,
                         stdin=stdin or subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env or os.environ.copy())
    deadline = time.monotonic() + 10
    while True:  # the file appears at bind(), connections succeed after listen(): poll for both
        if p.poll() is not None:
            raise AssertionError(f"double exited {p.returncode}: {p.stderr.read().decode()}")
        if time.monotonic() > deadline:
            p.kill()
            raise AssertionError("double did not listen on its socket")
        if os.path.exists(sock):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(sock))
                break
            except (ConnectionRefusedError, FileNotFoundError):
                pass
            finally:
                s.close()
        time.sleep(0.01)
    return p


def stop_double(p: subprocess.Popen):
    if p.poll() is None:
        p.kill()
    p.wait(timeout=10)
    for s in (p.stdout, p.stderr):
        if s:
            s.close()


# ---------------------------------------------------------------------------- whole-product helpers (netns)
_RUNNING_FC_VM = """
import json, os, sys
os.umask(0o077)  # as every banger command (banger/cli/main.py)
from pathlib import Path
from banger.context import Ctx
from banger.names import Subnet
from banger.state.reservation import reserve_vm
from banger.vms import runtime as vms
from tests.support.fc import write_fake_vmlinux

name, shared, mem = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
ctx = Ctx()
shared.mkdir(parents=True, exist_ok=True)
kern = shared / "vmlinux"
if not kern.exists():
    write_fake_vmlinux(kern)
(shared / "initrd.img").write_bytes(b"initrd" * 100)
rootfs = shared / "rootfs.ext4"
if not rootfs.exists():
    with open(rootfs, "wb") as f:
        f.truncate(16 << 20)
opts = {"rootfs": str(rootfs), "vmlinux": str(kern), "initrd": str(shared / "initrd.img"), "init": None}
vm = reserve_vm(ctx.store, Subnet(ctx.cfg.subnet), name=name, image="fake-img", kernel="fake-kernel",
                backend="firecracker", vcpu=1, memory_mib=mem, overlay_size_mib=64, work_disk_size_mib=64,
                options=opts)
d = vms.vm_dir(ctx, vm)
d.mkdir(parents=True)
for f in (vms.OVERLAY, vms.WORK):
    with open(d / f, "wb") as fh:
        fh.write(f"{f} of {name}".encode())
        fh.truncate(8 << 20)
(d / vms.KNOWN_HOSTS).write_text(f"{vm['ip']} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyFor{name}\\n")
tap = vms.net_up(ctx, vm)
spec = vms.vm_spec(ctx, vm, tap)
vms.run_dir(ctx, vm).mkdir(parents=True, exist_ok=True)
h = vms.vm_driver(ctx, vm).launch(spec)
vms.save_handles(ctx, vm, h)
ctx.store.update_vm(vm["id"], state=vms.RUNNING)
print(json.dumps({"id": vm["id"], "ip": vm["ip"], "mac": vm["mac"], "tap": tap, "pid": h["pid"]}))
"""


def running_fc_vm(ns, name: str, shared: Path, memory_mib: int = 128) -> dict:
    """A running Firecracker(-double) VM built through banger's own services inside the netns ``ns``.

    (No kernel/image catalogue involved: the double needs only an ELF header and files that exist.)"""
    root = str(Path(__file__).resolve().parents[2])
    env = {**ns.env, "PYTHONPATH": root + os.pathsep + ns.env.get("PYTHONPATH", "")}
    cp = ns.run([__import__("sys").executable, "-c", _RUNNING_FC_VM, name, str(shared), str(memory_mib)], env=env)
    if cp.returncode != 0:
        raise AssertionError(f"could not build a running firecracker VM:\n{cp.stderr}")
    return json.loads(cp.stdout.strip().splitlines()[-1])
