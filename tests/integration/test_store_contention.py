"""32 real processes writing one SQLite database at once, on a loaded machine: not one
"database is locked".

Each round starts from a FRESH database (no file yet), as the first commands on a new host or in a
CI job do: every process opens it at the same instant (a real flock barrier, not a wall-clock
deadline), so the journal-mode switch and the schema migration race too, then each does a mix of
writes (a reservation's read-then-write, row updates, TAP-style claims, stage events, deletes) and
reads.  Two CPU-bound processes run beside them at a higher priority, so they are preempted inside
their critical windows, which is what made parallel pulls fail in CI.
"""

from __future__ import annotations

import json

from tests.support.procs import Barrier, cpu_burners, spawn_py

ROUNDS = 60
PROCS = 32

WORKER = """
import json, os, sys, time
from banger.names import Subnet
from banger.state.reservation import reserve_vm
from banger.state.store import Store
from tests.support.procs import barrier_wait

base, rounds = sys.argv[1], int(sys.argv[2])
me = os.getpid()
errors, ops = [], 0
for r in range(rounds):
    barrier_wait(f"{base}/go{r}")
    try:
        s = Store(f"{base}/db{r}/state.db")
        vm = reserve_vm(s, Subnet("172.30.0.0/22"), name=None, image="img", kernel="k", backend="qemu", vcpu=1,
                        memory_mib=256, overlay_size_mib=64, work_disk_size_mib=64)
        s.update_vm(vm["id"], state="running", options={"creator": {"pid": me}})
        s.execute("INSERT INTO taps (name, state, vm_id, created_at) VALUES (?, 'idle', NULL, ?)",
                  (f"tap-{me}-{r}", time.time()))
        with s.immediate() as c:  # claim one idle TAP (read-then-write)
            row = c.execute("SELECT name FROM taps WHERE state = 'idle' ORDER BY name LIMIT 1").fetchone()
            if row:
                c.execute("UPDATE taps SET state = 'claimed', vm_id = ? WHERE name = ?", (vm["id"], row["name"]))
        for i in range(3):
            s.record_stage(vm["id"], "create", f"step{i}", time.time(), 1.0, True)
        s.get_vm(vm["name"])
        s.list_vms()
        s.query("SELECT * FROM taps")
        if me % 2:
            s.delete_vm_row(vm["id"])
        s.close()
        ops += 1
    except Exception as e:  # noqa: BLE001
        errors.append(f"round {r}: {type(e).__name__}: {e}")
print(json.dumps({"errors": errors, "ops": ops}))
"""


def test_32_processes_mixed_writes_on_fresh_databases_under_load(tmp_path):
    barriers = [Barrier(tmp_path / f"go{r}", PROCS) for r in range(ROUNDS)]
    for r in range(ROUNDS):
        (tmp_path / f"db{r}").mkdir()
    burners = cpu_burners(2)
    try:
        workers = [spawn_py(WORKER, str(tmp_path), str(ROUNDS)) for _ in range(PROCS)]
        for b in barriers:
            b.release()
        results = []
        for p in workers:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for b in burners:
            b.kill()
            b.wait()
    errors = [e for r in results for e in r["errors"]]
    locked = [e for e in errors if "locked" in e]
    assert not locked, f"{len(locked)} 'database is locked' errors, e.g. {locked[:3]}"
    assert not errors, errors[:5]
    assert sum(r["ops"] for r in results) == ROUNDS * PROCS
    from banger.state.store import Store

    kept = sum(1 for p in workers if p.pid % 2 == 0)  # odd pids deleted their row again
    for r in range(ROUNDS):  # every round's writes are all there
        with Store(tmp_path / f"db{r}" / "state.db") as s:
            assert len(s.query("SELECT 1 FROM taps")) == PROCS
            assert len(s.list_vms()) == kept
            assert len({v["ip"] for v in s.list_vms()}) == kept


OPENER = """
import json, os, sys
from pathlib import Path
db = sys.argv[1]
from banger.state.store import Store
Path(f"{db}.ready.{os.getpid()}").touch()
try:
    s = Store(db)
    s.execute("INSERT INTO taps (name, state, created_at) VALUES (?, 'idle', 0)", (f"t{os.getpid()}",))
    print(json.dumps({"ok": True}))
except Exception as e:  # noqa: BLE001
    print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
"""


def _waiting(pid: int) -> bool:
    """True once ``pid`` has exited or sleeps (in a retry or lock wait), i.e. it is past its first try."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read()
    except FileNotFoundError:
        return True
    return state in "ZX" or (state == "S" and wchan in ("hrtimer_nanosleep", "locks_lock_inode_wait"))


def test_first_open_waits_for_a_process_midway_through_creating_the_database(tmp_path):
    """The window a preempted converter leaves, held open on purpose: another process is part-way
    through the first write of a brand-new database (rollback journal, RESERVED lock). Every opener
    must wait for it, not fail with "database is locked"."""
    import sqlite3
    import time

    db = tmp_path / "state.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the fresh file's RESERVED lock, as a converter holds it
    procs = [spawn_py(OPENER, str(db)) for _ in range(8)]
    try:
        deadline = time.monotonic() + 120
        while not (len(list(tmp_path.glob("state.db.ready.*"))) == len(procs)
                   and all(_waiting(p.pid) for p in procs)):
            assert time.monotonic() < deadline, "the openers never got past their first try"
            time.sleep(0.01)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    results = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(r["ok"] for r in results), results
    from banger.state.store import Store

    with Store(db) as s:
        assert s.journal_mode == "wal" and len(s.query("SELECT 1 FROM taps")) == len(procs)
