"""SIGTERM / SIGHUP as interrupts, and shielded clean-ups: real signals sent to this process."""

from __future__ import annotations

import os
import signal

import pytest

from banger import interrupts
from banger.state import staging


@pytest.fixture
def installed():
    old = {s: signal.getsignal(s) for s in interrupts.SHIELDED}
    for s in interrupts.SHIELDED:
        signal.signal(s, signal.SIG_DFL if s != signal.SIGINT else signal.default_int_handler)
    interrupts.install()
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        interrupts._installed = False
        interrupts._pending.clear()


def test_sigterm_and_sighup_raise_terminated(installed):
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with pytest.raises(interrupts.Terminated) as ei:
            os.kill(os.getpid(), sig)
            for _ in range(1000):  # the handler runs at a bytecode boundary
                pass
        assert isinstance(ei.value, KeyboardInterrupt) and ei.value.exit_code == 128 + sig
        assert interrupts.reason(ei.value) == f"terminated by {sig.name}"


def test_shielded_defers_signals_to_its_end(installed):
    done = []
    with pytest.raises(interrupts.Terminated) as ei:
        with interrupts.shielded():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
            done.append("clean-up finished")  # not cut short
    assert done == ["clean-up finished"] and ei.value.signum == signal.SIGTERM  # the first one, once
    with interrupts.shielded():  # nothing left pending
        pass


def test_nested_shields_raise_once_at_the_outermost_end(installed):
    seen = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.shielded():
            with interrupts.shielded():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):
                    pass
            seen.append("inner ended quietly")
    assert seen == ["inner ended quietly"]


def test_owner_tag_names_a_live_or_dead_writer():
    tag = staging.owner_tag()
    assert staging.tagged_owner_alive(f"{tag}abcd.part") is True
    assert staging.tagged_owner_alive(".w1-99999999999.abcd.part") is False  # not when pid 1 started
    assert staging.tagged_owner_alive(".abcd1234.part") is None
