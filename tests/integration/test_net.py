# ruff: noqa: F811  (pytest fixtures imported from tests.support are re-declared as arguments)
"""Host networking against real netlink + nftables, inside a throwaway network namespace.

banger does the work through pyroute2 / `nft -j -f -`; the checks read the namespace
back independently with `ip -j` and `nft -j list ruleset`.
"""

from __future__ import annotations

import json
import time

from banger.names import Subnet
from banger.state.reservation import reserve_vm
from banger.state.store import Store
from tests.support.netns import banger_argv, create_netns, delete_netns, netns, result  # noqa: F401


def _bridge_checks(ns, name: str, addr: str, mac: str):
    link = ns.link(name)
    assert link is not None, f"{name} missing"
    assert link["linkinfo"]["info_kind"] == "bridge"
    assert "UP" in link["flags"]
    assert link["address"] == mac
    assert ns.addrs(name) == [addr]


def test_bridge_created_with_gateway_and_idempotent(netns):
    # a fresh netns inherits ip_forward from the root namespace on some hosts (Docker's, say): start from 0
    netns.set_sysctl("net.ipv4.ip_forward", "0")
    first = result(netns.call("hostnet.ensure_bridge(ctx)"))
    assert first["created"] is True and first["changed"] is True
    _bridge_checks(netns, "banger0", "172.30.0.1/24", "06:00:ac:1e:00:01")
    ifindex = netns.link("banger0")["ifindex"]

    again = result(netns.call("hostnet.ensure_bridge(ctx)"))
    assert again["created"] is False and again["changed"] is False
    assert netns.link("banger0")["ifindex"] == ifindex  # same device, not re-created
    assert netns.addrs("banger0") == ["172.30.0.1/24"]  # no duplicate address
    # enabling forwarding is NAT's business, not the bridge's
    assert netns.sysctl("net.ipv4.ip_forward") == "0"


def test_bridge_name_and_subnet_from_config(netns):
    env = {**netns.env, "BANGER_BRIDGE": "bgtest0", "BANGER_SUBNET": "10.77.0.0/24"}
    doc = netns.banger_json("pool", "warm", "0", env=env)
    assert doc["data"]["bridge"] == "bgtest0" and doc["data"]["bridge_created"] is True
    _bridge_checks(netns, "bgtest0", "10.77.0.1/24", "06:00:0a:4d:00:01")
    assert netns.link("banger0") is None


def test_bridge_repaired_when_address_removed_and_down(netns):
    result(netns.call("hostnet.ensure_bridge(ctx)"))
    netns.run(["ip", "addr", "flush", "dev", "banger0"], check=True)
    netns.run(["ip", "link", "set", "banger0", "down"], check=True)
    netns.run(["ip", "link", "set", "banger0", "address", "02:11:22:33:44:55"], check=True)
    fixed = result(netns.call("hostnet.ensure_bridge(ctx)"))
    assert fixed["created"] is False and fixed["changed"] is True
    _bridge_checks(netns, "banger0", "172.30.0.1/24", "06:00:ac:1e:00:01")


def test_name_taken_by_a_non_bridge_is_a_conflict(netns):
    netns.run(["ip", "link", "add", "banger0", "type", "veth", "peer", "name", "bgpeer0"], check=True)
    doc = netns.banger_json("pool", "warm", "1", check=False)
    assert doc["ok"] is False and doc["_exit"] == 4
    assert doc["error"]["code"] == "conflict"
    assert "not a bridge" in doc["error"]["message"] and "ip link del banger0" in doc["error"]["hint"]
    assert netns.link("banger0")["linkinfo"]["info_kind"] == "veth"  # left alone
    assert netns.links(prefix="tap-pool-") == []


def test_without_net_admin_the_error_says_so(netns):
    # root without CAP_NET_ADMIN (dropped from the bounding set): netlink refuses with EPERM
    cp = netns.run(["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--",
                    *banger_argv("pool", "warm", "1", "--json")])
    doc = json.loads(cp.stdout)
    assert cp.returncode == 6, cp
    assert doc["ok"] is False and doc["error"]["code"] == "host"
    assert "root" in doc["error"]["hint"] and "CAP_NET_ADMIN" in doc["error"]["hint"]
    assert netns.link("banger0") is None


def test_permanent_neighbour_set_and_removed(netns):
    result(netns.call("hostnet.ensure_bridge(ctx)"))
    for _ in range(2):  # replace semantics: a second set is harmless
        result(netns.call("netlink.set_neighbour('banger0', '172.30.0.9', '06:00:ac:1e:00:09')"))
    neigh = [n for n in netns.neighbours("banger0") if n["dst"] == "172.30.0.9"]
    assert len(neigh) == 1
    assert neigh[0]["lladdr"] == "06:00:ac:1e:00:09" and "PERMANENT" in neigh[0]["state"]

    assert result(netns.call("netlink.del_neighbour('banger0', '172.30.0.9')")) is True
    assert result(netns.call("netlink.del_neighbour('banger0', '172.30.0.9')")) is False  # idempotent
    assert [n for n in netns.neighbours("banger0") if n["dst"] == "172.30.0.9"] == []


def test_neighbour_on_missing_bridge_is_not_found(netns):
    doc = netns.call("netlink.set_neighbour('banger0', '172.30.0.9', '06:00:ac:1e:00:09')")
    assert doc["error"] == "not_found" and doc["exit"] == 3 and doc["hint"]


# ---------------------------------------------------------------------------- NAT

def _vms(ns, n):
    with Store(ns.home / "state.db") as s:
        return [reserve_vm(s, Subnet("172.30.0.0/24"), name=None, image="i", kernel="k", backend="qemu", vcpu=1,
                           memory_mib=256, overlay_size_mib=64, work_disk_size_mib=64, nat=True)
                for _ in range(n)]


TABLE = "banger-banger0"


def _banger_rules(ns):
    return [x["rule"] for x in ns.nft_ruleset() if "rule" in x and x["rule"]["table"] == TABLE]


def _rules_of(ns, vm):
    return [r for r in _banger_rules(ns) if r.get("comment", "").startswith(f"banger vm={vm['id']} ")]


def _map_elems(ns, name):
    m = next((x["map"] for x in ns.nft_ruleset() if "map" in x and x["map"]["table"] == TABLE
              and x["map"]["name"] == name), None)
    return {e[0]: e[1]["jump"]["target"] for e in (m or {}).get("elem", [])}


def _row(vm):
    return {"id": vm["id"], "ip": vm["ip"], "name": vm["name"]}


def test_nat_rules_appear_and_disappear_exactly(netns):
    """The NAT-only entry points (policy.enable_nat/disable_nat) on top of banger.net.policy."""
    a, b = _vms(netns, 2)
    netns.set_sysctl("net.ipv4.ip_forward", "0")
    assert netns.sysctl("net.ipv4.ip_forward") == "0"

    r = result(netns.call(f"policy.enable_nat(ctx, {_row(a)!r})"))
    assert r["changed"] is True and r["ip_forward_changed"] is True
    assert netns.sysctl("net.ipv4.ip_forward") == "1"
    ra = _rules_of(netns, a)
    assert sorted(x["chain"] for x in ra) == [f"vm-{a['id']}-out", f"vm-{a['id']}-snat"]
    assert {"masquerade": None} in next(x for x in ra if x["chain"].endswith("-snat"))["expr"]
    assert _map_elems(netns, "snat") == {a["ip"]: f"vm-{a['id']}-snat"}
    assert _map_elems(netns, "egress") == {a["ip"]: f"vm-{a['id']}-out"}
    chains = {x["chain"]["name"]: x["chain"] for x in netns.nft_ruleset() if "chain" in x
              and x["chain"]["table"] == TABLE}
    assert chains["snat_post"]["type"] == "nat" and chains["snat_post"]["hook"] == "postrouting"
    assert chains["forward"]["hook"] == "forward"
    post = [x for x in _banger_rules(netns) if x["chain"] == "snat_post"]
    assert any({"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "banger0"}} in x["expr"]
               for x in post)
    # without a TAP there is no layer-2 part (and no bridge table)
    assert not any("table" in x and x["table"]["family"] == "bridge" for x in netns.nft_ruleset())

    # idempotent: nothing duplicated, handles unchanged
    again = result(netns.call(f"policy.enable_nat(ctx, {_row(a)!r})"))
    assert again["changed"] is False
    assert sorted(x["handle"] for x in _rules_of(netns, a)) == sorted(x["handle"] for x in ra)

    result(netns.call(f"policy.enable_nat(ctx, {_row(b)!r})"))
    rb = _rules_of(netns, b)
    assert len(rb) == 2 and _map_elems(netns, "snat") == {a["ip"]: f"vm-{a['id']}-snat",
                                                          b["ip"]: f"vm-{b['id']}-snat"}
    listed = result(netns.call("policy.list_nat(ctx)"))
    assert {e["vm_id"]: e["ip"] for e in listed} == {a["id"]: a["ip"], b["id"]: b["ip"]}

    # removing a's rules leaves exactly b's, untouched
    d = result(netns.call(f"policy.disable_nat(ctx, {_row(a)!r})"))
    assert d["removed"] == 4 and d["table_removed"] is False  # two chains, two map elements
    assert _rules_of(netns, a) == [] and a["ip"] not in _map_elems(netns, "snat")
    vm_rules = [x for x in _banger_rules(netns) if x["chain"].startswith("vm-")]
    assert sorted(x["handle"] for x in vm_rules) == sorted(x["handle"] for x in rb)
    assert result(netns.call(f"policy.disable_nat(ctx, {_row(a)!r})"))["removed"] == 0  # idempotent

    # disabling by id alone (what gc has from list_nat) works; the last one takes the table along
    d = result(netns.call(f"policy.disable_nat(ctx, {{'id': {b['id']!r}}})"))
    assert d["removed"] == 4 and d["table_removed"] is True
    assert not any("table" in x and x["table"]["name"] == TABLE for x in netns.nft_ruleset())
    assert result(netns.call("policy.list_nat(ctx)")) == []


def test_nat_leaves_foreign_rules_alone(netns):
    (a,) = _vms(netns, 1)
    netns.run(["nft", "add", "table", "ip", "other"], check=True)
    netns.run(["nft", "add", "chain", "ip", "other", "c"], check=True)
    netns.run(["nft", "add", "rule", "ip", "other", "c", "ip", "saddr", a["ip"], "counter", "comment",
               f'"banger vm={a["id"]} ip={a["ip"]} br=banger0"'], check=True)
    result(netns.call(f"policy.enable_nat(ctx, {_row(a)!r})"))
    result(netns.call(f"policy.disable_nat(ctx, {_row(a)!r})"))
    other = [x["rule"] for x in netns.nft_ruleset() if "rule" in x and x["rule"]["table"] == "other"]
    assert len(other) == 1  # a look-alike comment in someone else's table is not ours


def test_concurrent_nat_enables_never_duplicate(netns, tmp_path):
    from tests.support.procs import Barrier

    vms = _vms(netns, 4)
    go = Barrier(tmp_path / "go", 7)
    procs = [netns.spawn_call(f"policy.enable_nat(ctx, {_row(v)!r})", go) for v in vms]
    procs += [netns.spawn_call(f"policy.enable_nat(ctx, {_row(vms[0])!r})", go) for _ in range(3)]
    go.release()
    for p in procs:
        so, se = p.communicate(timeout=120)
        assert p.returncode == 0 and '"value"' in so, (so, se)
    for v in vms:
        assert len(_rules_of(netns, v)) == 2
    assert len([x for x in _banger_rules(netns) if x["chain"].startswith("vm-")]) == 8
    assert len(_map_elems(netns, "snat")) == 4


def test_masquerade_really_carries_traffic(netns):
    """A 'guest' namespace on the bridge reaches an 'outside' namespace that has no route back
    to the guest subnet: only masquerading makes the ping come back."""
    guest, outside = create_netns("bgg"), create_netns("bgo")
    try:
        (vm,) = _vms(netns, 1)
        result(netns.call("hostnet.ensure_bridge(ctx)"))
        # guest: veth into the bridge, the VM's address, default route via the gateway
        netns.run(["ip", "link", "add", "vg0", "type", "veth", "peer", "name", "eth0", "netns", guest], check=True)
        netns.run(["ip", "link", "set", "vg0", "master", "banger0", "up"], check=True)
        g = ["ip", "netns", "exec", guest]
        for argv in (["ip", "addr", "add", f"{vm['ip']}/24", "dev", "eth0"], ["ip", "link", "set", "eth0", "up"],
                     ["ip", "route", "add", "default", "via", "172.30.0.1"]):
            netns.run(g + argv, check=True)
        # outside: 10.99.0.2, knows nothing about 172.30.0.0/24
        netns.run(["ip", "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", outside],
                  check=True)
        netns.run(["ip", "addr", "add", "10.99.0.1/24", "dev", "up0"], check=True)
        netns.run(["ip", "link", "set", "up0", "up"], check=True)
        o = ["ip", "netns", "exec", outside]
        netns.run(o + ["ip", "addr", "add", "10.99.0.2/24", "dev", "eth0"], check=True)
        netns.run(o + ["ip", "link", "set", "eth0", "up"], check=True)

        def ping():
            return netns.run(g + ["busybox", "ping", "-c", "1", "-W", "1", "10.99.0.2"]).returncode == 0

        netns.set_sysctl("net.ipv4.ip_forward", "0")
        assert not ping()
        result(netns.call(f"policy.enable_nat(ctx, {_row(vm)!r})"))
        deadline = time.monotonic() + 10
        ok = ping()
        while not ok and time.monotonic() < deadline:  # first ping may race neighbour discovery
            ok = ping()
        assert ok, "guest could not reach outside through NAT"
        result(netns.call(f"policy.disable_nat(ctx, {_row(vm)!r})"))
        assert not ping(), "traffic still masqueraded after disable_nat"
    finally:
        delete_netns(guest)
        delete_netns(outside)
