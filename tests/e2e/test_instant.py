# ruff: noqa: F811  (pytest fixtures imported from tests.support are re-declared as arguments)
"""Templates, the warm VM pool and fork on real QEMU guests, every banger command inside a throwaway netns.

One test shares its guests to keep boots few (one template build = one cold boot; pool clones and forks are
restores): two pooled creates are checked for an identity of their own (name in `hostname` and
/etc/hostname, IP, MAC, pinned host key, machine-id), fresh entropy (32 bytes of /dev/urandom read right
after the claim differ), the host's clock, and isolation (what one writes the other never sees); a stale
template (the image's fingerprint changed) is not used; `vm fork --count 3` gives three working clones
while the source keeps running.
"""

from __future__ import annotations

import os
import time

from tests.support.e2e import (  # noqa: F401  (fixtures)
    default_image,
    default_kernel,
    netns,
    pulled_default_kernel,
    vmenv,
    wait_for,
)


def _sh(env, vm, script, **kw):
    return env.banger("vm", "exec", vm, "--", "sh", "-c", script, **kw).stdout


PROBE = ("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; hostname; cat /etc/hostname; "
         "cat /etc/machine-id; ip -4 -o addr show dev eth0 | awk '{print $4}'; cat /sys/class/net/eth0/address; "
         "cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub; date +%s.%N")


def _probe(env, name):
    t0 = time.time()
    out = _sh(env, name, PROBE).splitlines()
    t1 = time.time()
    keys = ["urandom", "hostname", "etc_hostname", "machine_id", "ip", "mac", "host_key", "clock"]
    d = dict(zip(keys, out, strict=True))
    d["clock_skew"] = float(d["clock"]) - (t0 + t1) / 2  # the guest's clock vs the host's, mid-call
    d["rtt"] = t1 - t0
    return d


def test_pool_claims_are_distinct_stale_templates_unused_and_fork(vmenv):
    env = vmenv
    w = env.banger_json("pool", "warm", "--vms", "2", timeout=900)["data"]
    assert w["template"]["built"] and len(w["created"]) == 2 and w["pooled"] == 2
    assert env.banger_json("vm", "list")["data"] == []  # pooled clones are not user VMs
    st = env.banger_json("pool", "status")["data"]["vms"]
    assert st["pooled"] == 2 and st["groups"][0]["current"] is True

    a = env.banger_json("vm", "create", "--name", "inst-a", timeout=300)["data"]
    pa = _probe(env, "inst-a")
    b = env.banger_json("vm", "create", "--name", "inst-b", timeout=300)["data"]
    pb = _probe(env, "inst-b")
    print(f"pooled create timings: a {a['timings']} b {b['timings']}")
    for v, p in ((a, pa), (b, pb)):
        assert v["made"]["how"] == "pool" and v["made"]["rng"] == "reseeded", v["made"]
        assert p["hostname"] == p["etc_hostname"] == v["name"]
        assert p["ip"] == f"{v['ip']}/24" and p["mac"] == v["mac"]
        pinned = (env.home / "vms" / v["id"] / "known_hosts").read_text().split()
        assert pinned[0] == v["ip"] and " ".join(pinned[1:3]) == p["host_key"]  # the key SSH checked
        assert abs(p["clock_skew"]) < 1.0 + p["rtt"] / 2, p
        assert len(p["machine_id"]) == 32
        assert env.banger("vm", "exec", v["name"], "--", "true").returncode == 0
    assert pa["urandom"] != pb["urandom"] and len(pa["urandom"]) == 64
    assert pa["host_key"] != pb["host_key"] and pa["machine_id"] != pb["machine_id"]
    assert a["ip"] != b["ip"] and a["mac"] != b["mac"]
    assert env.banger_json("pool", "status")["data"]["vms"]["pooled"] == 0

    # what one clone writes (work disk, overlay root, tmpfs) never appears in the other
    _sh(env, "inst-a", "echo a-only > /root/a.txt; echo a-only > /etc/a.txt; echo a-only > /tmp/a.txt; sync")
    assert _sh(env, "inst-b", "cat /root/a.txt /etc/a.txt /tmp/a.txt 2>/dev/null; true") == ""

    # a stale template (the image was rebuilt: its fingerprint changed) is never used
    env.banger_json("pool", "warm", "--vms", "1", timeout=900)
    rootfs = env.home / "images" / "debian-bookworm" / "rootfs.ext4"
    st0 = rootfs.stat()
    os.utime(rootfs, ns=(st0.st_atime_ns, st0.st_mtime_ns + 1_000_000_000))
    assert env.banger_json("template", "list")["data"][0]["stale"] is True
    c = env.banger_json("vm", "create", "--name", "inst-c", timeout=300)["data"]
    assert c["made"]["how"] == "cold"
    assert env.banger_json("pool", "status")["data"]["vms"]["pooled"] == 1
    env.banger_json("vm", "delete", "-f", "inst-c")
    assert len(env.banger_json("pool", "drain", "--vms")["data"]["drained"]) == 1

    # fork: three working clones of inst-a, which keeps running
    f = env.banger_json("vm", "fork", "inst-a", "--count", "3", "--name", "fk", timeout=900)["data"]
    print(f"fork of 3: {f['timings']}; {f['memory']}; clones ready at "
          f"{[c['ready_ms'] for c in f['clones']]} ms")
    assert [x["name"] for x in f["clones"]] == ["fk-1", "fk-2", "fk-3"] and not f["failed"]
    # each clone took its key from the standby sshd the source was asked for: no sshd restart (SIGHUP) in
    # any clone's console, pooled or forked
    assert f["timings"]["standby"] == "ready", f["timings"]
    for x in (a, b, *f["clones"]):
        console = (env.home / "vms" / x["id"] / "serial.log").read_text(errors="replace")
        assert "Received SIGHUP" not in console and "Server listening on" in console, console[-2000:]
    probes = [_probe(env, x["name"]) for x in f["clones"]]
    for x, p in zip(f["clones"], probes, strict=True):
        assert x["made"]["how"] == "fork" and x["made"]["source"] == "inst-a" and x["made"]["rng"] == "reseeded"
        assert p["hostname"] == p["etc_hostname"] == x["name"] and p["ip"] == f"{x['ip']}/24"
        assert abs(p["clock_skew"]) < 1.0 + p["rtt"] / 2, p
        # the fork carries the source's memory and disks as they were: a-only is there, in each
        assert _sh(env, x["name"], "cat /root/a.txt /tmp/a.txt") == "a-only\na-only\n"
    assert len({p["host_key"] for p in probes} | {pa["host_key"]}) == 4
    assert len({p["machine_id"] for p in probes} | {pa["machine_id"]}) == 4
    assert len({p["urandom"] for p in probes}) == 3
    assert env.banger_json("vm", "show", "inst-a")["data"]["state"] == "running"
    assert _probe(env, "inst-a")["hostname"] == "inst-a"
    # the handed-over sshd re-reads the clone's own key when it re-executes (its FIFO path became a symlink)
    _sh(env, "fk-1", "kill -HUP $(cat /run/sshd.pid)")
    wait_for(lambda: env.banger("vm", "exec", "fk-1", "--", "true", check=False).returncode == 0, 60,
             "fk-1's sshd after SIGHUP")  # (it refuses connections while it re-executes)
    assert _probe(env, "fk-1")["host_key"] == probes[0]["host_key"]
    _sh(env, "fk-1", "echo fk1-only > /root/f.txt")
    assert _sh(env, "fk-2", "cat /root/f.txt 2>/dev/null; true") == ""
    assert _sh(env, "inst-a", "cat /root/f.txt 2>/dev/null; true") == ""

    for n in ("fk-1", "fk-2", "fk-3", "inst-a", "inst-b"):
        env.banger_json("vm", "delete", "-f", n)
    assert env.banger_json("template", "rm", "--stale")["data"]
