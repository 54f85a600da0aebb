# ruff: noqa: F811  (pytest fixtures imported from tests.support are re-declared as arguments)
"""Per-VM network policy against real nftables, netlink and TAPs, inside throwaway namespaces.

Each "guest" is a namespace whose eth0 is relayed to a real pooled banger TAP (see
tests/support/guestnet.py), so every frame it sends enters the bridge where a VMM's would.
The namespace standing in for the host has br_netfilter's bridge-nf-call-iptables at its
default (1 on this kernel) unless a test says otherwise; nothing here touches the root
namespace, so the host's own ip_forward, bridges or Docker tables do not matter.
"""

from __future__ import annotations

import json
import time

import pytest

from banger.names import Subnet
from banger.state.reservation import reserve_vm
from banger.state.store import Store
from tests.support.guestnet import (
    OUTSIDE_HOST_IP,
    OUTSIDE_IP,
    Procs,
    arp,
    attach_guest,
    connect,
    connect_eventually,
    eth,
    frames_seen,
    ipv4_udp,
    ipv6_udp,
    make_outside,
    send_frames,
    serve,
    sniff,
    vlan,
)
from tests.support.netns import delete_netns, netns, result  # noqa: F401

GW = "172.30.0.1"
BR_MAC = "06:00:ac:1e:00:01"
BCAST = "ff:ff:ff:ff:ff:ff"


class Lab:
    def __init__(self, ns):
        self.ns = ns
        self.procs = Procs()
        self.spaces: list[str] = []
        result(ns.call("hostnet.ensure_bridge(ctx)"))

    def vms(self, n: int) -> list[dict]:
        with Store(self.ns.home / "state.db") as s:
            return [reserve_vm(s, Subnet("172.30.0.0/24"), name=None, image="i", kernel="k", backend="qemu",
                               vcpu=1, memory_mib=256, overlay_size_mib=64, work_disk_size_mib=64,
                               nat=False).as_dict()  # the tests keep scratch keys (_ns) on them
                    for _ in range(n)]

    def tap(self, vm) -> str:
        return result(self.ns.call(f"pool.claim(ctx, {vm['id']!r})"))

    def guest(self, vm, net: str | None = "nat", allow=(), tap: str | None = None):
        """A guest stand-in on a claimed TAP; with ``net`` set, its policy applied."""
        tap = tap or self.tap(vm)
        g = attach_guest(self.ns.name, vm, tap, self.procs)
        self.spaces.append(g.ns)
        if net:
            self.apply(vm, tap, net, allow)
        return g

    @staticmethod
    def row(vm, net="nat", allow=()):
        return {"id": vm["id"], "ip": vm["ip"], "mac": vm["mac"], "name": vm["name"], "net": net,
                "allow": list(allow)}

    def apply(self, vm, tap, net="nat", allow=(), ports: str = "None"):
        return result(self.ns.call(f"policy.apply(ctx, {self.row(vm, net, allow)!r}, {tap!r}, ports={ports})"))

    def outside(self) -> str:
        o = make_outside(self.ns.name)
        self.spaces.append(o)
        return o

    def close(self):
        self.procs.close()
        for s in self.spaces:
            delete_netns(s)


@pytest.fixture
def lab(netns):
    lb = Lab(netns)
    try:
        yield lb
    finally:
        lb.close()


def ping_ok(g, ip: str, deadline_s: float = 15) -> bool:
    """Ping until one reply or the deadline (each try re-resolves a neighbour that failed)."""
    deadline = time.monotonic() + deadline_s
    while True:
        if g.run(["busybox", "ping", "-c", "1", "-W", "1", ip]).returncode == 0:
            return True
        if time.monotonic() > deadline:
            return False


def _marker_in(frames: list[bytes], marker: bytes) -> bool:
    return any(marker in f for f in frames)


def _arp_frames(frames: list[bytes]) -> list[tuple[str, str]]:
    """(sender MAC, sender IP) of every ARP frame."""
    import socket

    out = []
    for f in frames:
        if f[12:14] == b"\x08\x06":
            out.append((f[22:28].hex(":"), socket.inet_ntoa(f[28:32])))
    return out


def _spoof_round(lab, a, b, tag: str, sniffers) -> dict:
    """Send one batch of forged frames from a's guest, then a valid control frame; wait until the
    control frame reached every sniffer (frames from one TAP arrive in order), then report which
    forged frames were seen anywhere."""
    m = lambda s: f"{s}-{tag}".encode()  # noqa: E731
    forged = [
        eth(BCAST, a["mac"], 0x0800, ipv4_udp(b["ip"], "255.255.255.255", 9, 9, m("SPOOF-IP"))),
        eth(BCAST, b["mac"], 0x0800, ipv4_udp(a["ip"], "255.255.255.255", 9, 9, m("SPOOF-MAC"))),
        eth(BCAST, a["mac"], 0x0806, arp(2, a["mac"], b["ip"], BCAST, b["ip"])),  # "b's IP is at a's MAC"
        eth(BCAST, a["mac"], 0x0806, arp(1, b["mac"], a["ip"], "00:00:00:00:00:00", GW)),
        eth("33:33:00:00:00:01", a["mac"], 0x86DD, ipv6_udp(m("SPOOF-V6"))),
        eth(BCAST, a["mac"], 0x8100, vlan(5, 0x0800, ipv4_udp(a["ip"], "255.255.255.255", 9, 9, m("SPOOF-VLAN")))),
        eth(BR_MAC, a["mac"], 0x0800, ipv4_udp(a["ip"], "127.0.0.1", 9, 9, m("SPOOF-LO"))),
    ]
    control = eth(BCAST, a["mac"], 0x0800, ipv4_udp(a["ip"], "255.255.255.255", 9, 9, m("CONTROL")))
    for s in sniffers:
        s.poll()
    start = [len(s.items) for s in sniffers]
    send_frames(a["_ns"], "eth0", forged + [control])
    for s in sniffers:
        s.wait_for(lambda it: m("CONTROL").hex() in it["hex"])
    seen = [f for s, i in zip(sniffers, start, strict=True) for f in frames_seen(s)[i:]]
    arps = _arp_frames(seen)
    return {
        "ip": _marker_in(seen, m("SPOOF-IP")),
        "mac": _marker_in(seen, m("SPOOF-MAC")),
        "arp_ip": (a["mac"], b["ip"]) in arps,
        "arp_mac": (b["mac"], a["ip"]) in arps,
        "ipv6": _marker_in(seen, m("SPOOF-V6")),
        "vlan": _marker_in(seen, m("SPOOF-VLAN")),
        "loopback": _marker_in(seen, m("SPOOF-LO")),
    }


def test_forged_frames_from_a_guest_tap_are_dropped(lab):
    """A guest sending with another VM's IP or MAC (IPv4 or ARP), IPv6, a VLAN tag or to the host's
    loopback: nothing reaches the host's bridge or the other guest; its own frames do."""
    a, b = lab.vms(2)
    ga, gb = lab.guest(a, net=None), lab.guest(b, net=None)
    a["_ns"] = ga.ns
    sniffers = [sniff(lab.ns.name, lab.procs, "banger0"), sniff(gb.ns, lab.procs, "eth0")]

    # without the policy every forged frame gets through: the sniffers can see them
    before = _spoof_round(lab, a, b, "before", sniffers)
    assert all(before.values()), before

    lab.apply(a, ga.tap, "nat")
    lab.apply(b, gb.tap, "nat")
    after = _spoof_round(lab, a, b, "after", sniffers)
    assert not any(after.values()), after

    # and the guests' own traffic still flows: to the gateway and to each other
    assert ping_ok(ga, GW)
    assert ping_ok(ga, b["ip"])


def test_an_unguarded_banger_tap_has_no_network(lab):
    """Once banger's tables exist, a tap-pool-* port without a policy entry drops everything."""
    a, b = lab.vms(2)
    lab.guest(a, net="nat")
    gb = lab.guest(b, net=None)
    r = gb.run(["busybox", "ping", "-c", "1", "-W", "2", GW])
    assert r.returncode != 0
    lab.apply(b, gb.tap, "nat")
    assert ping_ok(gb, GW)


# ---------------------------------------------------------------------------- egress

@pytest.mark.parametrize("brnf", ["1", "0"])
def test_isolated_guest_routes_nowhere_but_its_allow_list(lab, brnf):
    lab.ns.set_sysctl("net.bridge.bridge-nf-call-iptables", brnf)
    out = lab.outside()
    srv = serve(out, lab.procs, "tcp", "0.0.0.0", 7001, "outside")
    serve(out, lab.procs, "tcp", "0.0.0.0", 7002, "outside-2")
    (a,) = lab.vms(1)
    g = lab.guest(a, net="isolated")
    # the host forwards (as it would for any NAT VM or Docker), yet the isolated guest gets nowhere
    lab.ns.set_sysctl("net.ipv4.ip_forward", "1")
    r = connect(g.ns, "tcp", OUTSIDE_IP, 7001)
    assert r == {"ok": False, "error": "EHOSTUNREACH"}, r  # rejected by banger's forward chain
    assert srv.poll(0.2) == []
    assert g.run(["busybox", "ping", "-c", "1", "-W", "2", OUTSIDE_IP]).returncode != 0

    lab.apply(a, g.tap, "isolated", allow=[f"{OUTSIDE_IP}:7001/tcp"])
    r = connect_eventually(g.ns, "tcp", OUTSIDE_IP, 7001)
    assert r == {"ok": True, "data": "hello from outside\n"}, r
    # masqueraded: the outside saw the host's address, it has no route to the guest subnet
    assert srv.wait_for(lambda it: True)["peer"] == OUTSIDE_HOST_IP
    assert connect(g.ns, "tcp", OUTSIDE_IP, 7002) == {"ok": False, "error": "EHOSTUNREACH"}
    assert g.run(["busybox", "ping", "-c", "1", "-W", "2", OUTSIDE_IP]).returncode != 0

    lab.apply(a, g.tap, "isolated", allow=[f"{OUTSIDE_IP}/32"])  # the whole address, any protocol
    assert connect_eventually(g.ns, "tcp", OUTSIDE_IP, 7002)["ok"]
    assert ping_ok(g, OUTSIDE_IP)


def test_nat_guest_reaches_outside_and_back_to_nothing_after_remove(lab):
    out = lab.outside()
    serve(out, lab.procs, "tcp", "0.0.0.0", 7001, "outside")
    (a,) = lab.vms(1)
    g = lab.guest(a, net="nat")
    assert connect_eventually(g.ns, "tcp", OUTSIDE_IP, 7001)["ok"]
    result(lab.ns.call(f"policy.remove(ctx, {a['id']!r})"))
    # no banger tables left: the guest is back to whatever the host does, which here is nothing
    # routed back (no masquerade): the connection cannot complete
    r = connect(g.ns, "tcp", OUTSIDE_IP, 7001, timeout=2)
    assert not r["ok"]


def test_nothing_from_outside_reaches_a_guest_directly(lab):
    """Even with a route to the guest subnet, the outside cannot open connections to a guest
    (only published ports, via DNAT, are let in)."""
    out = lab.outside()
    (a,) = lab.vms(1)
    g = lab.guest(a, net="nat")
    srv = serve(g.ns, lab.procs, "tcp", "0.0.0.0", 7100, "guest")
    lab.ns.set_sysctl("net.ipv4.ip_forward", "1")
    from tests.support.netns import run_in_ns

    run_in_ns(out, ["ip", "route", "add", "172.30.0.0/24", "via", OUTSIDE_HOST_IP], check=True)
    r = connect(out, "tcp", a["ip"], 7100, timeout=2)
    assert not r["ok"] and srv.poll(0.2) == []


@pytest.mark.parametrize("brnf", ["1", "0"])
def test_guests_reach_each_other_only_in_nat_mode(lab, brnf):
    lab.ns.set_sysctl("net.bridge.bridge-nf-call-iptables", brnf)
    a, b, c = lab.vms(3)
    ga, gb, gc = lab.guest(a, "nat"), lab.guest(b, "nat"), lab.guest(c, "isolated")
    serve(gb.ns, lab.procs, "tcp", "0.0.0.0", 7200, "b")
    serve(gc.ns, lab.procs, "tcp", "0.0.0.0", 7200, "c")
    sa = serve(ga.ns, lab.procs, "tcp", "0.0.0.0", 7200, "a")
    assert connect_eventually(ga.ns, "tcp", b["ip"], 7200) == {"ok": True, "data": "hello from b\n"}
    assert not connect(ga.ns, "tcp", c["ip"], 7200, timeout=2)["ok"]  # nat -> isolated
    assert not connect(gc.ns, "tcp", a["ip"], 7200, timeout=2)["ok"]  # isolated -> nat
    assert sa.poll(0.2) == []
    # nor through the host as a router (frames to the bridge MAC addressed to another guest)
    gc.run(["ip", "neigh", "replace", a["ip"], "lladdr", BR_MAC, "dev", "eth0"], check=True)
    assert not connect(gc.ns, "tcp", a["ip"], 7200, timeout=2)["ok"]
    assert sa.poll(0.2) == []
    # the isolated guest still reaches the host (ICMP to the gateway)
    assert ping_ok(gc, GW)


# ---------------------------------------------------------------------------- guest -> host

def test_guest_reaches_only_the_host_services_it_was_given(lab):
    out = lab.outside()  # gives the host a second address, 10.99.0.1
    del out
    host = lab.ns.name
    srv = serve(host, lab.procs, "tcp", "0.0.0.0", 7300, "host")
    (a,) = lab.vms(1)
    g = lab.guest(a, net="nat")
    assert ping_ok(g, GW)
    for addr in (GW, OUTSIDE_HOST_IP):
        assert connect(g.ns, "tcp", addr, 7300) == {"ok": False, "error": "EHOSTUNREACH"}, addr
    assert srv.poll(0.2) == []
    # the host still opens connections to the guest (SSH's direction) and gets the replies
    serve(g.ns, lab.procs, "tcp", "0.0.0.0", 22, "sshd")
    assert connect_eventually(host, "tcp", a["ip"], 22) == {"ok": True, "data": "hello from sshd\n"}

    lab.apply(a, g.tap, "nat", allow=[f"{GW}:7300/tcp"])
    assert connect(g.ns, "tcp", GW, 7300) == {"ok": True, "data": "hello from host\n"}
    assert connect(g.ns, "tcp", OUTSIDE_HOST_IP, 7300) == {"ok": False, "error": "EHOSTUNREACH"}


def test_guest_cannot_reach_host_loopback_even_with_route_localnet(lab):
    """route_localnet is on for the bridge while ports are published (CVE-2020-8558's setting):
    a frame to the host's MAC addressed to 127.0.0.1 still never reaches a loopback service."""
    host = lab.ns.name
    srv = serve(host, lab.procs, "udp", "0.0.0.0", 7400, "host")
    (a,) = lab.vms(1)
    g = lab.guest(a, net=None)
    lab.ns.set_sysctl("net.ipv4.conf.banger0.route_localnet", "1")
    frame = lambda dst, tag: eth(BR_MAC, a["mac"], 0x0800, ipv4_udp(a["ip"], dst, 4000, 7400, tag))  # noqa: E731
    lab.ns.run(["ip", "neigh", "replace", a["ip"], "lladdr", a["mac"], "dev", "banger0"], check=True)
    # without banger's rules the kernel delivers it: the test would catch a regression
    send_frames(g.ns, "eth0", [frame("127.0.0.1", b"LOOPBACK-1"), frame(GW, b"GATEWAY-1")])
    got = srv.wait_for(lambda it: it["data"] == "GATEWAY-1")
    assert any(it["data"] == "LOOPBACK-1" for it in srv.items), srv.items

    lab.apply(a, g.tap, "isolated", allow=[f"{GW}:7400/udp"], ports="[ports.parse('9999:80')]")
    assert lab.ns.sysctl("net.ipv4.conf.banger0.route_localnet") == "1"
    send_frames(g.ns, "eth0", [frame("127.0.0.1", b"LOOPBACK-2"), frame(GW, b"GATEWAY-2")])
    srv.wait_for(lambda it: it["data"] == "GATEWAY-2")
    assert not any(it["data"] == "LOOPBACK-2" for it in srv.items), srv.items
    del got


# ---------------------------------------------------------------------------- published ports

HTTP = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("guest " + sys.argv[3] + " says hi to " + self.client_address[0] + "\n").encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H)
print("ready", flush=True)
s.serve_forever()
"""


def _curl(ns: str, url: str, timeout: float = 5):
    from tests.support.netns import run_in_ns

    return run_in_ns(ns, ["curl", "-sS", "--max-time", str(timeout), url], timeout=timeout + 30)


def _curl_eventually(ns: str, url: str, deadline_s: float = 15):
    deadline = time.monotonic() + deadline_s
    while True:
        cp = _curl(ns, url)
        if cp.returncode == 0 or time.monotonic() > deadline:
            return cp
        time.sleep(0.2)


def test_published_tcp_port_reaches_the_guest_from_host_addresses_and_localhost(lab):
    from tests.support.guestnet import _wait_line
    from tests.support.netns import py_argv, spawn_in_ns

    out = lab.outside()
    (a,) = lab.vms(1)
    g = lab.guest(a, net=None)
    p = lab.procs.add(spawn_in_ns(g.ns, py_argv(HTTP, a["ip"], 80, a["name"])))
    _wait_line(p, "ready")
    lab.ns.set_sysctl("net.ipv4.ip_forward", "0")
    doc = result(lab.ns.call(f"publish.publish(ctx, {lab.row(a, 'isolated')!r}, '8080:80')"))
    assert doc == {"vm_id": a["id"], "published": ["8080:80/tcp"], "live": False}
    r = lab.apply(a, g.tap, "isolated")  # what a VM start does: the claim goes live
    assert r["ports"] == ["8080:80/tcp"] and r["ip_forward_changed"] is True
    assert lab.ns.sysctl("net.ipv4.ip_forward") == "1"  # reachable from other hosts needs forwarding

    cp = _curl_eventually(lab.ns.name, "http://127.0.0.1:8080/")
    assert cp.returncode == 0 and cp.stdout == f"guest {a['name']} says hi to {GW}\n", cp
    cp = _curl(lab.ns.name, f"http://{OUTSIDE_HOST_IP}:8080/")  # a host address, from the host
    assert cp.returncode == 0 and cp.stdout == f"guest {a['name']} says hi to {OUTSIDE_HOST_IP}\n", cp
    cp = _curl_eventually(out, f"http://{OUTSIDE_HOST_IP}:8080/")  # from another machine
    assert cp.returncode == 0 and cp.stdout == f"guest {a['name']} says hi to {OUTSIDE_IP}\n", cp
    # the guest itself does not get the host's port 8080 (guest -> host services stay closed)
    assert connect(g.ns, "tcp", GW, 8080) == {"ok": False, "error": "EHOSTUNREACH"}

    listed = result(lab.ns.call(f"publish.list_ports(ctx, {a['id']!r})"))
    assert [(x["spec"], x["active"]) for x in listed] == [("8080:80/tcp", True)]
    result(lab.ns.call(f"policy.remove(ctx, {a['id']!r})"))  # a VM stop
    assert _curl(lab.ns.name, "http://127.0.0.1:8080/", timeout=2).returncode != 0
    listed = result(lab.ns.call(f"publish.list_ports(ctx, {a['id']!r})"))
    assert [(x["spec"], x["active"]) for x in listed] == [("8080:80/tcp", False)]  # the claim follows the VM
    lab.apply(a, g.tap, "isolated")  # started again
    assert _curl_eventually(lab.ns.name, "http://127.0.0.1:8080/").returncode == 0

    result(lab.ns.call(f"publish.unpublish(ctx, {lab.row(a, 'isolated')!r}, '8080')"))
    assert _curl(lab.ns.name, "http://127.0.0.1:8080/", timeout=2).returncode != 0
    assert lab.ns.sysctl("net.ipv4.conf.banger0.route_localnet") == "0"


def test_published_udp_port_echoes_through_localhost_and_host_address(lab):
    out = lab.outside()
    (a,) = lab.vms(1)
    g = lab.guest(a, net="isolated")
    srv = serve(g.ns, lab.procs, "udp", "0.0.0.0", 53, "guest")
    doc = result(lab.ns.call(f"publish.publish(ctx, {lab.row(a, 'isolated')!r}, ['5353:53/udp', "
                             f"'127.0.0.1:5454:53/udp'])"))
    assert doc["live"] is True  # the VM runs: the rules went in at once
    r = connect_eventually(lab.ns.name, "udp", "127.0.0.1", 5353, payload="q1")
    assert r == {"ok": True, "data": "echo from guest: q1"}, r
    assert connect(lab.ns.name, "udp", "127.0.0.1", 5454, payload="q2") == {"ok": True, "data": "echo from guest: q2"}
    assert connect_eventually(out, "udp", OUTSIDE_HOST_IP, 5353, payload="q3") == \
        {"ok": True, "data": "echo from guest: q3"}
    # 5454 is bound to 127.0.0.1 only: not from another machine
    assert not connect(out, "udp", OUTSIDE_HOST_IP, 5454, payload="q4", timeout=2)["ok"]
    peers = {it["data"]: it["peer"] for it in srv.poll(0.5)}
    assert peers["q1"] == GW and peers["q3"] == OUTSIDE_IP and "q4" not in peers


def test_a_host_port_is_published_once(lab):
    a, b = lab.vms(2)
    g = lab.guest(a, net="nat")
    ra, rb = lab.row(a), lab.row(b)
    result(lab.ns.call(f"publish.publish(ctx, {ra!r}, '8080:80')"))
    doc = lab.ns.call(f"publish.publish(ctx, {rb!r}, ['9000:90', '127.0.0.1:8080:80'])")
    assert doc["error"] == "conflict" and doc["exit"] == 4
    assert f"8080/tcp is already published by VM {a['name']}" in doc["message"]
    assert f"banger vm port rm {a['name']} 8080/tcp" in doc["hint"]
    assert result(lab.ns.call(f"publish.list_ports(ctx, {b['id']!r})")) == []  # all or nothing: no 9000
    assert result(lab.ns.call(f"publish.publish(ctx, {rb!r}, '8080:80/udp')"))["published"] == ["8080:80/udp"]

    # a host process holding a port
    host = serve(lab.ns.name, lab.procs, "tcp", "127.0.0.1", 9090, "hostproc")
    del host
    doc = lab.ns.call(f"publish.publish(ctx, {ra!r}, '9090:80')")
    assert doc["error"] == "conflict" and "9090/tcp is in use on the host" in doc["message"]
    assert "(python" in doc["message"] and "127.0.0.1:9090/tcp" in doc["message"]
    serve(lab.ns.name, lab.procs, "udp", "0.0.0.0", 9091, "hostproc")
    doc = lab.ns.call(f"publish.publish(ctx, {ra!r}, '10.1.2.3:9091:80/udp')")
    assert doc["error"] == "usage" and "10.1.2.3 is not an address of this host" in doc["message"]
    doc = lab.ns.call(f"publish.publish(ctx, {ra!r}, '9091:80/udp')")
    assert doc["error"] == "conflict" and "9091/udp is in use on the host" in doc["message"]
    assert [x["spec"] for x in result(lab.ns.call(f"publish.list_ports(ctx, {a['id']!r})"))] == ["8080:80/tcp"]
    # a host process that took a claimed port while the VM was stopped: the start refuses clearly
    result(lab.ns.call(f"policy.remove(ctx, {a['id']!r})"))
    result(lab.ns.call(f"publish.publish(ctx, {ra!r}, '9092:80')"))
    serve(lab.ns.name, lab.procs, "tcp", "0.0.0.0", 9092, "late")
    doc = lab.ns.call(f"policy.apply(ctx, {ra!r}, {g.tap!r})")
    assert doc["error"] == "conflict" and "9092/tcp is in use on the host" in doc["message"], doc
    assert result(lab.ns.call("policy.active(ctx)")) == []  # nothing half-applied


# ---------------------------------------------------------------------------- state management

def _ours(ns) -> list[dict]:
    return [x for x in ns.nft_ruleset() if any(k in x and x[k].get("table", x[k].get("name")) == "banger-banger0"
                                                for k in ("rule", "chain", "map", "table"))]


def _handles(ns, vm_id: str) -> list:
    return sorted((x["rule"]["chain"], x["rule"]["handle"]) for x in ns.nft_ruleset()
                  if "rule" in x and f"vm={vm_id} " in (x["rule"].get("comment") or ""))


def test_policy_is_idempotent_and_removed_as_a_unit(lab):
    a, b = lab.vms(2)
    ta, tb = lab.tap(a), lab.tap(b)
    r1 = lab.apply(a, ta, "isolated", allow=["10.0.0.0/8:443"], ports="[ports.parse('8080:80')]")
    assert r1["changed"] is True
    ha = _handles(lab.ns, a["id"])
    assert len(ha) > 10
    r2 = lab.apply(a, ta, "isolated", allow=["10.0.0.0/8:443"], ports="[ports.parse('8080:80')]")
    assert r2["changed"] is False and _handles(lab.ns, a["id"]) == ha
    lab.apply(b, tb, "nat")
    hb = _handles(lab.ns, b["id"])
    assert _handles(lab.ns, a["id"]) == ha  # adding b left a alone

    act = {v["vm_id"]: v for v in result(lab.ns.call("policy.active(ctx)"))}
    assert act[a["id"]]["tap"] == ta and act[a["id"]]["ip"] == a["ip"] and act[a["id"]]["mode"] == "isolated"
    assert act[a["id"]]["ports"] == ["8080:80/tcp"] and act[b["id"]]["masquerade"] is True

    # gc's view: b is not live any more
    stale = result(lab.ns.call(f"policy.stale_rules(ctx, [{a['id']!r}])"))
    assert [s["vm_id"] for s in stale] == [b["id"]]
    rr = result(lab.ns.call(f"policy.reap_rules(ctx, [{b['id']!r}])"))
    assert rr["removed"] > 0 and rr["tables_removed"] is False
    assert _handles(lab.ns, b["id"]) == [] and _handles(lab.ns, a["id"]) == ha
    maps = {x["map"]["name"]: x["map"].get("elem", []) for x in lab.ns.nft_ruleset() if "map" in x}
    assert not any(b["ip"] in json.dumps(v) or tb in json.dumps(v) for v in maps.values())
    del hb

    # re-applying with another TAP moves the guard; "none" takes everything away
    tc = "tap-pool-77"
    lab.apply(a, tc, "isolated", allow=["10.0.0.0/8:443"], ports="[ports.parse('8080:80')]")
    guard = next(x["map"] for x in lab.ns.nft_ruleset() if "map" in x and x["map"]["name"] == "guard")
    assert [e[0] for e in guard["elem"]] == [tc]
    r = lab.apply(a, tc, "none")
    assert r["changed"] is True
    assert _ours(lab.ns) == []  # the last VM gone takes both tables with it
    assert result(lab.ns.call(f"policy.remove(ctx, {a['id']!r})"))["removed"] == 0  # idempotent


def test_a_reused_ip_or_tap_evicts_the_stale_owner(lab):
    a, b = lab.vms(2)
    lab.apply(a, "tap-pool-5", "nat")
    # b takes a's address and TAP (a's row is gone, gc has not run yet)
    b2 = {**b, "ip": a["ip"], "mac": a["mac"]}
    r = result(lab.ns.call(f"policy.apply(ctx, {lab.row(b2)!r}, 'tap-pool-5', ports=())"))
    assert r["evicted"] == [a["id"]]
    act = {v["vm_id"]: v for v in result(lab.ns.call("policy.active(ctx)"))}
    assert act[b["id"]]["ip"] == a["ip"] and act[b["id"]]["tap"] == "tap-pool-5"
    assert act[a["id"]]["ip"] is None and act[a["id"]]["tap"] is None  # only chains left: gc reaps them
    assert [s["vm_id"] for s in result(lab.ns.call(f"policy.stale_rules(ctx, [{b['id']!r}])"))] == [a["id"]]


def test_a_live_port_of_another_vm_is_evicted_only_without_its_claim(lab):
    a, b = lab.vms(2)
    result(lab.ns.call(f"publish.publish(ctx, {lab.row(a)!r}, '8080:80')"))
    lab.apply(a, "tap-pool-1", "nat")
    doc = lab.ns.call(f"policy.apply(ctx, {lab.row(b)!r}, 'tap-pool-2', ports=[ports.parse('8080:81')])")
    assert doc["error"] == "conflict" and f"published by VM {a['id']}" in doc["message"], doc
    # a's claim gone (its row deleted) but its rules left behind: b takes the port over
    with Store(lab.ns.home / "state.db") as s:
        s.execute("DELETE FROM published_ports")
    r = result(lab.ns.call(f"policy.apply(ctx, {lab.row(b)!r}, 'tap-pool-2', ports=[ports.parse('8080:81')])"))
    assert r["evicted"] == [a["id"]]
    act = {v["vm_id"]: v for v in result(lab.ns.call("policy.active(ctx)"))}
    assert act[b["id"]]["ports"] == ["8080:81/tcp"]


def test_a_damaged_base_chain_is_rebuilt(lab):
    (a,) = lab.vms(1)
    lab.apply(a, "tap-pool-1", "isolated")
    fwd = [x["rule"] for x in lab.ns.nft_ruleset() if "rule" in x and x["rule"]["chain"] == "from_guest"
           and x["rule"]["family"] == "ip"]
    lab.ns.run(["nft", "delete", "rule", "ip", "banger-banger0", "from_guest", "handle",
                str(fwd[-1]["handle"])], check=True)  # someone deleted the final reject
    r = lab.apply(a, "tap-pool-1", "isolated")
    assert r["changed"] is True
    fwd = [x["rule"] for x in lab.ns.nft_ruleset() if "rule" in x and x["rule"]["chain"] == "from_guest"
           and x["rule"]["family"] == "ip"]
    assert len(fwd) == 3 and "reject" in fwd[-1]["expr"][0]


def test_ip_forward_only_when_a_vm_needs_it_and_the_report_says_why(lab):
    a, b = lab.vms(2)
    lab.ns.set_sysctl("net.ipv4.ip_forward", "0")
    lab.apply(a, "tap-pool-1", "isolated")
    lab.apply(a, "tap-pool-1", "isolated", ports="[ports.parse('127.0.0.1:8080:80')]")  # loopback only
    assert lab.ns.sysctl("net.ipv4.ip_forward") == "0"
    rep = result(lab.ns.call("policy.forwarding_report(ctx)"))
    assert rep["ip_forward"] is False and rep["needed_by"] == [] and rep["status"] == "ok"
    assert rep["route_localnet"] is True

    r = lab.apply(b, "tap-pool-2", "nat")
    assert r["ip_forward_changed"] is True and lab.ns.sysctl("net.ipv4.ip_forward") == "1"
    rep = result(lab.ns.call("policy.forwarding_report(ctx)"))
    assert rep["status"] == "ok" and [x["vm_id"] for x in rep["needed_by"]] == [b["id"]]
    assert b["id"] in rep["detail"] and "nat" in rep["detail"]
    assert rep["enabled_by_banger"]["reason"] == f"VM {b['id']} uses NAT"

    result(lab.ns.call(f"policy.remove(ctx, {b['id']!r})"))
    assert lab.ns.sysctl("net.ipv4.ip_forward") == "1"  # never switched off behind another tool's back
    rep = result(lab.ns.call("policy.forwarding_report(ctx)"))
    assert rep["status"] == "warn" and "no banger VM needs it" in rep["detail"] and "ip_forward=0" in rep["hint"]

    # another table's forward chain dropping by default is named (Docker does this)
    lab.ns.run(["nft", "add", "table", "ip", "filter"], check=True)
    lab.ns.run(["nft", "add", "chain", "ip", "filter", "FORWARD", "{ type filter hook forward priority 0; "
                "policy drop; }"], check=True)
    lab.apply(b, "tap-pool-2", "nat")
    rep = result(lab.ns.call("policy.forwarding_report(ctx)"))
    assert rep["status"] == "warn" and rep["foreign_forward_drop"] == ["ip filter FORWARD"]
    assert "DOCKER-USER -i banger0" in rep["hint"]


def test_concurrent_applies_never_duplicate(lab, tmp_path):
    from tests.support.procs import Barrier

    vms = lab.vms(4)
    go = Barrier(tmp_path / "go", 7)
    procs = [lab.ns.spawn_call(f"policy.apply(ctx, {lab.row(v)!r}, 'tap-pool-{i}', ports=())", go)
             for i, v in enumerate(vms)]
    procs += [lab.ns.spawn_call(f"policy.apply(ctx, {lab.row(vms[0])!r}, 'tap-pool-0', ports=())", go)
              for _ in range(3)]
    go.release()
    for p in procs:
        so, se = p.communicate(timeout=120)
        assert p.returncode == 0 and '"value"' in so, (so, se)
    counts = {v["id"]: len(_handles(lab.ns, v["id"])) for v in vms}
    assert len(set(counts.values())) == 1 and all(counts.values()), counts
    base = [x for x in lab.ns.nft_ruleset() if "rule" in x and (x["rule"].get("comment") or "").startswith(
        "banger base")]
    assert len(base) == 2 + 2 + 2 + 1 + 1 + 2 + 3 + 3 + 3 + 1 + 4  # one copy of the base rules



_PENDING = """
import json, os, sys, time
from banger.context import Ctx
from banger.net import policy
from banger.vms import runtime
ctx = Ctx()
row, gate = json.loads(sys.argv[1]), sys.argv[2]

def go(n):  # the test's file barrier
    while not os.path.exists(f"{gate}/go{n}"):
        time.sleep(0.01)

tap, pending = runtime.net_up(ctx, row, background=True)
flags = lambda: int(open(f"/sys/class/net/{tap}/flags").read(), 16) & 1
print(json.dumps({"tap": tap, "up": flags()}), flush=True)
go(1)                 # the test attached a guest on the TAP and sent frames meanwhile
pending.start()
pending.wait()        # the policy is in, and still the TAP is down ...
print(json.dumps({"policy_in_up": flags(), "active": [p["vm_id"] for p in policy.active(ctx)]}), flush=True)
go(2)
pending.ready()       # ... until ready()
print(json.dumps({"ready_up": flags()}), flush=True)
go(3)
"""


def test_a_vms_tap_passes_no_frame_until_its_policy_is_in(lab, tmp_path):
    """`vm create` applies a VM's policy from a thread while its VMM starts (runtime.PendingPolicy): the
    TAP stays down meanwhile, so even the first VM (no banger tables yet, so nothing would drop an
    unguarded port) sends nothing to the bridge before its guard exists; after ready() its own frames
    pass (the guard in place), forged ones still do not."""
    import json as _json

    from tests.support.guestnet import Lines
    from tests.support.netns import py_argv

    (a,) = lab.vms(1)
    row = {**lab.row(a, "isolated"), "options": {"net": "isolated", "allow": []}}
    out = Lines(lab.procs.add(lab.ns.spawn(py_argv(_PENDING, _json.dumps(row), str(tmp_path)))))
    first = out.wait_for(lambda it: "tap" in it, 60)
    assert first["up"] == 0, "the TAP must be down while its policy is pending"
    assert result(lab.ns.call("policy.active(ctx)")) == []  # no tables: an up port would pass anything now
    g = attach_guest(lab.ns.name, a, first["tap"], lab.procs)
    lab.spaces.append(g.ns)
    bridge = sniff(lab.ns.name, lab.procs, "banger0")
    own = lambda tag: eth(BCAST, a["mac"], 0x0800, ipv4_udp(a["ip"], "255.255.255.255", 9, 9, tag))  # noqa: E731
    forged = lambda tag: eth(BCAST, a["mac"], 0x0800, ipv4_udp("172.30.0.99", "255.255.255.255", 9, 9, tag))  # noqa: E731
    send_frames(g.ns, "eth0", [own(b"EARLY-OWN"), forged(b"EARLY-FORGED")])
    (tmp_path / "go1").touch()
    mid = out.wait_for(lambda it: "policy_in_up" in it, 60)
    assert mid["policy_in_up"] == 0 and mid["active"] == [a["id"]]
    send_frames(g.ns, "eth0", [own(b"MID-OWN")])
    (tmp_path / "go2").touch()
    assert out.wait_for(lambda it: "ready_up" in it, 60)["ready_up"] == 1
    deadline = time.monotonic() + 20
    while not _marker_in(frames_seen(bridge), b"LATE-OWN"):  # the control: its own frames pass now
        assert time.monotonic() < deadline, "a guarded, up TAP must pass the guest's own frames"
        send_frames(g.ns, "eth0", [forged(b"LATE-FORGED"), own(b"LATE-OWN")])
        bridge.poll(0.5)
    seen = frames_seen(bridge)
    assert not any(_marker_in(seen, m) for m in (b"EARLY-OWN", b"EARLY-FORGED", b"MID-OWN", b"LATE-FORGED"))
    (tmp_path / "go3").touch()
