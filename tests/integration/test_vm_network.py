# ruff: noqa: F811  (pytest fixtures imported from tests.support are re-declared as arguments)
"""The VM commands' network side on the Firecracker backend (the strict double), in a netns: `banger gc`
deleting expired VMs under their lock (a busy one skipped), reaping stale nftables policy once its VM
is not running (and for ids without a row), writing VM names to the hosts file and pushing them to
every running guest's console (the double checks them as strictly as banger-init does); restored
clones that publish only what they are asked; `vm set --net/--allow` on a stopped VM; --net none."""

from __future__ import annotations

import json
import signal
import sqlite3
import time

import pytest

from banger.host import procs
from tests.support.fc import FAKE_FC, events, running_fc_vm
from tests.support.guestnet import Lines
from tests.support.netns import netns, py_argv, result  # noqa: F401


@pytest.fixture
def fcns(netns, tmp_path):
    rec = tmp_path / "fc-record"
    rec.mkdir()
    conf = tmp_path / "config.toml"
    conf.write_text(f'firecracker_bin = "{FAKE_FC}"\nbackend = "firecracker"\ndomain = "vm.test"\n')
    netns.env.update(BANGER_CONFIG=str(conf), FAKE_FIRECRACKER_RECORD=str(rec))
    netns.rec = rec
    netns.shared = tmp_path / "shared"
    try:
        yield netns
    finally:
        for v in netns.banger_json("vm", "list", check=False).get("data") or []:
            netns.banger_json("vm", "delete", "-f", v["id"], check=False)
        netns.banger_json("gc", check=False)


def _hosts_of(ns, pid: int, n_lines: int = 1) -> dict:
    """The names the double (as banger-init) holds after its latest complete push."""
    deadline = time.monotonic() + 20
    while True:
        ev = events(ns.rec, pid, "guest_hosts")
        if ev and ev[-1]["mode"] == "hosts":
            return {"domain": ev[-1]["domain"], "entries": sorted(map(tuple, ev[-1]["entries"]))}
        if time.monotonic() > deadline:
            raise AssertionError(f"no hosts push to pid {pid}: {events(ns.rec, pid, 'guest_hosts_rejected')}")
        time.sleep(0.05)


def _pushes(ns, pid: int) -> int:
    return len(events(ns.rec, pid, "guest_hosts"))


def _set_expiry(ns, vm_id: str, at: float) -> None:
    with sqlite3.connect(ns.home / "state.db") as c:
        c.execute("UPDATE vms SET options = json_set(options, '$.expires_at', ?) WHERE id = ?", (at, vm_id))


def _live_policy(ns) -> set[str]:
    return {v["vm_id"] for v in result(ns.call("policy.active(ctx)"))}


def test_gc_expires_reaps_and_names(fcns):
    ns = fcns
    one = running_fc_vm(ns, "one", ns.shared)
    two = running_fc_vm(ns, "two", ns.shared)
    assert _live_policy(ns) == {one["id"], two["id"]}

    # names: the hosts file gets both, and so does each guest (pushed on its console)
    r = ns.banger_json("gc")["data"]
    assert sorted(r["names"]["names"]) == ["one.vm.test", "two.vm.test"] and not r["errors"]
    assert r["names"]["pushed"] == {"one": None, "two": None}
    want = {"domain": "vm.test", "entries": sorted([("one", one["ip"]), ("two", two["ip"])])}
    assert _hosts_of(ns, one["pid"]) == want and _hosts_of(ns, two["pid"]) == want
    text = (ns.etc / "hosts").read_text()
    assert f"{one['ip']}\tone.vm.test\n" in text and f"{two['ip']}\ttwo.vm.test\n" in text
    assert ns.run(["getent", "hosts", "two.vm.test"]).stdout.split() == [two["ip"], "two.vm.test"]

    # an expired VM whose lock a command holds is skipped (busy), then deleted once it is free
    _set_expiry(ns, one["id"], time.time() - 1)
    holder = ns.spawn(py_argv(f"""
        import time
        from banger.context import Ctx
        with Ctx().locks.hold("vm/{one['id']}"):
            print("held", flush=True)
            time.sleep(600)
    """))
    try:
        Lines(holder).wait_text("held")
        dry = ns.banger_json("gc", "--dry-run")["data"]
        assert [x["name"] for x in dry["expired"]] == ["one"]
        r = ns.banger_json("gc")["data"]
        assert r["expired"] == [] and [x["name"] for x in r["busy"]] == ["one"]
        assert procs.alive(one["pid"], None) and one["id"] in _live_policy(ns)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    before = _pushes(ns, two["pid"])
    r = ns.banger_json("gc")["data"]
    assert [x["name"] for x in r["expired"]] == ["one"] and not r["errors"]
    assert [v["name"] for v in ns.banger_json("vm", "list")["data"]] == ["two"]
    assert one["id"] not in _live_policy(ns) and not procs.alive(one["pid"], None)
    assert _pushes(ns, two["pid"]) > before
    assert _hosts_of(ns, two["pid"]) == {"domain": "vm.test", "entries": [("two", two["ip"])]}
    assert "one.vm.test" not in (ns.etc / "hosts").read_text()
    # extended with vm set --ttl: no longer expired, gc leaves it
    ns.banger_json("vm", "set", "two", "--ttl", "1h")
    _set_expiry(ns, two["id"], time.time() + 3600)
    assert ns.banger_json("gc")["data"]["expired"] == []

    # a VMM killed behind banger's back leaves its policy: stale once the VM is not running, reaped
    procs.kill(two["pid"], None, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while procs.alive(two["pid"], None) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ns.banger_json("vm", "show", "two")["data"]["state"] == "crashed"
    # and policy for an id no row names (a row deleted by hand)
    ghost = {"id": "0123456789ab", "ip": "172.30.0.200", "mac": "06:00:ac:1e:00:c8", "net": "isolated",
             "allow": ["10.0.0.0/8"]}
    result(ns.call(f"policy.apply(ctx, {ghost!r}, None, ports=())"))
    assert _live_policy(ns) == {two["id"], ghost["id"]}
    dry = ns.banger_json("gc", "--dry-run")["data"]
    assert sorted(x["vm_id"] for x in dry["rules"]) == sorted([two["id"], ghost["id"]])
    assert _live_policy(ns) == {two["id"], ghost["id"]}  # a dry run changes nothing
    r = ns.banger_json("gc")["data"]
    assert sorted(x["vm_id"] for x in r["rules"]) == sorted([two["id"], ghost["id"]]) and not r["errors"]
    assert _live_policy(ns) == set()
    assert "two.vm.test" not in (ns.etc / "hosts").read_text()
    assert not [i for i in ns.nft_ruleset() if "table" in i and i["table"]["name"].startswith("banger-")]


def test_doctor_reports_forwarding(fcns):
    ns = fcns
    checks = {c["name"]: c for c in ns.banger_json("doctor", check=False)["data"]["checks"]}
    assert checks["nftables"]["status"] == "ok"
    assert checks["ip_forward"]["status"] == "ok" and "no banger VM needs it" in checks["ip_forward"]["detail"]
    v = running_fc_vm(ns, "fwd", ns.shared)
    ns.call(f"policy.apply(ctx, {{'id': {v['id']!r}, 'ip': {v['ip']!r}, 'mac': {v['mac']!r}, 'net': 'nat'}}, "
            f"{v['tap']!r})")
    checks = {c["name"]: c for c in ns.banger_json("doctor", check=False)["data"]["checks"]}
    assert f"VM {v['id']} (nat)" in checks["ip_forward"]["detail"], json.dumps(checks["ip_forward"])


def _claims(ns) -> dict:
    with sqlite3.connect(ns.home / "state.db") as c:
        rows = c.execute("SELECT v.name, p.proto, p.host_port, p.guest_port FROM published_ports p "
                         "JOIN vms v ON v.id = p.vm_id ORDER BY v.name, p.host_port").fetchall()
    out: dict = {}
    for name, proto, hp, gp in rows:
        out.setdefault(name, []).append(f"{hp}:{gp}/{proto}")
    return out


def test_a_restored_clone_publishes_only_what_it_is_asked_for(fcns):
    ns = fcns
    src = running_fc_vm(ns, "src", ns.shared)
    r = ns.banger_json("vm", "port", "add", "src", "8080:80", "5353:53/udp")["data"]
    assert r["live"] and sorted(r["published"]) == ["5353:53/udp", "8080:80/tcp"]
    ns.banger_json("snapshot", "create", "src", "s1")
    plain = ns.banger_json("snapshot", "restore", "s1", "--name", "plain", "--no-wait")["data"]
    assert plain["ports"] == [] and plain["net"] == "isolated"
    dup = ns.banger_json("vm", "create", "--from-snapshot", "s1", "--name", "dup", "-p", "8080:80", "--no-wait",
                         check=False)
    assert dup["_exit"] == 4 and "already published by VM src" in dup["error"]["message"]
    assert "dup" not in [v["name"] for v in ns.banger_json("vm", "list")["data"]]
    asked = ns.banger_json("vm", "create", "--from-snapshot", "s1", "--name", "asked", "-p", "9000:80",
                           "--no-wait")["data"]
    assert [(p["spec"], p["active"]) for p in asked["ports"]] == [("9000:80/tcp", True)]
    assert [s["stage"] for s in asked["stages"] if s["op"] == "restore"][:2] == ["snapshot.check", "net.ports"]
    assert _claims(ns) == {"asked": ["9000:80/tcp"], "src": ["5353:53/udp", "8080:80/tcp"]}
    live = {v["vm_id"]: v["ports"] for v in result(ns.call("policy.active(ctx)"))}
    assert live[asked["id"]] == ["9000:80/tcp"] and live.get(plain["id"]) == [] and \
        sorted(live[src["id"]]) == ["5353:53/udp", "8080:80/tcp"]
    bad = ns.banger_json("vm", "create", "--from-snapshot", "s1", "--net", "nat", check=False)
    assert bad["_exit"] == 2 and "--net" in bad["error"]["message"]
    for name in ("asked", "plain", "src"):
        ns.banger_json("vm", "delete", "-f", name)
    assert _claims(ns) == {} and result(ns.call("policy.active(ctx)")) == []
    ns.banger_json("snapshot", "rm", "s1")


def test_set_net_and_allow_on_a_stopped_vm_and_net_none_boots_without_a_nic(fcns):
    ns = fcns
    v = running_fc_vm(ns, "box", ns.shared)
    ns.banger_json("vm", "port", "add", "box", "8080:80")
    s = ns.banger_json("vm", "stop", "box", timeout=120)["data"]
    assert s["state"] == "stopped" and _live_policy(ns) == set()  # the policy goes with the VMM
    r = ns.banger_json("vm", "set", "box", "--net", "nat", "--allow", "10.0.0.0/8", "--allow", "172.30.0.1:22")
    assert (r["data"]["net"], r["data"]["allow"], r["data"]["nat"]) == ("nat", ["10.0.0.0/8", "172.30.0.1:22"], True)
    assert ns.banger_json("vm", "set", "box", "--no-allow")["data"]["allow"] == []
    bad = ns.banger_json("vm", "set", "box", "--allow", "10.0.0.0/8", "--no-allow", check=False)
    assert bad["_exit"] == 2 and "contradict" in bad["error"]["message"]
    taken = ns.banger_json("vm", "set", "box", "--net", "none", check=False)
    assert taken["_exit"] == 4 and "publishes ports" in taken["error"]["message"]
    ns.banger_json("vm", "port", "rm", "box", "8080")
    r = ns.banger_json("vm", "set", "box", "--net", "none")["data"]
    assert (r["net"], r["nat"], r["ports"]) == ("none", False, [])
    refused = ns.banger_json("vm", "port", "add", "box", "8080:80", check=False)
    assert refused["_exit"] == 2 and "--net none" in refused["error"]["message"]

    started = ns.banger_json("vm", "start", "box", "--no-wait", timeout=120)["data"]
    assert started["state"] == "running" and started["tap"] is None
    assert [x["stage"] for x in started["stages"] if x["op"] == "start"] == ["vmm.launch"]
    h = json.loads((ns.home / "vms" / v["id"] / "handles.json").read_text())
    boot = events(ns.rec, h["pid"], "boot")[0]
    assert boot["ifaces"] == [] and "banger.ip=" not in boot["cmdline"] and "banger.hostname=box" in boot["cmdline"]
    assert v["id"] not in _live_policy(ns)
    with sqlite3.connect(ns.home / "state.db") as c:
        assert c.execute("SELECT count(*) FROM taps WHERE vm_id = ?", (v["id"],)).fetchone()[0] == 0
