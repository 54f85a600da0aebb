# ruff: noqa: F811  (pytest fixtures imported from tests.support are re-declared as arguments)
"""The TAP pool against real netlink in a throwaway netns and a real SQLite database,
with real concurrent processes. Checks read the namespace back with `ip -j`."""

from __future__ import annotations

import json
import time

from banger.names import Subnet
from banger.state.locks import Locks
from banger.state.reservation import reserve_vm
from banger.state.store import Store
from tests.support.netns import banger_argv, netns, result  # noqa: F401


def _rows(ns):
    with Store(ns.home / "state.db") as s:
        return {r["name"]: r for r in s.query("SELECT * FROM taps")}


def _taps(ns):
    return {x["ifname"]: x for x in ns.links(prefix="tap-pool-", details=True)}


def _assert_pooled_device(link, bridge="banger0"):
    info = link["linkinfo"]
    assert info["info_kind"] == "tun"
    assert info["info_data"]["type"] == "tap"
    assert info["info_data"]["pi"] is False and info["info_data"]["vnet_hdr"] is True
    assert info["info_data"]["persist"] is True
    assert link["master"] == bridge
    assert "UP" in link["flags"]


def _gather(procs, timeout=180):
    out = []
    for p in procs:
        so, se = p.communicate(timeout=timeout)
        assert p.returncode == 0, se
        out.append(json.loads(so.strip().splitlines()[-1]))
    return out


def _vm(ns, **kw):
    with Store(ns.home / "state.db") as s:
        return reserve_vm(s, Subnet("172.30.0.0/24"), name=None, image="i", kernel="k", backend="qemu", vcpu=1,
                          memory_mib=256, overlay_size_mib=64, work_disk_size_mib=64, **kw)


def test_warm_makes_idle_taps_on_the_bridge_and_is_idempotent(netns):
    doc = netns.banger_json("pool", "warm", "4")
    d = doc["data"]
    assert sorted(d["created"]) == [f"tap-pool-{i}" for i in range(4)]
    assert d["idle"] == 4 and d["claimed"] == 0 and d["noop"] is False
    taps = _taps(netns)
    assert sorted(taps) == [f"tap-pool-{i}" for i in range(4)]
    for link in taps.values():
        _assert_pooled_device(link)
    rows = _rows(netns)
    assert sorted(rows) == sorted(taps) and all(r["state"] == "idle" and r["vm_id"] is None for r in rows.values())
    assert netns.addrs("banger0") == ["172.30.0.1/24"]

    again = netns.banger_json("pool", "warm", "4")["data"]
    assert again["noop"] is True and again["created"] == []
    assert {n: x["ifindex"] for n, x in _taps(netns).items()} == {n: x["ifindex"] for n, x in taps.items()}

    # asking for fewer is a no-op too; asking for more tops up
    assert netns.banger_json("pool", "warm", "2")["data"]["created"] == []
    more = netns.banger_json("pool", "warm", "6")["data"]
    assert sorted(more["created"]) == ["tap-pool-4", "tap-pool-5"] and more["idle"] == 6
    assert len(_taps(netns)) == 6


def test_concurrent_warms_never_overshoot(netns):
    procs = [netns.spawn(banger_argv("pool", "warm", n, "--json")) for n in (5, 5, 3)]
    for p in procs:
        so, se = p.communicate(timeout=180)
        assert p.returncode == 0, (so, se)
        assert '"ok": true' in so
    taps = _taps(netns)
    assert len(taps) == 5 and len(_rows(netns)) == 5
    for link in taps.values():
        _assert_pooled_device(link)


def test_eight_concurrent_claims_from_a_pool_of_four_get_distinct_taps(netns, tmp_path):
    from tests.support.procs import Barrier

    netns.banger_json("pool", "warm", "4")
    warm = set(_taps(netns))
    go = Barrier(tmp_path / "go", 8)
    procs = [netns.spawn_call(f"pool.claim(ctx, 'vm{i}')", go) for i in range(8)]
    go.release()
    got = [result(r) for r in _gather(procs)]
    assert len(set(got)) == 8, got
    assert warm <= set(got)  # the four warm ones were handed out, four more were created
    rows = _rows(netns)
    assert {r["vm_id"]: n for n, r in rows.items()} == {f"vm{i}": got[i] for i in range(8)}
    assert all(r["state"] == "claimed" for r in rows.values())
    taps = _taps(netns)
    assert set(taps) == set(got)
    for link in taps.values():
        _assert_pooled_device(link)


def test_claim_from_a_warm_pool_takes_no_pool_lock_but_creation_does(netns):
    netns.banger_json("pool", "warm", "1")
    locks = Locks(netns.home / "locks")
    (netns.home / "config.toml").write_text("lock_timeout_s = 1.0\n")
    with locks.hold("pool"):
        tap = result(netns.call("pool.claim(ctx, 'vm-a')"))  # would time out if it needed the lock
        assert tap == "tap-pool-0"
        # the pool is empty now: creating one needs the lock, which we hold
        doc = netns.call("pool.claim(ctx, 'vm-b')")
        assert doc["error"] == "lock_timeout" and doc["exit"] == 5
    assert sorted(_taps(netns)) == ["tap-pool-0"]  # the failed claim left nothing behind
    assert list(_rows(netns)) == ["tap-pool-0"]
    assert result(netns.call("pool.claim(ctx, 'vm-b')")) == "tap-pool-1"  # lock free: fallback creates


def test_claim_is_idempotent_per_vm(netns):
    netns.banger_json("pool", "warm", "2")
    a = result(netns.call("pool.claim(ctx, 'vm-a')"))
    assert result(netns.call("pool.claim(ctx, 'vm-a')")) == a
    assert [r["name"] for r in _rows(netns).values() if r["vm_id"] == "vm-a"] == [a]


def test_claim_skips_a_pooled_tap_whose_device_vanished(netns):
    netns.banger_json("pool", "warm", "2")
    netns.run(["ip", "link", "del", "tap-pool-0"], check=True)
    assert result(netns.call("pool.claim(ctx, 'vm-a')")) == "tap-pool-1"
    assert sorted(_rows(netns)) == ["tap-pool-1"]  # the stale row was dropped


def test_claim_reattaches_a_tap_that_fell_off_the_bridge(netns):
    netns.banger_json("pool", "warm", "1")
    netns.run(["ip", "link", "set", "tap-pool-0", "nomaster", "down"], check=True)
    assert result(netns.call("pool.claim(ctx, 'vm-a')")) == "tap-pool-0"
    _assert_pooled_device(_taps(netns)["tap-pool-0"])


def test_release_returns_to_idle_and_destroy_deletes(netns):
    netns.banger_json("pool", "warm", "2")
    a = result(netns.call("pool.claim(ctx, 'vm-a')"))
    ifindex = _taps(netns)[a]["ifindex"]
    r = result(netns.call("pool.release(ctx, 'vm-a')"))
    assert r["released"] == [a] and r["destroyed"] == []
    row = _rows(netns)[a]
    assert row["state"] == "idle" and row["vm_id"] is None
    _assert_pooled_device(_taps(netns)[a])
    assert _taps(netns)[a]["ifindex"] == ifindex  # same device, back in the pool
    assert result(netns.call("pool.release(ctx, 'vm-a')")) == {"vm_id": "vm-a", "released": [], "destroyed": []}

    b = result(netns.call("pool.claim(ctx, 'vm-b')"))
    r = result(netns.call("pool.release(ctx, 'vm-b', destroy=True)"))
    assert r["destroyed"] == [b]
    assert b not in _taps(netns) and b not in _rows(netns)
    assert result(netns.call("pool.release(ctx, 'vm-b', destroy=True)"))["destroyed"] == []


def test_qemu_opens_a_pooled_tap_and_release_waits_for_it(netns):
    """The flags banger creates TAPs with are the ones QEMU opens them with; a TAP still
    open by a VMM is never handed back to the pool."""
    netns.banger_json("pool", "warm", "1")
    tap = result(netns.call("pool.claim(ctx, 'vm-q')"))
    qemu = netns.spawn(["qemu-system-x86_64", "-M", "microvm", "-nodefaults", "-display", "none", "-S",
                        "-monitor", "none", "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off",
                        "-device", "virtio-net-device,netdev=n0"])
    try:
        deadline = time.monotonic() + 30
        while "LOWER_UP" not in _taps(netns)[tap]["flags"]:  # carrier: QEMU attached to the TAP
            assert qemu.poll() is None, qemu.communicate()
            assert time.monotonic() < deadline, "QEMU never attached to the TAP"
            time.sleep(0.05)
        doc = netns.call("pool.release(ctx, 'vm-q', detach_timeout=0.3)")
        assert doc["error"] == "invalid_state" and doc["exit"] == 4
        assert _rows(netns)[tap]["state"] == "claimed"
    finally:
        qemu.kill()
        qemu.communicate(timeout=30)
    assert result(netns.call("pool.release(ctx, 'vm-q')"))["released"] == [tap]
    assert _rows(netns)[tap]["state"] == "idle"


def test_drain_deletes_idle_and_keeps_claimed(netns):
    netns.banger_json("pool", "warm", "4")
    a = result(netns.call("pool.claim(ctx, 'vm-a')"))
    d = netns.banger_json("pool", "drain")["data"]
    assert len(d["drained"]) == 3 and a not in d["drained"] and d["claimed_kept"] == 1
    assert sorted(_taps(netns)) == [a]
    assert list(_rows(netns)) == [a]
    assert netns.banger_json("pool", "drain")["data"]["drained"] == []


def test_warm_repairs_vanished_devices_and_adopts_rowless_ones(netns):
    netns.banger_json("pool", "warm", "3")
    netns.run(["ip", "link", "del", "tap-pool-1"], check=True)
    netns.run(["ip", "tuntap", "add", "dev", "tap-pool-9", "mode", "tap"], check=True)  # a crash's leftover
    d = netns.banger_json("pool", "warm", "3")["data"]
    assert d["repaired"]["dropped_rows"] == ["tap-pool-1"]
    assert d["repaired"]["adopted_devices"] == ["tap-pool-9"]
    assert d["created"] == [] and d["idle"] == 3
    assert sorted(_taps(netns)) == sorted(_rows(netns)) == ["tap-pool-0", "tap-pool-2", "tap-pool-9"]
    assert _taps(netns)["tap-pool-9"]["master"] == "banger0"


def test_warm_reattaches_all_pooled_taps_after_the_bridge_was_recreated(netns):
    netns.banger_json("pool", "warm", "2")
    a = result(netns.call("pool.claim(ctx, 'vm-a')"))
    netns.run(["ip", "link", "del", "banger0"], check=True)
    assert all(x.get("master") is None for x in _taps(netns).values())
    d = netns.banger_json("pool", "warm", "2")["data"]
    assert d["bridge_created"] is True
    assert sorted(d["repaired"]["fixed"]) == ["tap-pool-0", "tap-pool-1"]
    assert d["created"] == ["tap-pool-2"]  # one of the two is claimed: top up to 2 idle
    for link in _taps(netns).values():
        _assert_pooled_device(link)
    assert _rows(netns)[a]["vm_id"] == "vm-a"


def test_leaks_found_and_reaped_capacity_untouched(netns):
    netns.banger_json("pool", "warm", "3")
    vm = _vm(netns)
    live = result(netns.call(f"pool.claim(ctx, {vm['id']!r})"))       # a real VM's TAP: not a leak
    orphan = result(netns.call("pool.claim(ctx, 'gone-vm')"))          # its VM row does not exist
    netns.run(["ip", "tuntap", "add", "dev", "tap-pool-7", "mode", "tap"], check=True)  # device, no row
    with Store(netns.home / "state.db") as s:                          # row, no device
        s.execute("INSERT INTO taps (name, state, vm_id, created_at) VALUES ('tap-pool-8', 'claimed', ?, 0)",
                  (vm["id"],))
    idle = [n for n, r in _rows(netns).items() if r["state"] == "idle"]
    assert len(idle) == 1

    leaks = result(netns.call("pool.leaks(ctx)"))
    assert {(x["name"], x["reason"]) for x in leaks} == {
        (orphan, "claimed_without_vm"), ("tap-pool-7", "device_without_row"), ("tap-pool-8", "row_without_device")}

    # reap only what is still a leak: a name that is not one is ignored
    reaped = result(netns.call(f"pool.reap(ctx, [{orphan!r}, 'tap-pool-7', 'tap-pool-8', {live!r}])"))
    assert {x["name"] for x in reaped} == {orphan, "tap-pool-7", "tap-pool-8"}
    assert result(netns.call("pool.leaks(ctx)")) == []
    assert sorted(_taps(netns)) == sorted(_rows(netns)) == sorted([live, *idle])
    assert _rows(netns)[live]["vm_id"] == vm["id"]


def test_cli_status_json_envelope_and_usage_error(netns):
    netns.banger_json("pool", "warm", "2")
    result(netns.call("pool.claim(ctx, 'vm-a')"))
    doc = netns.banger_json("pool", "status")
    assert doc["ok"] is True and set(doc) == {"ok", "data", "_exit"} and doc["_exit"] == 0
    d = doc["data"]
    assert d["idle"] == 1 and d["claimed"] == 1 and d["total"] == 2
    assert d["bridge"]["name"] == "banger0" and d["bridge"]["has_address"] and d["bridge"]["up"]
    assert {t["name"]: t["state"] for t in d["taps"]} == {"tap-pool-0": "claimed", "tap-pool-1": "idle"}
    assert all(t["device"] and t["master"] == "banger0" for t in d["taps"])
    assert d["unknown_devices"] == [] and d["missing_devices"] == []

    human = netns.banger("pool", "status").stdout
    assert "tap-pool-0" in human and "claimed" in human and "172.30.0.1/24" in human

    bad = netns.banger_json("pool", "warm", "-1", check=False)
    assert bad["ok"] is False and bad["_exit"] == 2 and bad["error"]["code"] == "usage"
