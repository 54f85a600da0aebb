"""Everyday networking on real QEMU guests, every banger command inside a throwaway netns (issue 13).

Published ports (TCP and UDP, from the host's addresses, from 127.0.0.1 and from a namespace
standing in for the outside world), a taken host port refused with nothing left, rules that leave
with stop/delete and come back with start; names that resolve from the host and from other
guests; isolated guests that reach only what --allow gives them; guest DNS that follows the host's
resolvers through a local stub; VMs that expire. Independent checks use nft, getent, curl and the
guests' own files. At most two guests run at once.
"""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from tests.support.e2e import default_image, default_kernel, netns, pulled_default_kernel, vmenv, wait_for  # noqa: F401
from tests.support.guestnet import (
    OUTSIDE_HOST_IP,
    OUTSIDE_IP,
    Procs,
    connect,
    frames_seen,
    make_outside,
    serve,
    sniff,
)
from tests.support.netns import delete_netns, run_in_ns

# a tiny server for the guest (the default image has perl-base, not python): HTTP on TCP, echo on UDP
SERVER_PL = r"""
use strict; use IO::Socket::INET;
my ($proto, $port, $tag) = @ARGV;
if ($proto eq "tcp") {
    my $s = IO::Socket::INET->new(LocalPort => $port, Listen => 16, ReuseAddr => 1, Proto => "tcp") or die "$!";
    while (my $c = $s->accept) {
        while (my $l = <$c>) { last if $l =~ /^\r?\n$/ }
        print $c "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from $tag to " . $c->peerhost . "\n";
        close $c;
    }
} else {
    my $u = IO::Socket::INET->new(LocalPort => $port, Proto => "udp") or die "$!";
    while (1) { my $d; my $peer = $u->recv($d, 4096); $u->send("echo from $tag: $d", 0, $peer); }
}
"""


@pytest.fixture
def procs():
    p = Procs()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def outside(vmenv):
    ons = make_outside(vmenv.name)
    try:
        yield ons
    finally:
        delete_netns(ons)


def sh(env, vm: str, script: str, check: bool = True):
    return env.banger("vm", "exec", vm, "--", "sh", "-c", script, check=check, timeout=120)


def start_servers(env, vm: str, tmp_path, *servers) -> None:
    """Start ``(proto, port)`` servers in the guest, detached from the SSH session."""
    src = tmp_path / "srv.pl"
    src.write_text(SERVER_PL)
    env.banger("vm", "cp", str(src), f"{vm}:/root/")
    for proto, port in servers:
        sh(env, vm, f"setsid perl /root/srv.pl {proto} {port} {vm} </dev/null >/root/srv-{port}.log 2>&1 &")


def curl(ns: str, url: str, timeout: float = 5.0):
    return run_in_ns(ns, ["curl", "-sS", "--max-time", str(timeout), url], timeout=timeout + 30)


def curl_until(ns: str, url: str, want: str, deadline_s: float = 60.0) -> str:
    deadline = time.monotonic() + deadline_s
    while True:
        cp = curl(ns, url)
        if cp.returncode == 0 and want in cp.stdout:
            return cp.stdout
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} from {ns}: {cp.returncode} {cp.stdout!r} {cp.stderr!r}")
        time.sleep(0.3)


def udp_until(ns: str, addr: str, port: int, want: str, deadline_s: float = 60.0) -> dict:
    deadline = time.monotonic() + deadline_s
    while True:
        r = connect(ns, "udp", addr, port, timeout=2.0, payload="ping")
        if r["ok"] and want in r["data"]:
            return r
        if time.monotonic() > deadline:
            raise AssertionError(f"udp {addr}:{port} from {ns}: {r}")


def dnat_rules(env) -> list[dict]:
    """Every DNAT statement in the namespace's ruleset (independent of banger's own reading)."""
    out = []
    for item in env.nft_ruleset():
        r = item.get("rule")
        if r:
            for e in r.get("expr", []):
                if "dnat" in e:
                    out.append({"chain": r["chain"], "table": r["table"], **e["dnat"]})
    return out


def guarded(env) -> dict:
    """TAP -> chain of the layer-2 guard map in banger's bridge table."""
    for item in env.nft_ruleset():
        m = item.get("map")
        if m and m["family"] == "bridge" and m["name"] == "guard":
            return {e[0]: e[1]["jump"]["target"] for e in m.get("elem", [])}
    return {}


def claims(env) -> list[tuple]:
    with sqlite3.connect(env.home / "state.db") as c:
        return sorted(c.execute("SELECT vm_id, proto, host_port, guest_port FROM published_ports").fetchall())


def guest_reaches(env, vm: str, addr: str, port: int) -> str | None:
    """What a TCP connection from the guest to addr:port reads (None if it cannot connect)."""
    cp = sh(env, vm, f"timeout 5 bash -c 'exec 3<>/dev/tcp/{addr}/{port}; head -c 200 <&3' 2>&1", check=False)
    return cp.stdout if cp.returncode == 0 else None


def test_published_ports_reach_the_guest_follow_it_and_a_taken_port_is_refused(vmenv, outside, procs, tmp_path):
    env = vmenv
    v = env.banger_json("vm", "create", "--name", "web", "--net", "isolated", "-p", "8080:80",
                        "-p", "5353:53/udp", "--memory", "512", timeout=400)["data"]
    assert v["net"] == "isolated" and [p["spec"] for p in v["ports"]] == ["5353:53/udp", "8080:80/tcp"]
    assert all(p["active"] for p in v["ports"])
    assert {(d["addr"], d["port"]) for d in dnat_rules(env)} == {(v["ip"], 80), (v["ip"], 53)}
    assert guarded(env) == {v["tap"]: f"vm-{v['id']}"}  # anti-spoofing on its TAP, whatever its mode
    start_servers(env, "web", tmp_path, ("tcp", 80), ("udp", 53))

    # TCP: from the host itself via 127.0.0.1 and via one of its addresses, and from outside the host
    assert "hello from web" in curl_until(env.name, "http://127.0.0.1:8080/", "hello from web")
    assert "hello from web" in curl_until(env.name, f"http://{OUTSIDE_HOST_IP}:8080/", "hello from web")
    got = curl_until(outside, f"http://{OUTSIDE_HOST_IP}:8080/", "hello from web")
    assert got.strip().endswith(f"to {OUTSIDE_IP}")  # a real client address, not masqueraded
    # UDP echo through the published UDP port, from the host and from outside
    assert udp_until(env.name, "127.0.0.1", 5353, "echo from web: ping")["ok"]
    assert udp_until(outside, OUTSIDE_HOST_IP, 5353, "echo from web: ping")["ok"]

    # a second VM asking for the same host port fails clearly, before anything is built
    before = claims(env)
    dup = env.banger_json("vm", "create", "--name", "web2", "-p", "8080:81", check=False, timeout=120)
    assert dup["_exit"] == 4 and dup["error"]["code"] == "conflict"
    assert "8080/tcp" in dup["error"]["message"] and "web" in dup["error"]["message"]
    assert [x["name"] for x in env.banger_json("vm", "list")["data"]] == ["web"] and claims(env) == before
    # a host port a host process has bound: refused too (create and port add), naming the process
    hostsrv = serve(env.name, procs, "tcp", "0.0.0.0", 9090, "host")
    for argv in (("vm", "create", "--name", "web3", "-p", "9090:80"), ("vm", "port", "add", "web", "9090:80")):
        r = env.banger_json(*argv, check=False, timeout=120)
        assert r["_exit"] == 4 and "in use on the host" in r["error"]["message"], r
        assert "python" in r["error"]["message"]
    assert [x["name"] for x in env.banger_json("vm", "list")["data"]] == ["web"] and claims(env) == before

    # the guest reaches no host service it was not given, on any host address, and nothing outside
    for addr in ("172.30.0.1", OUTSIDE_HOST_IP):
        assert guest_reaches(env, "web", addr, 9090) is None
    out_srv = serve(outside, procs, "tcp", "0.0.0.0", 8000, "outside")
    assert guest_reaches(env, "web", OUTSIDE_IP, 8000) is None
    assert not hostsrv.poll(0.2) and not out_srv.poll(0.2)  # nobody connected to either

    # a port added to the running VM is live at once; removed, it is gone
    r = env.banger_json("vm", "port", "add", "web", "8081:80")["data"]
    assert r["live"] and "8081:80/tcp" in [p["spec"] for p in r["ports"]]
    curl_until(env.name, "http://127.0.0.1:8081/", "hello from web")
    env.banger_json("vm", "port", "rm", "web", "8081")
    assert curl(env.name, "http://127.0.0.1:8081/").returncode != 0
    listed = env.banger_json("vm", "port", "list", "web")["data"]
    assert [(p["spec"], p["active"]) for p in listed] == [("5353:53/udp", True), ("8080:80/tcp", True)]

    # stop: the rules go, the claims stay; start: the rules come back
    env.banger_json("vm", "stop", "web", timeout=120)
    assert dnat_rules(env) == [] and curl(env.name, "http://127.0.0.1:8080/").returncode != 0
    assert [(p["spec"], p["active"]) for p in env.banger_json("vm", "port", "list", "web")["data"]] == \
        [("5353:53/udp", False), ("8080:80/tcp", False)]
    assert claims(env) == before
    env.banger_json("vm", "start", "web", timeout=400)
    assert {(d["addr"], d["port"]) for d in dnat_rules(env)} == {(v["ip"], 80), (v["ip"], 53)}
    start_servers(env, "web", tmp_path, ("tcp", 80))
    curl_until(env.name, "http://127.0.0.1:8080/", "hello from web")

    # delete: rules and claims are gone
    env.banger_json("vm", "delete", "-f", "web", timeout=120)
    assert dnat_rules(env) == [] and claims(env) == [] and guarded(env) == {}
    assert curl(env.name, "http://127.0.0.1:8080/").returncode != 0


def echo_sources(lines) -> set[str]:
    """Source addresses of the ICMP echo requests a sniffer saw."""
    import socket

    out = set()
    lines.poll(0.1)
    for f in frames_seen(lines):
        if len(f) > 34 and f[12:14] == b"\x08\x00" and f[23] == 1 and f[14 + (f[14] & 0x0F) * 4] == 8:
            out.add(socket.inet_ntoa(f[26:30]))
    return out


def getent(ns: str, name: str) -> str | None:
    cp = run_in_ns(ns, ["getent", "hosts", name], timeout=30)
    return cp.stdout.split()[0] if cp.returncode == 0 and cp.stdout.strip() else None


def test_names_resolve_from_host_and_guests_and_allow_opens_only_what_it_names(vmenv, outside, procs):
    env = vmenv
    out_srv = serve(outside, procs, "tcp", "0.0.0.0", 8000, "outside")
    serve(outside, procs, "tcp", "0.0.0.0", 8001, "outside-2")
    host_srv = serve(env.name, procs, "tcp", "0.0.0.0", 9091, "host-db")
    serve(env.name, procs, "tcp", "0.0.0.0", 9092, "host-other")
    a = env.banger_json("vm", "create", "--name", "alpha", "--net", "isolated", "--allow", f"{OUTSIDE_IP}:8000",
                        "--allow", "172.30.0.1:9091/tcp", "--memory", "512", timeout=400)["data"]
    b = env.banger_json("vm", "create", "--name", "beta", "--nat", "--memory", "512", timeout=400)["data"]
    assert (a["net"], a["allow"], b["net"]) == ("isolated", [f"{OUTSIDE_IP}:8000", "172.30.0.1:9091/tcp"], "nat")
    assert b["names"]["pushed"] == {"alpha": None, "beta": None}  # both guests read the new names

    # names: from the host (the namespace's /etc/hosts is banger's file) and from each guest
    assert getent(env.name, "alpha.banger") == a["ip"] and getent(env.name, "beta.banger") == b["ip"]
    assert (env.etc / "hosts").read_text().startswith("127.0.0.1\tlocalhost\n")  # the rest is kept
    for vm, other in (("beta", a), ("alpha", b)):
        wait_for(lambda vm=vm, other=other: other["ip"] in sh(env, vm, f"getent hosts {other['name']}.banger",
                                                               check=False).stdout, 60,
                 f"{vm} resolving {other['name']}.banger")
    cfg_text = env.banger("vm", "ssh-config", "alpha").stdout
    assert "HostName alpha.banger" in cfg_text and f"HostKeyAlias {a['ip']}" in cfg_text

    # the isolated guest reaches exactly its --allow entries: one outside port, one host service
    assert "hello from outside" in (guest_reaches(env, "alpha", OUTSIDE_IP, 8000) or "")
    assert out_srv.wait_for(lambda x: True)["peer"] == OUTSIDE_HOST_IP  # it left the host masqueraded
    assert guest_reaches(env, "alpha", OUTSIDE_IP, 8001) is None
    assert "hello from host-db" in (guest_reaches(env, "alpha", "172.30.0.1", 9091) or "")
    assert host_srv.wait_for(lambda x: True)["peer"] == a["ip"]
    assert guest_reaches(env, "alpha", OUTSIDE_HOST_IP, 9091) is None  # the same service on another address
    assert guest_reaches(env, "alpha", "172.30.0.1", 9092) is None
    # the nat guest goes out anywhere, but reaches no host service it was not given
    assert "hello from outside-2" in (guest_reaches(env, "beta", OUTSIDE_IP, 8001) or "")
    assert guest_reaches(env, "beta", "172.30.0.1", 9092) is None

    # a guest sending with another VM's address is dropped before the host sees it (the TAP guard)
    sn = sniff(env.name, procs, "banger0")
    sh(env, "beta", f"ip addr add {a['ip']}/32 dev eth0; ping -c2 -W1 -I {a['ip']} 172.30.0.1; "
                    f"ping -c2 -W1 172.30.0.1; ip addr del {a['ip']}/32 dev eth0", check=False)
    wait_for(lambda: b["ip"] in echo_sources(sn), 20, "beta's own pings on the bridge")
    assert a["ip"] not in echo_sources(sn)

    # --net/--allow change only on a stopped VM; --ttl works on a running one
    busy = env.banger_json("vm", "set", "alpha", "--net", "nat", check=False)
    assert busy["_exit"] == 4 and "--ttl works on a running VM" in busy["error"]["message"]
    t = env.banger_json("vm", "set", "alpha", "--ttl", "2h")["data"]
    assert 7000 < t["ttl_left_s"] <= 7200 and t["state"] == "running"

    # delete alpha: its name stops resolving, on the host and in beta
    env.banger_json("vm", "delete", "-f", "alpha", timeout=120)
    assert getent(env.name, "alpha.banger") is None and getent(env.name, "beta.banger") == b["ip"]
    wait_for(lambda: "alpha" not in sh(env, "beta", "cat /etc/hosts").stdout, 60, "beta forgetting alpha")
    assert sh(env, "beta", "getent hosts alpha.banger", check=False).returncode != 0
    env.banger_json("vm", "delete", "-f", "beta", timeout=120)
    assert "banger" not in (env.etc / "hosts").read_text()  # the block is gone with the last VM


def test_guest_dns_follows_the_host_stub_ttl_expires_and_net_none_has_no_nic(vmenv, tmp_path):
    env = vmenv
    # the namespace's resolver is a local stub (systemd-resolved style); its upstreams are in another file
    (env.etc / "resolv.conf").write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n")
    upstream = tmp_path / "resolved-upstream.conf"
    upstream.write_text("# written by a fake systemd-resolved\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\n"
                        "nameserver 198.51.100.7\n")
    (env.home / "config.toml").write_text(f'dns_stub_upstreams = ["{upstream}"]\n')

    keep = env.banger_json("vm", "create", "--name", "keeper", "--no-start", "--ttl", "1h", timeout=300)["data"]
    c = env.banger_json("vm", "create", "--name", "brief", "--ttl", "5s", "--memory", "512", timeout=400)["data"]
    assert c["expires_at"] and keep["ttl_left_s"] > 3500
    resolv = sh(env, "brief", "cat /etc/resolv.conf").stdout
    assert resolv == "nameserver 192.0.2.53\nnameserver 198.51.100.7\n"

    wait_for(lambda: env.banger_json("vm", "show", "brief")["data"]["ttl"] == "expired", 30, "brief expiring")
    table = env.banger("vm", "list").stdout.splitlines()
    assert table[0].split()[-1] == "TTL"
    rows = {ln.split()[0]: ln.split()[-1] for ln in table[1:]}
    assert rows["brief"] == "expired" and 45 <= int(rows["keeper"].removesuffix("m")) <= 59, table
    dry = env.banger_json("gc", "--dry-run")["data"]
    assert [x["name"] for x in dry["expired"]] == ["brief"]
    r = env.banger_json("gc")["data"]
    assert [x["name"] for x in r["expired"]] == ["brief"] and not r["errors"]
    assert [x["name"] for x in env.banger_json("vm", "list")["data"]] == ["keeper"]
    assert "brief" not in (env.etc / "hosts").read_text() and dnat_rules(env) == []
    env.banger_json("vm", "delete", "keeper")

    # --net none: no TAP, no NIC, no address on the command line; the guest boots and stops on request
    n = env.banger_json("vm", "create", "--name", "nonet", "--net", "none", "--memory", "512", timeout=400)["data"]
    assert n["state"] == "running" and n["net"] == "none" and n["tap"] is None
    assert [s["stage"] for s in n["stages"] if s["op"] == "create"] == ["prepare", "disk.work", "disk.overlay",
                                                                       "vmm.launch"]
    h = json.loads((env.home / "vms" / n["id"] / "handles.json").read_text())
    assert h["tap"] is None and "-netdev" not in h["argv"] and "banger.ip=" not in " ".join(h["argv"])
    serial = env.home / "vms" / n["id"] / "serial.log"
    wait_for(lambda: "banger-init: sshd started" in serial.read_text(errors="replace"), 300, "nonet booting")
    assert "nonet" not in (env.etc / "hosts").read_text()
    ssh = env.banger("vm", "exec", "nonet", "--", "true", check=False, timeout=60)
    assert ssh.returncode == 4 and "no network card" in ssh.stderr
    s = env.banger_json("vm", "stop", "nonet", timeout=120)["data"]
    assert s["state"] == "stopped" and s["error"] is None  # powered off by itself on the console request
    assert "poweroff requested on the console" in serial.read_text(errors="replace")
    env.banger_json("vm", "delete", "nonet")
