"""Signals as exceptions, and shielding clean-up from them.

SIGTERM and SIGHUP (a closed terminal, ``timeout``, systemd stopping a unit, a CI cancel) behave
exactly like Ctrl-C: ``install()`` (called once by the CLI entry point) makes them raise
``Terminated``, a KeyboardInterrupt, so every ``except BaseException`` / ``finally`` that undoes work
on Ctrl-C also runs for them: plans unwind, ``vm run --rm`` deletes its VM, staging dirs go.

``shielded()`` defers SIGINT/SIGTERM/SIGHUP around a clean-up (an unwind, a publish, a resume of a
paused guest): a second signal cannot cut it in half; it is raised when the block ends.  With the
handlers installed the deferral is done by the handler itself (a signal that arrived just before the
block, whose Python handler had not run yet, is deferred too; processes spawned inside the block do
not inherit a blocked signal mask); without them (services used as a library) the signals are
blocked with the thread's signal mask instead.
"""

from __future__ import annotations

import _signal as signal  # the C module: `signal` would import enum (~1.5 ms on every command's start)

SHIELDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM / SIGHUP (see ``install``)."""

    def __init__(self, signum: int):
        super().__init__(_NAMES.get(signum, f"signal {signum}"))
        self.signum = signum
        self.exit_code = 128 + signum


_installed = False
_depth = 0            # nesting of shielded() blocks
_pending: list[int] = []


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _handler(signum, _frame):
    if _depth:
        if signum not in _pending:
            _pending.append(signum)
        return
    raise _exception(signum)


def install() -> None:
    """Make SIGINT raise KeyboardInterrupt and SIGTERM / SIGHUP raise ``Terminated`` in the main thread,
    each deferred while a ``shielded()`` block runs. Only signals still at their default are taken."""
    global _installed
    for s in SHIELDED:
        if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler, None):
            signal.signal(s, _handler)
    _installed = True


def reason(e: BaseException) -> str:
    if isinstance(e, Terminated):
        return f"terminated by {_NAMES.get(e.signum, f'signal {e.signum}')}"
    return "interrupted"


class shielded:
    """Defer SIGINT/SIGTERM/SIGHUP for the duration; the first one that came is raised when it ends.
    (A class, not a contextlib generator: importing contextlib is a start-up cost of every command.)"""

    def __enter__(self):
        global _depth
        self._old = None
        if not _installed:
            try:
                self._old = signal.pthread_sigmask(signal.SIG_BLOCK, SHIELDED)
            except (ValueError, OSError):  # not the main thread
                pass
            return self
        _depth += 1
        return self

    def __exit__(self, *exc):
        global _depth
        if not _installed:
            if self._old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, self._old)
            return False
        _depth -= 1
        if not _depth and _pending:
            signum = _pending[0]
            _pending.clear()
            raise _exception(signum)
        return False
