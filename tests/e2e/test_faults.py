# ruff: noqa: F811  (pytest fixtures imported from tests.support)
"""Faults with real guests and real commands: gc running in a loop while VMs are created (cold and warm
TAP pool) and started; signals at every create stage and of `vm run --rm`; kill -9 of `snapshot create`
with the guest paused; `vm delete` racing `vm create`; gc during a `vm promote`.

Guest boots are few (the machine is loaded): one test boots the VMs the others do not need.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

from tests.support.e2e import (  # noqa: F401  (fixtures)
    assert_no_leaks,
    default_image,
    default_kernel,
    leaks,
    loops_under,
    netns,
    pulled_default_kernel,
    vmenv,
    wait_for,
)
from tests.support.netns import banger_argv, py_argv

STEPS = ["prepare", "disk.work", "disk.overlay", "net.tap", "vmm.launch", "guest.ssh"]


def _paused(env, step: str, op: str = "create", proc=None):
    def find():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{op} exited before pausing at {step}: {proc.communicate()}")
        for m in env.run_dir.glob("paused-*"):
            try:
                if m.read_text().split()[:2] == [op, step]:
                    return m
            except OSError:
                pass
        return None
    return wait_for(find, 300, f"{op} to pause at {step}")


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


class GcLoop:
    """`banger gc` run again and again in the background (as a cron job racing everything would)."""

    def __init__(self, env):
        self.env, self.runs, self.stop = env, [], threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self.stop.is_set():
            cp = self.env.run(banger_argv("gc", "--json"), timeout=300)
            self.runs.append((cp.returncode, cp.stdout, cp.stderr))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(600)

    def removed(self) -> list:
        """Everything any run removed (or failed on): nothing, while every resource has a live owner."""
        bad = []
        for code, out, err in self.runs:
            doc = json.loads(out)
            if code != 0 or not doc["ok"] or doc["data"]["total"] or doc["data"]["errors"]:
                bad.append(doc if doc.get("ok") else (code, out, err[-500:]))
        return bad


def test_gc_in_a_loop_spares_creates_starts_and_users_then_snapshot_kill_recovers(vmenv):
    env = vmenv
    env.banger_json("pool", "warm", "1")
    with GcLoop(env) as gc:
        # two creates at once: one takes the warm pooled TAP, the other has to create one (cold)
        procs = [env.spawn(banger_argv("vm", "create", "--name", n, "--json")) for n in ("gca", "gcb")]
        outs = [p.communicate(timeout=600) for p in procs]
        for p, (out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, (out, err[-2000:])
        vms = {d["name"]: d for d in (_last_json(o)["data"] for o, _ in outs)}
        # a user's own processes that name our files: never ours to kill
        vdir = vms["gca"]["dir"]
        tail = subprocess.Popen(["tail", "-f", f"{vdir}/serial.log"], stdout=subprocess.DEVNULL)
        reader = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", f"{vdir}/work.ext4",
                                   f"cp {vdir}/work.ext4 /tmp/x"])
        try:
            env.banger_json("vm", "stop", "gcb", timeout=300)
            env.banger_json("vm", "start", "gcb", timeout=600)
            n_before = len(gc.runs)
            wait_for(lambda: len(gc.runs) >= n_before + 2, 300, "two more gc runs")
        finally:
            gc.stop.set()
        assert tail.poll() is None and reader.poll() is None, "gc killed a user's process"
        tail.kill()
        reader.kill()
    assert len(gc.runs) >= 3 and gc.removed() == [], gc.removed()
    listed = {v["name"]: v["state"] for v in env.banger_json("vm", "list")["data"]}
    assert listed == {"gca": "running", "gcb": "running"}
    for n in ("gca", "gcb"):
        assert env.banger("vm", "exec", n, "--", "hostname").stdout.strip() == n

    # kill -9 of `snapshot create` while the guest is paused: every reader says so, gc resumes it,
    # the staging dir goes, and the same snapshot create then succeeds
    p = env.spawn(banger_argv("snapshot", "create", "gca", "gcsnap", "--json"),
                  env={**env.env, "BANGER_TEST_PAUSE_AT": "vmm.snapshot"})
    marker = _paused(env, "vmm.snapshot", "snapshot", p)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    marker.unlink()
    shown = env.banger_json("vm", "show", "gca")["data"]
    assert shown["state"] == "paused" and "gc" in shown["error"], shown
    cp = env.banger("vm", "exec", "--json", "gca", "--", "true", check=False)
    assert cp.returncode == 4 and "paused" in json.loads(cp.stdout)["error"]["message"]
    assert list((env.home / "staging").glob("snapshot-gcsnap-*"))
    rep = env.banger_json("gc")["data"]
    assert not rep["errors"] and [r["name"] for r in rep["resumed"]] == ["gca"], rep
    assert [s for s in rep["staging"] if "snapshot-gcsnap-" in s], rep
    assert env.banger_json("vm", "show", "gca")["data"]["state"] == "running"
    assert env.banger("vm", "exec", "gca", "--", "echo", "alive").stdout.strip() == "alive"
    snap = env.banger_json("snapshot", "create", "gca", "gcsnap", timeout=600)["data"]
    assert snap["name"] == "gcsnap" and snap["exists"]
    assert env.banger("vm", "exec", "gca", "--", "echo", "still").stdout.strip() == "still"
    env.banger_json("snapshot", "rm", "gcsnap")
    env.banger_json("vm", "delete", "-f", "gca", "gcb")
    assert env.banger_json("gc", "--dry-run")["data"]["total"] == 0


def test_signals_at_every_create_stage_and_vm_run_rm_leave_nothing_without_gc(vmenv):
    env = vmenv
    for i, step in enumerate(STEPS):
        sig = signal.SIGHUP if i % 2 else signal.SIGTERM
        name = f"sig-{step.replace('.', '-')}"
        p = env.spawn(banger_argv("vm", "create", "--name", name, "--json"),
                      env={**env.env, "BANGER_TEST_PAUSE_AT": step})
        marker = _paused(env, step, proc=p)
        p.send_signal(sig)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 128 + sig, (step, p.returncode, out, err[-2000:])
        doc = _last_json(out)
        assert doc["error"]["code"] == "interrupted" and sig.name in doc["error"]["message"], doc
        assert not marker.exists()
        # unwound, not merely abandoned: only the row with its reason is left (as after Ctrl-C)
        shown = env.banger_json("vm", "show", name)["data"]
        assert shown["state"] == "error" and f"terminated by {sig.name}" in shown["error"], shown
        assert leaks(env) == {"rows": [name]}, (step, leaks(env))
        env.banger_json("vm", "delete", name)
        assert_no_leaks(env)

    # `vm run --rm` terminated while its command runs in the guest: the VM goes
    p = env.spawn(banger_argv("vm", "run", "--rm", "--name", "sig-run", "--", "sh", "-c", "echo started; sleep 600"))
    wait_for(lambda: p.stdout.readline().strip() == "started", 600, "the guest command to start")
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=300)
    assert p.returncode == 143
    assert_no_leaks(env)

    # `vm run --rm` whose create fails after the row exists (SSH never answers): nothing is kept, and the
    # console tail is in the error
    (env.home / "config.toml").write_text("ssh_timeout_s = 1.0\n")
    try:
        cp = env.run(banger_argv("vm", "run", "--rm", "--json", "--name", "sig-slow", "--", "true"), timeout=300)
    finally:
        (env.home / "config.toml").unlink()
    doc = _last_json(cp.stdout)
    assert cp.returncode == 7 and doc["error"]["code"] == "timeout", doc
    assert "Serial console (last lines):" in doc["error"]["message"]
    assert "kept for inspection" not in doc["error"]["message"] and "removed" in doc["error"]["hint"]
    assert_no_leaks(env)


DELETER = """
import sys, time
from banger.context import Ctx
from banger.errors import InvalidState, NotFound
from banger.vms import lifecycle
ctx = Ctx()
name, stop = sys.argv[1], sys.argv[2]
import os
refused = deleted = 0
while not os.path.exists(stop):
    try:
        lifecycle.delete(ctx, name, force=True)
        deleted += 1
    except InvalidState:
        refused += 1
    except NotFound:
        pass
print(refused, deleted)
"""


def test_delete_racing_create(vmenv, tmp_path):
    env = vmenv
    # a create in progress (paused after its work disk) holds its row: delete says so at once
    p = env.spawn(banger_argv("vm", "create", "--no-start", "--name", "race-0", "--json"),
                  env={**env.env, "BANGER_TEST_PAUSE_AT": "disk.work"})
    _paused(env, "disk.work", proc=p)
    t0 = time.monotonic()
    doc = env.banger_json("vm", "delete", "-f", "race-0", check=False, timeout=60)
    assert doc["_exit"] == 4 and doc["error"]["code"] == "invalid_state", doc
    assert "being created" in doc["error"]["message"] and time.monotonic() - t0 < 30
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    env.banger_json("vm", "delete", "race-0")
    assert_no_leaks(env)

    # the race itself: a tight loop of deletes while creates run; every create either builds a whole VM
    # (which the deleter may remove afterwards) or never; none fails half way
    for i in range(1, 7):
        name = f"race-{i}"
        stop = tmp_path / f"stop-{i}"
        deleter = env.spawn(py_argv(DELETER, name, stop))
        cp = env.run(banger_argv("vm", "create", "--no-start", "--name", name, "--json"), timeout=300)
        stop.touch()
        dout, derr = deleter.communicate(timeout=120)
        assert deleter.returncode == 0, derr
        doc = _last_json(cp.stdout)
        assert cp.returncode == 0 and doc["ok"], (name, doc, cp.stderr[-2000:])
        env.banger_json("vm", "delete", "-f", name, check=False)
        assert_no_leaks(env)


def test_gc_spares_a_promote_in_progress_and_reclaims_a_killed_one(vmenv):
    env = vmenv
    env.banger_json("vm", "create", "--no-start", "--name", "promo-gc", timeout=300)
    p = env.spawn(banger_argv("vm", "promote", "promo-gc", "promoted-gc", "--json"),
                  env={**env.env, "BANGER_TEST_PAUSE_AT": "mount.merged"})
    marker = _paused(env, "mount.merged", "promote", p)
    loops = loops_under(env.home)
    assert len(loops) == 2  # the image's rootfs and the VM's overlay disk
    def promote_mounts():  # (ip netns exec gives each command its own mount namespace: look in the promote's)
        with open(f"/proc/{p.pid}/mounts") as f:
            return [ln for ln in f if str(env.home) in ln]

    mounts = promote_mounts()
    assert len(mounts) == 3  # the image's root, the VM's overlay, the merged view
    rep = env.banger_json("gc")["data"]
    assert not rep["errors"] and rep["total"] == 0, rep  # promote holds vm/<id>; its loops are on record
    assert sorted(loops_under(env.home)) == sorted(loops)
    assert promote_mounts() == mounts
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    marker.unlink()
    rep = env.banger_json("gc")["data"]
    assert not rep["errors"], rep
    assert sorted(lo["name"] for lo in rep["loops"]) == sorted(loops)
    assert loops_under(env.home) == []
    assert not list((env.home / "staging").iterdir())
    img = env.banger_json("vm", "promote", "promo-gc", "promoted-gc", timeout=600)["data"]
    assert img["name"] == "promoted-gc"
    env.banger_json("vm", "delete", "promo-gc")
    env.banger_json("image", "delete", "promoted-gc")
