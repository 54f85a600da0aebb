"""Guest stand-ins for network tests: a netns whose eth0 is wired to a real banger TAP.

A relay process opens the pooled TAP (``tap-pool-N``, as a VMM would) in the host test
namespace, then enters the guest namespace and creates its ``eth0`` as a second TAP; it
copies frames between the two. So the guest side is a full kernel network stack, and every
frame it sends enters the bridge through the banger TAP, exactly where the policy applies.

Also: an "outside" namespace on a veth (10.99.0.2, the host end 10.99.0.1) that has no
route to the guest subnet, small TCP/UDP servers that record who reached them, a client
that reports errno, and raw-frame helpers (send crafted Ethernet frames, sniff a device).
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field

from tests.support.netns import create_netns, delete_netns, py_argv, run_in_ns, spawn_in_ns

OUTSIDE_HOST_IP = "10.99.0.1"
OUTSIDE_IP = "10.99.0.2"

RELAY = r"""
import ctypes, fcntl, os, select, struct, sys
TUNSETIFF = 0x400454ca
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
def open_tap(name):
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd
host = open_tap(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
ns = os.open("/run/netns/" + sys.argv[2], os.O_RDONLY)
if libc.setns(ns, 0x40000000) != 0:
    raise OSError(ctypes.get_errno(), "setns")
guest = open_tap("eth0")
print("ready", flush=True)
peer = {host: guest, guest: host}
while True:
    for fd in select.select([host, guest], [], [])[0]:
        try:
            data = os.read(fd, 65536)
            os.write(peer[fd], data)
        except OSError:
            pass
"""

SERVER = r"""
import json, socket, sys, threading
proto, addr, port, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET, kind)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
if proto == "tcp":
    s.listen(16)
print("ready", flush=True)
while True:
    if proto == "tcp":
        c, peer = s.accept()
        print(json.dumps({"peer": peer[0], "port": peer[1]}), flush=True)
        try:
            c.sendall(("hello from " + tag + "\n").encode())
        finally:
            c.close()
    else:
        data, peer = s.recvfrom(65536)
        print(json.dumps({"peer": peer[0], "port": peer[1], "data": data.decode(errors="replace")}), flush=True)
        s.sendto(("echo from " + tag + ": ").encode() + data, peer)
"""

CLIENT = r"""
import errno, json, socket, sys
proto, addr, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
payload = sys.argv[5].encode() if len(sys.argv) > 5 else b"ping"
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET, kind)
s.settimeout(timeout)
try:
    s.connect((addr, port))
    if proto == "udp":
        s.send(payload)
    data = s.recv(4096)
    print(json.dumps({"ok": True, "data": data.decode(errors="replace")}))
except socket.timeout:
    print(json.dumps({"ok": False, "error": "timeout"}))
except OSError as e:
    print(json.dumps({"ok": False, "error": errno.errorcode.get(e.errno, str(e.errno))}))
"""

SNIFF = r"""
import json, socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((sys.argv[1], 0))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(65536)
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    print(json.dumps({"hex": data.hex()}), flush=True)
"""

SEND = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for h in sys.argv[2:]:
    s.send(bytes.fromhex(h))
print("sent", flush=True)
"""


class Lines:
    """Reads a background process's stdout lines without blocking (raw fd reads: select() on a
    buffered pipe would miss lines already sitting in Python's buffer). JSON lines are kept."""

    def __init__(self, p: subprocess.Popen):
        self.p = p
        self.fd = p.stdout.fileno()
        self.buf = b""
        self.raw: list[str] = []
        self.items: list[dict] = []

    def _read(self, timeout: float) -> bool:
        r, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not r:
            return False
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return False
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for ln in lines:
            t = ln.decode(errors="replace").strip()
            self.raw.append(t)
            if t.startswith("{"):
                self.items.append(json.loads(t))
        return True

    def poll(self, timeout: float = 0.0) -> list[dict]:
        """Everything printed so far (waiting up to ``timeout`` for the first new output)."""
        if self._read(timeout):
            while self._read(0.05):
                pass
        return self.items

    def wait_for(self, pred, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for it in self.items[seen:]:
                if pred(it):
                    return it
            seen = len(self.items)
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching line within {timeout}s; got {self.items[-20:]}")
            self._read(min(0.2, max(0.0, deadline - time.monotonic())))

    def wait_text(self, want: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while want not in self.raw:
            if time.monotonic() > deadline or (not self._read(0.2) and self.p.poll() is not None):
                self.p.kill()
                _o, err = self.p.communicate(timeout=10)
                raise AssertionError(f"process did not print {want!r} within {timeout}s: {err}")


def _wait_line(p: subprocess.Popen, want: str, timeout: float = 30.0) -> Lines:
    lines = Lines(p)
    lines.wait_text(want, timeout)
    return lines


@dataclass
class Procs:
    """Processes a test started, killed by their own handles at the end."""

    procs: list = field(default_factory=list)

    def add(self, p):
        self.procs.append(p)
        return p

    def close(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.kill()
            try:
                p.communicate(timeout=10)
            except Exception:
                pass


def serve(ns: str, procs: Procs, proto: str, addr: str, port: int, tag: str = "srv") -> Lines:
    return _wait_line(procs.add(spawn_in_ns(ns, py_argv(SERVER, proto, addr, port, tag))), "ready")


def sniff(ns: str, procs: Procs, dev: str) -> Lines:
    return _wait_line(procs.add(spawn_in_ns(ns, py_argv(SNIFF, dev))), "ready")


def connect(ns: str, proto: str, addr: str, port: int, timeout: float = 5.0, payload: str = "ping") -> dict:
    cp = run_in_ns(ns, py_argv(CLIENT, proto, addr, port, timeout, payload), timeout=timeout + 30)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout.strip().splitlines()[-1])


def connect_eventually(ns: str, proto: str, addr: str, port: int, deadline_s: float = 15.0, **kw) -> dict:
    """Retry until it works or the deadline passes (neighbour discovery, a server starting)."""
    deadline = time.monotonic() + deadline_s
    while True:
        r = connect(ns, proto, addr, port, **kw)
        if r["ok"] or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def send_frames(ns: str, dev: str, frames: list[bytes]) -> None:
    cp = run_in_ns(ns, py_argv(SEND, dev, *(f.hex() for f in frames)), timeout=30)
    assert cp.returncode == 0 and "sent" in cp.stdout, cp.stderr


@dataclass
class Guest:
    ns: str
    vm: dict
    tap: str
    relay: subprocess.Popen

    def run(self, argv, check: bool = False):
        return run_in_ns(self.ns, argv, check=check)


def attach_guest(host_ns: str, vm: dict, tap: str, procs: Procs, gateway: str = "172.30.0.1",
                 prefixlen: int = 24) -> Guest:
    """A guest namespace for ``vm`` whose eth0 is relayed to ``tap`` in ``host_ns``."""
    gns = create_netns("bgg")
    try:
        relay = procs.add(spawn_in_ns(host_ns, py_argv(RELAY, tap, gns)))
        _wait_line(relay, "ready")
        for argv in (["ip", "link", "set", "eth0", "address", vm["mac"]],
                     ["ip", "addr", "add", f"{vm['ip']}/{prefixlen}", "dev", "eth0"],
                     ["ip", "link", "set", "eth0", "up"],
                     ["ip", "route", "add", "default", "via", gateway]):
            run_in_ns(gns, argv, check=True)
    except BaseException:
        delete_netns(gns)
        raise
    return Guest(gns, vm, tap, relay)


def make_outside(host_ns: str) -> str:
    """A namespace standing in for the world beyond the host: 10.99.0.2 on a veth whose host end
    is 10.99.0.1; it has no route to the guest subnet (only masquerading brings replies back)."""
    ons = create_netns("bgo")
    try:
        run_in_ns(host_ns, ["ip", "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", ons],
                  check=True)
        run_in_ns(host_ns, ["ip", "addr", "add", f"{OUTSIDE_HOST_IP}/24", "dev", "up0"], check=True)
        run_in_ns(host_ns, ["ip", "link", "set", "up0", "up"], check=True)
        run_in_ns(ons, ["ip", "addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0"], check=True)
        run_in_ns(ons, ["ip", "link", "set", "eth0", "up"], check=True)
    except BaseException:
        delete_netns(ons)
        raise
    return ons


# ---------------------------------------------------------------------------- raw frames

def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_udp(src_ip: str, dst_ip: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0x1234, 0, 64, 17, 0,
                      socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + udp


def eth(dst: str, src: str, ethertype: int, body: bytes) -> bytes:
    frame = mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ethertype) + body
    return frame + b"\0" * max(0, 60 - len(frame))


def arp(op: int, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac_bytes(sha), socket.inet_aton(spa),
                       mac_bytes(tha), socket.inet_aton(tpa))


def vlan(vid: int, ethertype: int, body: bytes) -> bytes:
    return struct.pack("!HH", vid & 0x0FFF, ethertype) + body


def ipv6_udp(payload: bytes) -> bytes:
    # fe80::1 -> ff02::1, next header UDP (checksum left 0: it only has to be seen, not accepted)
    src = bytes.fromhex("fe800000000000000000000000000001")
    dst = bytes.fromhex("ff020000000000000000000000000001")
    udp = struct.pack("!HHHH", 5000, 5000, 8 + len(payload), 0) + payload
    return struct.pack("!IHBB", 0x60000000, len(udp), 17, 64) + src + dst + udp


def frames_seen(lines: Lines) -> list[bytes]:
    return [bytes.fromhex(x["hex"]) for x in lines.items]
