"""Real flock across real processes: same lock blocks, different locks do not."""

from __future__ import annotations

import time

import pytest

from banger.errors import LockTimeout
from banger.state.locks import Locks
from tests.support.procs import spawn_py

HOLD = """
import sys, time
from banger.state.locks import Locks
locks = Locks(sys.argv[1])
with locks.hold(sys.argv[2], purpose="test"):
    print("acquired", time.time(), flush=True)
    time.sleep(float(sys.argv[3]))
print("released", time.time(), flush=True)
"""


def _start_holder(locks_dir, name, seconds):
    p = spawn_py(HOLD, str(locks_dir), name, str(seconds))
    line = p.stdout.readline()
    assert line.startswith("acquired"), p.stderr.read()
    return p, float(line.split()[1])


def test_same_lock_blocks_other_process(tmp_path):
    p1, t1 = _start_holder(tmp_path, "vm/abc", 1.0)
    p2 = spawn_py(HOLD, str(tmp_path), "vm/abc", "0")
    line = p2.stdout.readline()
    t2 = float(line.split()[1])
    rel1 = float(p1.stdout.readline().split()[1])
    p1.wait(10), p2.wait(10)
    # the second process only got the lock after the first released it
    assert t2 >= rel1 - 0.005, (t2, rel1)
    assert t2 - t1 >= 0.9


def test_different_locks_do_not_block(tmp_path):
    p1, t1 = _start_holder(tmp_path, "vm/one", 2.0)
    p2, t2 = _start_holder(tmp_path, "vm/two", 0)
    p3, t3 = _start_holder(tmp_path, "image/one", 0)
    assert t2 - t1 < 1.0 and t3 - t1 < 1.0
    for p in (p1, p2, p3):
        p.wait(10)


def test_timeout_names_the_holder(tmp_path):
    p1, _ = _start_holder(tmp_path, "kernel/k1", 3.0)
    locks = Locks(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as ei:
        with locks.hold("kernel/k1", timeout=0.3):
            pass
    assert time.monotonic() - t0 < 2.0
    assert f"pid={p1.pid}" in ei.value.message and "kernel/k1" in ei.value.message
    assert ei.value.hint
    assert locks.is_held("kernel/k1")
    p1.wait(10)
    assert not locks.is_held("kernel/k1")


def test_lock_names_are_validated(tmp_path):
    from banger.errors import UsageError

    locks = Locks(tmp_path)
    for bad in ("vm/../x", "nope/abc", "vm/", "vm/a b"):
        with pytest.raises(UsageError):
            locks.path(bad)
    assert locks.path("pool").name == "pool.lock"
