# ruff: noqa: F811  (pytest fixtures imported from tests.support are re-declared as arguments)
"""Snapshots of a real guest under QEMU (TCG here), every banger command inside a throwaway netns.

A guest writes files on its work disk, on its overlay root and in tmpfs (memory only)
and starts a process; after the snapshot the source changes all of them.  The clone
restored from the snapshot must show the snapshot-time state of each, answer SSH on
its OWN address (the guest learned it from the console control line) and have its
own hostname, while the source keeps running with its later state.
"""

from __future__ import annotations

import os

from tests.support.e2e import default_image, default_kernel, netns, pulled_default_kernel, vmenv  # noqa: F401  (fixtures)


def _exec(env, vm, script, **kw):
    return env.banger("vm", "exec", vm, "--", "sh", "-c", script, **kw)


def test_snapshot_restore_keeps_disk_root_and_memory_state(vmenv):  # noqa: F811
    env = vmenv
    src = env.banger_json("vm", "create", "--name", "snap-src", "--memory", "512", timeout=300)["data"]
    _exec(env, "snap-src", "echo disk-before > /root/f.txt; echo root-before > /etc/marker; "
                           "echo mem-before > /tmp/mem.txt; (sleep 100000 </dev/null >/dev/null 2>&1 &) ; sync")
    pid_before = _exec(env, "snap-src", "pidof sleep").stdout.strip()
    assert pid_before

    snap = env.banger_json("snapshot", "create", "snap-src", "snap-e2e", timeout=600)["data"]
    assert snap["backend"] == "qemu" and snap["vm_name"] == "snap-src"
    # the source was resumed and keeps changing things after the snapshot
    _exec(env, "snap-src", "echo disk-after > /root/f.txt; echo root-after > /etc/marker; "
                           "echo mem-after > /tmp/mem.txt; sync")

    clone = env.banger_json("vm", "restore", "snap-e2e", "--name", "snap-clone", timeout=600)["data"]
    assert clone["state"] == "running" and clone["ip"] != src["ip"] and clone["mac"] != src["mac"]
    print(f"qemu snapshot: create {snap['create_ms']} ms, {snap['size_bytes'] >> 20} MiB on disk; "
          f"restore {clone['restore']}")
    out = _exec(env, "snap-clone", "cat /root/f.txt /etc/marker /tmp/mem.txt; pidof sleep; hostname; "
                                   "ip -4 -o addr show dev eth0; cat /sys/class/net/eth0/address").stdout.split("\n")
    assert out[:3] == ["disk-before", "root-before", "mem-before"], out
    assert out[3] == pid_before, "the process running at snapshot time lives on in the clone"
    assert out[4] == "snap-clone"
    assert f" {clone['ip']}/" in out[5] and f" {src['ip']}/" not in out[5]
    assert out[6] == clone["mac"]
    # its own name in /etc/hostname too (banger-init writes it when it applies the console control line)
    assert _exec(env, "snap-clone", "cat /etc/hostname").stdout.strip() == "snap-clone"

    # the source is unaffected by the clone
    assert _exec(env, "snap-src", "cat /root/f.txt /tmp/mem.txt; hostname").stdout.split() == \
        ["disk-after", "mem-after", "snap-src"]

    # a restore that fails (a truncated migration stream) reports it and leaves nothing behind
    bad = env.banger_json("snapshot", "create", "snap-src", "snap-bad", timeout=600)["data"]
    state = os.path.join(bad["dir"], "vmstate.bin")
    os.truncate(state, os.path.getsize(state) // 3)
    r = env.banger_json("vm", "restore", "snap-bad", "--name", "bad-clone", check=False, timeout=600)
    assert not r["ok"] and r["_exit"] in (7, 8), r
    assert sorted(v["name"] for v in env.banger_json("vm", "list")["data"]) == ["snap-clone", "snap-src"]
    env.banger_json("snapshot", "rm", "snap-bad")

    env.banger_json("vm", "delete", "-f", "snap-clone")
    env.banger_json("vm", "delete", "-f", "snap-src")
    assert env.banger_json("snapshot", "rm", "snap-e2e")["data"][0]["deleted"] is True
    assert env.banger_json("snapshot", "list")["data"] == []
