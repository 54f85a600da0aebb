"""A `vm create` SIGKILLed in each of its steps, then `banger gc`: nothing is left behind.

BANGER_TEST_PAUSE_AT=<step> makes create block right after that step finished (its
resources exist, no undo ran); the test kills it there, as a crash or OOM would.
"""

from __future__ import annotations

import signal

from tests.support.e2e import (  # noqa: F401
    assert_no_leaks,
    default_image,
    default_kernel,
    leaks,
    netns,
    pulled_default_kernel,
    vmenv,
    wait_for,
)
from tests.support.netns import banger_argv

STEPS = ["prepare", "disk.work", "disk.overlay", "net.tap", "vmm.launch", "guest.ssh"]


def test_create_killed_in_each_step_then_gc_leaves_nothing(vmenv):  # noqa: F811
    env = vmenv
    for step in STEPS:
        name = f"kill-{step.replace('.', '-')}"
        p = env.spawn(banger_argv("vm", "create", "--name", name, "--json"),
                      env={**env.env, "BANGER_TEST_PAUSE_AT": step})
        marker = wait_for(lambda: next(iter(env.run_dir.glob("paused-*")), None), 180, f"pause at {step}")
        assert marker.read_text().split()[:2] == ["create", step]
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
        before = leaks(env)
        assert before.get("rows") == [name], before  # the killed create left its row (and more) behind
        shown = env.banger_json("vm", "show", name)["data"]
        assert shown["state"] == "error" and "gc" in shown["error"]  # reconciled: its creator is dead
        if step in ("vmm.launch", "guest.ssh"):
            assert before.get("processes"), f"expected a VMM left running after a kill in {step}"
        if step in ("net.tap", "vmm.launch", "guest.ssh"):
            assert before.get("claimed_taps"), before
        rep = env.banger_json("gc")["data"]
        assert not rep["errors"] and [r["name"] for r in rep["rows"]] == [name], rep
        assert_no_leaks(env)
        marker.unlink(missing_ok=True)
    assert env.banger_json("gc", "--dry-run")["data"]["total"] == 0
