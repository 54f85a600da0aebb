"""Real flock across real processes: same lock blocks, different locks do not."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from banger.errors import LockTimeout
from banger.state.locks import Locks

HOLD = """
import sys, time
from banger.errors import LockTimeout
from banger.state.locks import Locks
locks = Locks(sys.argv[1])
name, mode = sys.argv[2], sys.argv[3]
if mode == "probe":  # one try without waiting: proof, not timing, that another process holds it
    try:
        with locks.hold(name, timeout=0):
            print("free", flush=True)
    except LockTimeout:
        print("busy", flush=True)
with locks.hold(name, purpose="test"):
    print("acquired", time.time(), flush=True)
    sys.stdin.readline()  # held until the test says so (or closes our stdin)
print("released", time.time(), flush=True)
"""


def _holder(locks_dir, name, mode="hold"):
    """A process that (after a probe, with mode "probe") holds ``name`` until ``_release(p)``."""
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD), str(locks_dir), name, mode],
                         env=os.environ.copy(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    return p


def _line(p) -> list[str]:
    line = p.stdout.readline()
    assert line, p.stderr.read()
    return line.split()


def _release(p) -> float:
    p.stdin.write("go\n")
    p.stdin.flush()
    words = _line(p)
    assert words[0] == "released", words
    p.wait(30)
    return float(words[1])


def test_same_lock_blocks_other_process(tmp_path):
    p1 = _holder(tmp_path, "vm/abc")
    assert _line(p1)[0] == "acquired"
    p2 = _holder(tmp_path, "vm/abc", "probe")
    assert _line(p2) == ["busy"]  # held by p1: refused at once
    rel1 = _release(p1)
    words = _line(p2)  # ... and granted once p1 let go
    assert words[0] == "acquired" and float(words[1]) >= rel1 - 0.005, (words, rel1)
    _release(p2)


def test_different_locks_do_not_block(tmp_path):
    p1 = _holder(tmp_path, "vm/one")
    assert _line(p1)[0] == "acquired"
    others = [_holder(tmp_path, n, "probe") for n in ("vm/two", "image/one")]
    for p in others:
        assert _line(p) == ["free"]  # taken without waiting while vm/one is held
        assert _line(p)[0] == "acquired"
    for p in (*others, p1):
        _release(p)


def test_timeout_names_the_holder(tmp_path):
    p1 = _holder(tmp_path, "kernel/k1")
    assert _line(p1)[0] == "acquired"
    locks = Locks(tmp_path)
    with pytest.raises(LockTimeout) as ei:
        with locks.hold("kernel/k1", timeout=0.3):
            pass
    assert f"pid={p1.pid}" in ei.value.message and "kernel/k1" in ei.value.message
    assert ei.value.hint
    assert locks.is_held("kernel/k1")
    _release(p1)
    assert not locks.is_held("kernel/k1")


def test_lock_names_are_validated(tmp_path):
    from banger.errors import UsageError

    locks = Locks(tmp_path)
    for bad in ("vm/../x", "nope/abc", "vm/", "vm/a b"):
        with pytest.raises(UsageError):
            locks.path(bad)
    assert locks.path("pool").name == "pool.lock"
