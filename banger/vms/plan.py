"""Plans as data: a plan is a named list of steps, each with its undo (firecracker-go-sdk's handler
lists are the model), and one runner with one failure policy runs every plan.

* ``Step(name, do, undo, message)``: ``do(run)`` and ``undo(run)`` take the ``Run`` (the shared
  state of one execution: ctx, vm, and whatever earlier steps left on it, e.g. ``run.tap``).
  Undos must be idempotent: a failing step's undo runs too, since it may have built half.
* ``Plan(op, steps)`` is edited, never copied: ``replace``, ``insert_after``, ``insert_before`` and
  ``without`` return new plans.  Create, start and restore are one boot plan edited
  (banger.vms.plans, banger.snapshots.restore); a new way to make a VM is a new edit.
* ``execute(ctx, vm, plan, ...)`` runs it and applies THE failure policy:
    - an SSH timeout with the VMM alive keeps the VM for inspection (state running, error set);
    - otherwise every finished step is undone in reverse, shielded from further signals (a second
      Ctrl-C or a SIGTERM cannot abort the clean-up half way);
    - if an undo failed, the row stays ``error`` with what is left, so ``banger gc`` finds it;
    - else the row goes to ``unwound_state`` (with the reason) or is deleted (``delete_on_unwind``).
* ``Runner`` is the recorder underneath: each step's start and duration (and each undo's, as
  ``undo:<name>``) is buffered and written to ``stage_events`` in one transaction when the plan ends.

Test hook: ``BANGER_TEST_PAUSE_AT=<step>`` makes the runner stop right AFTER that step finished
(its resources exist, its undo has not run), write ``$BANGER_RUN/paused-<vm_id>`` (op, step, pid, start),
and block until killed.  The e2e suite SIGKILLs the command there and checks that ``banger gc``
leaves nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from banger.errors import BangerError, GuestTimeout
from banger.interrupts import SHIELDED, shielded  # noqa: F401  (re-exported: plan.shielded)

PAUSE_ENV = "BANGER_TEST_PAUSE_AT"


class StepFailed(BangerError):
    """Wraps a non-Banger exception raised inside a step, naming the step."""


class Step:
    __slots__ = ("name", "do", "undo", "message")

    def __init__(self, name: str, do: Callable[[Run], object], undo: Callable[[Run], object] | None = None,
                 message: str | Callable[[Run], str] | None = None):
        self.name, self.do, self.undo, self.message = name, do, undo, message

    def __repr__(self) -> str:
        return f"Step({self.name!r})"


class Plan:
    """An ordered list of steps for one operation (``op`` names it in stage_events)."""

    def __init__(self, op: str, steps: list[Step]):
        self.op = op
        self.steps = list(steps)
        names = self.names()
        if len(set(names)) != len(names):
            raise ValueError(f"plan {op!r} has duplicate step names: {names}")

    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def _index(self, name: str) -> int:
        for i, s in enumerate(self.steps):
            if s.name == name:
                return i
        raise KeyError(f"plan {self.op!r} has no step {name!r} (has {self.names()})")

    def replace(self, name: str, *steps: Step) -> Plan:
        i = self._index(name)
        return Plan(self.op, self.steps[:i] + list(steps) + self.steps[i + 1:])

    def insert_after(self, name: str, *steps: Step) -> Plan:
        i = self._index(name)
        return Plan(self.op, self.steps[:i + 1] + list(steps) + self.steps[i + 1:])

    def insert_before(self, name: str, *steps: Step) -> Plan:
        i = self._index(name)
        return Plan(self.op, self.steps[:i] + list(steps) + self.steps[i:])

    def without(self, *names: str) -> Plan:
        for n in names:
            self._index(n)
        return Plan(self.op, [s for s in self.steps if s.name not in names])

    def renamed(self, op: str) -> Plan:
        return Plan(op, self.steps)

    def __repr__(self) -> str:
        return f"Plan({self.op!r}, {self.names()})"


class Run:
    """The shared state of one plan execution. Steps read what earlier steps set (``run.tap``,
    ``run.handles``, ``run.transport``) and the plan's inputs (keyword arguments of ``execute``)."""

    def __init__(self, ctx, vm, op: str, **data):
        self.ctx, self.vm, self.op = ctx, vm, op
        self.handles: dict | None = None
        self.tap: str | None = None
        self.transport = None
        self.__dict__.update(data)


class _Done:
    __slots__ = ("name", "undo")

    def __init__(self, name, undo):
        self.name, self.undo = name, undo


class Runner:
    """Runs steps one by one, remembers their undos, times both, and writes the timings at the end."""

    def __init__(self, ctx, vm_id: str, op: str):
        self.ctx, self.vm_id, self.op = ctx, vm_id, op
        self.done: list[_Done] = []
        self.timings: list[dict] = []
        self.current: str | None = None
        self._pending: list[tuple] = []

    def run(self, name: str, do: Callable[[], object], undo: Callable[[], object] | None = None, *,
            message: str | None = None):
        """Run step ``name``. On failure its undo is registered too (undos are idempotent), then re-raised
        with the step named in the message."""
        self.current = name
        if message:
            self.ctx.progress.step(message)
        t0 = time.time()
        m0 = time.monotonic()
        try:
            result = do()
        except BaseException as e:
            dur = (time.monotonic() - m0) * 1000
            err = e.message if isinstance(e, BangerError) else f"{type(e).__name__}: {e}"
            self._record(name, t0, dur, False, err)
            self.done.append(_Done(name, undo))
            if isinstance(e, BangerError):
                if f"[step {name}]" not in e.message:
                    e.message = f"[step {name}] {e.message}"
                    e.args = (e.message,)
                e.details.setdefault("step", name)
                raise
            if isinstance(e, Exception):
                raise StepFailed(f"[step {name}] {type(e).__name__}: {e}",
                                 "this is unexpected; run with --debug for a traceback and report it",
                                 details={"step": name}) from e
            raise
        dur = (time.monotonic() - m0) * 1000
        self._record(name, t0, dur, True, None)
        self.done.append(_Done(name, undo))
        self.current = None
        self._maybe_pause(name)
        return result

    def _record(self, name, t0, dur, ok, err):
        self.timings.append({"stage": name, "started_at": t0, "duration_ms": round(dur, 2), "ok": ok,
                             "error": err})
        self._pending.append((self.vm_id, self.op, name, t0, dur, int(ok), err))

    def flush(self) -> None:
        """Write the buffered timings in one transaction (diagnostics: never turns success into failure)."""
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        try:
            with self.ctx.store.immediate() as c:
                c.executemany("INSERT INTO stage_events (vm_id, op, stage, started_at, duration_ms, ok, error) "
                              "VALUES (?,?,?,?,?,?,?)", rows)
        except Exception:  # noqa: BLE001
            pass

    def unwind(self) -> list[str]:
        """Run the undos in reverse order. Returns the errors of undos that failed (each is still recorded)."""
        errors = []
        while self.done:
            d = self.done.pop()
            if d.undo is None:
                continue
            t0 = time.time()
            m0 = time.monotonic()
            try:
                d.undo()
            except Exception as e:  # keep unwinding; report at the end
                msg = e.message if isinstance(e, BangerError) else f"{type(e).__name__}: {e}"
                errors.append(f"undo {d.name}: {msg}")
                self._record(f"undo:{d.name}", t0, (time.monotonic() - m0) * 1000, False, msg)
            else:
                self._record(f"undo:{d.name}", t0, (time.monotonic() - m0) * 1000, True, None)
        return errors

    def forget(self) -> None:
        """The operation succeeded: keep what was built."""
        self.done.clear()

    def _maybe_pause(self, name: str) -> None:
        if os.environ.get(PAUSE_ENV) == name:
            self.flush()
            pause_point(self.ctx, self.vm_id, self.op, name)


def pause_point(ctx, vm_id: str, op: str, name: str) -> None:
    """The test hook (module doc) for code outside a plan too (e.g. ``snapshot create`` with the guest
    paused): block here if BANGER_TEST_PAUSE_AT names this point. The marker goes when we are
    interrupted (a SIGTERM unwinds from here like from anywhere else)."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    from banger.host.procs import start_time

    marker = ctx.cfg.run / f"paused-{vm_id}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{op} {name} {os.getpid()} {start_time(os.getpid()) or 0}\n")
    try:
        while True:  # blocked until the test kills or signals us
            time.sleep(3600)
    finally:
        marker.unlink(missing_ok=True)


def _reason(e: BaseException) -> str:
    if isinstance(e, BangerError):
        return e.message
    if isinstance(e, KeyboardInterrupt):
        from banger.interrupts import reason

        return reason(e)
    return f"{type(e).__name__}: {e}"


def execute(ctx, vm, plan: Plan, *, success_state: str | None = "running", unwound_state: str = "error",
            delete_on_unwind: bool = False, keep_on_timeout: bool = True, **data) -> Run:
    """Run ``plan`` for ``vm`` (the caller holds vm/<id>) with the one failure policy (module doc).
    ``keep_on_timeout=False`` unwinds an SSH timeout too (``vm run --rm``: nothing is kept).
    Returns the Run; on failure re-raises after the policy was applied."""
    from banger.vms.runtime import RUNNING, vmm_alive

    runner = Runner(ctx, vm["id"], plan.op)
    run = Run(ctx, vm, plan.op, **data)
    run.runner = runner
    try:
        for step in plan.steps:
            msg = step.message(run) if callable(step.message) else step.message
            undo = (lambda s=step: s.undo(run)) if step.undo else None
            runner.run(step.name, lambda s=step: s.do(run), undo, message=msg)
        if success_state is not None:
            ctx.store.update_vm(vm["id"], state=success_state, error=None)
        runner.forget()
        return run
    except BaseException as e:
        with shielded():
            if (keep_on_timeout and isinstance(e, GuestTimeout) and runner.current == "guest.ssh"
                    and vmm_alive(ctx, vm, run.handles)):
                runner.forget()  # kept for inspection: `vm logs`, then `vm delete -f`
                e.message += "\nThe VM is kept for inspection."
                e.args = (e.message,)
                _mark(ctx, vm, state=RUNNING, error=e.message)
                raise
            if isinstance(e, GuestTimeout) and not keep_on_timeout and runner.current == "guest.ssh":
                e.hint = ("the VM was removed, as asked; its console is in the message. If the host is just "
                          "slow, raise ssh_timeout_s in config.toml")
            errs = runner.unwind()
            reason = _reason(e)
            if errs:  # keep the row in `error` so `banger gc` finds what could not be undone
                _mark(ctx, vm, state="error", error=reason + " (clean-up incomplete: " + "; ".join(errs)
                      + "; run banger gc)")
            elif delete_on_unwind:  # nothing is left behind: the reserved row goes too
                ctx.store.delete_vm_row(vm["id"])
            else:
                _mark(ctx, vm, state=unwound_state, error=reason)
        raise
    finally:
        runner.flush()


def _mark(ctx, vm, **fields) -> None:
    from banger.errors import NotFound

    try:
        ctx.store.update_vm(vm["id"], **fields)
    except NotFound:  # deleted meanwhile (e.g. `vm delete -f` of a broken VM): nothing to mark
        pass
