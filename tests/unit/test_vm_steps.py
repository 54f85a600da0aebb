"""The plan engine: order, undo in reverse, timing rows (one transaction), the failing step named,
plan editing, and the one failure policy of execute()."""

from __future__ import annotations

import pytest

from banger.context import Ctx
from banger.errors import BangerError, ExternalError
from banger.vms.plan import Plan, Runner, Step, StepFailed, execute


@pytest.fixture
def ctx(cfg):
    c = Ctx(cfg)
    yield c
    c.close()


def test_success_records_each_step_in_order(ctx):
    log = []
    s = Runner(ctx, "vm1", "create")
    assert s.run("a", lambda: log.append("a") or 1, lambda: log.append("undo a")) == 1
    s.run("b", lambda: log.append("b"), lambda: log.append("undo b"))
    s.forget()
    assert s.unwind() == []
    assert log == ["a", "b"]
    assert ctx.store.stages("vm1", "create") == []  # buffered until the plan ends
    s.flush()
    rows = ctx.store.stages("vm1", "create")
    assert [r["stage"] for r in rows] == ["a", "b"]
    assert all(r["ok"] == 1 and r["duration_ms"] >= 0 and r["started_at"] > 0 for r in rows)
    assert rows[0]["started_at"] <= rows[1]["started_at"]


def test_failure_unwinds_in_reverse_including_the_failing_step(ctx):
    log = []
    s = Runner(ctx, "vm2", "create")
    s.run("a", lambda: log.append("a"), lambda: log.append("undo a"))
    s.run("b", lambda: log.append("b"), None)
    s.run("c", lambda: log.append("c"), lambda: log.append("undo c"))

    def boom():
        log.append("d")
        raise ExternalError("disk on fire", "hint")

    with pytest.raises(ExternalError) as ei:
        s.run("d", boom, lambda: log.append("undo d"))
    assert "[step d]" in ei.value.message and ei.value.details["step"] == "d"
    assert s.unwind() == []
    assert log == ["a", "b", "c", "d", "undo d", "undo c", "undo a"]
    s.flush()
    rows = ctx.store.stages("vm2")
    assert [(r["stage"], r["ok"]) for r in rows] == [
        ("a", 1), ("b", 1), ("c", 1), ("d", 0), ("undo:d", 1), ("undo:c", 1), ("undo:a", 1)]
    assert rows[3]["error"].endswith("disk on fire")


def test_unexpected_exception_is_wrapped_and_undo_errors_are_collected(ctx):
    s = Runner(ctx, "vm3", "start")

    def bad_undo():
        raise OSError("EBUSY")

    s.run("a", lambda: None, bad_undo)
    with pytest.raises(StepFailed) as ei:
        s.run("b", lambda: 1 / 0)
    assert isinstance(ei.value, BangerError) and "[step b] ZeroDivisionError" in ei.value.message
    errs = s.unwind()
    assert errs == ["undo a: OSError: EBUSY"]
    s.flush()
    assert ctx.store.stages("vm3")[-1]["stage"] == "undo:a" and ctx.store.stages("vm3")[-1]["ok"] == 0


def test_keyboard_interrupt_is_not_wrapped_but_unwinds(ctx):
    log = []
    s = Runner(ctx, "vm4", "create")
    s.run("a", lambda: None, lambda: log.append("undo a"))

    def intr():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        s.run("b", intr)
    s.unwind()
    assert log == ["undo a"]


def test_plan_editing_returns_new_plans_and_rejects_unknown_steps():
    a, b, c = (Step(n, lambda r: None) for n in "abc")
    p = Plan("create", [a, b, c])
    assert p.replace("b", Step("x", lambda r: None), Step("y", lambda r: None)).names() == ["a", "x", "y", "c"]
    assert p.insert_after("a", Step("z", lambda r: None)).names() == ["a", "z", "b", "c"]
    assert p.insert_before("a", Step("z", lambda r: None)).names() == ["z", "a", "b", "c"]
    assert p.without("a", "c").names() == ["b"]
    assert p.names() == ["a", "b", "c"]  # the base list is never edited in place
    with pytest.raises(KeyError):
        p.without("nope")
    with pytest.raises(ValueError):
        Plan("x", [a, a])


def test_vm_plans_are_edits_of_one_boot_plan():
    from banger.snapshots.service import restore_plan
    from banger.vms import plans

    assert plans.create_plan().names() == ["prepare", "disk.work", "disk.overlay", "net.tap", "vmm.launch",
                                           "guest.ssh"]
    assert plans.create_plan(start=False).names() == ["prepare", "disk.work", "disk.overlay"]
    assert plans.start_plan(wait_ssh=False).names() == ["net.tap", "vmm.launch"]
    assert restore_plan().names() == ["snapshot.check", "snapshot.verify", "prepare", "disk.copy", "net.tap",
                                      "net.isolate", "vmm.restore", "snapshot.release", "guest.net", "net.join",
                                      "guest.ssh", "snapshot.verified", "net.unlearn"]
    assert restore_plan(wait_ssh=False).names()[-3:] == ["net.join", "snapshot.verified", "net.unlearn"]
    assert plans.create_plan().steps[3] is restore_plan().steps[4]  # shared steps (net.tap), not copies


def test_instant_plans_are_edits_of_the_boot_plan():
    from banger.snapshots.service import restore_plan
    from banger.templates import clone
    from banger.templates.service import build_plan
    from banger.vms import plans

    base = plans.boot_plan("x")
    assert build_plan().names() == [*base.names(), "guest.ready", "template.capture"]
    assert build_plan(wait_ssh=False).names() == [*base.without("guest.ssh").names(), "guest.ready",
                                                   "template.capture"]
    fill = clone.pool_fill_plan()
    assert fill.op == "pool-fill" and fill.names() == ["snapshot.check", "snapshot.verify", "prepare", "disk.copy",
                                                       "net.tap", "net.isolate", "vmm.restore", "snapshot.release",
                                                       "guest.identity", "net.join", "guest.ssh", "snapshot.verified",
                                                       "net.unlearn", "guest.release", "vmm.pause"]
    assert clone.claim_plan().names() == ["clone.check", "vmm.resume", "guest.identity", "guest.ssh"]
    assert clone.claim_plan(wait_ssh=False).names() == ["clone.check", "vmm.resume", "guest.identity"]
    # a fork's clones make their directory and TAP while the source's snapshot is written (fork.captured)
    assert clone.fork_plan().names() == ["snapshot.verify", "prepare", "net.tap", "net.isolate", "fork.captured",
                                         "disk.copy", "fork.wait", "vmm.restore", "snapshot.release",
                                         "guest.identity", "net.join", "guest.ssh", "snapshot.verified", "net.unlearn"]
    # shared steps, not copies: the TAP and SSH steps are the boot plan's own
    assert fill.steps[4] is base.steps[3] and clone.claim_plan().steps[-1] is base.steps[-1]  # net.tap, guest.ssh
    assert restore_plan().steps[6].do is fill.steps[6].do  # vmm.restore


def _row(ctx, name):
    from banger.names import Subnet
    from banger.state.reservation import reserve_vm

    return reserve_vm(ctx.store, Subnet(ctx.cfg.subnet), name=name, image="i", kernel="k", backend="qemu", vcpu=1,
                      memory_mib=256, overlay_size_mib=64, work_disk_size_mib=64)


def test_execute_unwinds_and_marks_the_row_with_the_reason(ctx):
    vm = _row(ctx, "pol-1")
    log = []

    def boom(run):
        raise ExternalError("no space", "free some")

    p = Plan("create", [Step("a", lambda r: log.append("a"), lambda r: log.append("undo a")), Step("b", boom)])
    with pytest.raises(ExternalError):
        execute(ctx, vm, p, unwound_state="error")
    row = ctx.store.vm_by_id(vm.id)
    assert log == ["a", "undo a"] and row.state == "error" and "no space" in row.error
    assert [r["stage"] for r in ctx.store.stages(vm.id)] == ["a", "b", "undo:a"]


def test_execute_failed_undo_leaves_error_for_gc_even_when_deleting(ctx):
    vm = _row(ctx, "pol-2")

    def bad_undo(run):
        raise OSError("EBUSY")

    def boom(run):
        raise ExternalError("x", "y")

    with pytest.raises(ExternalError):
        execute(ctx, vm, Plan("restore", [Step("a", lambda r: None, bad_undo), Step("b", boom)]),
                delete_on_unwind=True)
    row = ctx.store.vm_by_id(vm.id)
    assert row is not None and row.state == "error" and "clean-up incomplete" in row.error


def test_execute_clean_unwind_can_delete_the_row(ctx):
    vm = _row(ctx, "pol-3")

    def boom(run):
        raise ExternalError("x", "y")

    with pytest.raises(ExternalError):
        execute(ctx, vm, Plan("restore", [Step("a", lambda r: None, lambda r: None), Step("b", boom)]),
                delete_on_unwind=True)
    assert ctx.store.vm_by_id(vm.id) is None


def test_execute_success_sets_state_and_shares_run_state(ctx):
    vm = _row(ctx, "pol-4")

    def a(run):
        run.tap = "tap-x"

    def b(run):
        assert run.tap == "tap-x" and run.size == 7

    run = execute(ctx, vm, Plan("create", [Step("a", a), Step("b", b)]), size=7)
    assert run.tap == "tap-x" and ctx.store.vm_by_id(vm.id).state == "running"


def test_unwind_is_shielded_from_signals(ctx):
    import os
    import signal

    vm = _row(ctx, "pol-5")
    got = []
    old = signal.signal(signal.SIGTERM, lambda *a: got.append("term"))
    log = []

    def undo(run):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while unwinding: delivered only afterwards
        log.append("undo a finished")

    def boom(run):
        raise ExternalError("x", "y")

    try:
        with pytest.raises(ExternalError):
            execute(ctx, vm, Plan("create", [Step("a", lambda r: None, undo), Step("b", boom)]))
        assert log == ["undo a finished"] and got == ["term"]
    finally:
        signal.signal(signal.SIGTERM, old)
