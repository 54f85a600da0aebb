"""The step engine: order, undo in reverse, timing rows, the failing step named."""

from __future__ import annotations

import pytest

from banger.context import Ctx
from banger.errors import BangerError, ExternalError
from banger.vms.plan import StepFailed, Steps


@pytest.fixture
def ctx(cfg):
    c = Ctx(cfg)
    yield c
    c.close()


def test_success_records_each_step_in_order(ctx):
    log = []
    s = Steps(ctx, "vm1", "create")
    assert s.run("a", lambda: log.append("a") or 1, lambda: log.append("undo a")) == 1
    s.run("b", lambda: log.append("b"), lambda: log.append("undo b"))
    s.forget()
    assert s.unwind() == []
    assert log == ["a", "b"]
    rows = ctx.store.stages("vm1", "create")
    assert [r["stage"] for r in rows] == ["a", "b"]
    assert all(r["ok"] == 1 and r["duration_ms"] >= 0 and r["started_at"] > 0 for r in rows)
    assert rows[0]["started_at"] <= rows[1]["started_at"]


def test_failure_unwinds_in_reverse_including_the_failing_step(ctx):
    log = []
    s = Steps(ctx, "vm2", "create")
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
    rows = ctx.store.stages("vm2")
    assert [(r["stage"], r["ok"]) for r in rows] == [
        ("a", 1), ("b", 1), ("c", 1), ("d", 0), ("undo:d", 1), ("undo:c", 1), ("undo:a", 1)]
    assert rows[3]["error"].endswith("disk on fire")


def test_unexpected_exception_is_wrapped_and_undo_errors_are_collected(ctx):
    s = Steps(ctx, "vm3", "start")

    def bad_undo():
        raise OSError("EBUSY")

    s.run("a", lambda: None, bad_undo)
    with pytest.raises(StepFailed) as ei:
        s.run("b", lambda: 1 / 0)
    assert isinstance(ei.value, BangerError) and "[step b] ZeroDivisionError" in ei.value.message
    errs = s.unwind()
    assert errs == ["undo a: OSError: EBUSY"]
    assert ctx.store.stages("vm3")[-1]["stage"] == "undo:a" and ctx.store.stages("vm3")[-1]["ok"] == 0


def test_keyboard_interrupt_is_not_wrapped_but_unwinds(ctx):
    log = []
    s = Steps(ctx, "vm4", "create")
    s.run("a", lambda: None, lambda: log.append("undo a"))

    def intr():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        s.run("b", intr)
    s.unwind()
    assert log == ["undo a"]
