"""The step engine: an ordered list of named steps, each with an undo (firecracker-go-sdk style).

``Steps.run(name, do, undo)`` runs one step, records its start time and duration in
``stage_events`` (store.record_stage) and remembers its undo.  When a later step
fails, ``Steps.unwind()`` runs the recorded undos in reverse order (each undo is
itself timed and recorded as ``undo:<name>``), so nothing a failed operation built
is left behind.  The undo of the failing step runs too: a step may have built half
of what it promised, so undos must be idempotent (tolerate "already gone").

Test hook: ``BANGER_TEST_PAUSE_AT=<step>`` makes the engine stop right AFTER that
step finished (its resources exist, its undo is not yet run), write
``$BANGER_RUN/paused-<vm_id>`` naming the step, and block until killed.  The e2e
suite SIGKILLs the command there and checks that ``banger gc`` leaves nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from banger.errors import BangerError

PAUSE_ENV = "BANGER_TEST_PAUSE_AT"


class StepFailed(BangerError):
    """Wraps a non-Banger exception raised inside a step, naming the step."""


@dataclass
class _Done:
    name: str
    undo: Callable[[], Any] | None


@dataclass
class Steps:
    ctx: Any
    vm_id: str
    op: str
    done: list[_Done] = field(default_factory=list)
    timings: list[dict] = field(default_factory=list)
    current: str | None = None

    def run(self, name: str, do: Callable[[], Any], undo: Callable[[], Any] | None = None, *,
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
        try:
            self.ctx.store.record_stage(self.vm_id, self.op, name, t0, dur, ok, err)
        except Exception:  # timing rows are diagnostics; never turn a success into a failure
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
        if os.environ.get(PAUSE_ENV) != name:
            return
        marker = self.ctx.cfg.run / f"paused-{self.vm_id}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{self.op} {name} {os.getpid()}\n")
        while True:  # blocked until the test kills us
            time.sleep(3600)
