"""WAL mode, migrations, and a kill -9 mid-transaction leaving the database consistent."""

from __future__ import annotations

import os
import signal
import sqlite3
import time

from banger.state.store import SCHEMA_VERSION, Store
from tests.support.procs import spawn_py


def test_wal_and_schema_version(tmp_path):
    with Store(tmp_path / "s.db") as s:
        assert s.journal_mode == "wal"
        assert s.one("PRAGMA user_version")["user_version"] == SCHEMA_VERSION
        tables = {r["name"] for r in s.query("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"vms", "images", "kernels", "taps", "stage_events", "snapshots"} <= tables
    # reopening is idempotent (no re-migration)
    with Store(tmp_path / "s.db") as s:
        assert s.one("PRAGMA user_version")["user_version"] == SCHEMA_VERSION


WRITER = """
import sys, time
from banger.state.store import Store
s = Store(sys.argv[1])
i = 0
while True:
    with s.immediate() as c:
        # a multi-statement transaction: both rows or neither
        c.execute("INSERT INTO taps (name, state, created_at) VALUES (?, 'idle', ?)", (f"a{i}", time.time()))
        if i == 50:
            print("in-transaction", flush=True)
        c.execute("INSERT INTO taps (name, state, created_at) VALUES (?, 'idle', ?)", (f"b{i}", time.time()))
        if i == 50:
            time.sleep(30)  # killed here, mid-transaction
    i += 1
"""


def test_kill_9_mid_transaction_leaves_db_consistent(tmp_path):
    db = tmp_path / "s.db"
    Store(db).close()
    p = spawn_py(WRITER, str(db))
    assert p.stdout.readline().strip() == "in-transaction"
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    with Store(db) as s:
        assert s.one("PRAGMA integrity_check")["integrity_check"] == "ok"
        names = {r["name"] for r in s.query("SELECT name FROM taps")}
        # every committed transaction is whole; the killed one left nothing
        assert {f"a{i}" for i in range(50)} | {f"b{i}" for i in range(50)} == names
        # and the database is writable straight away (no stale lock)
        t0 = time.monotonic()
        with s.immediate() as c:
            c.execute("INSERT INTO taps (name, state, created_at) VALUES ('after', 'idle', 0)")
        assert time.monotonic() - t0 < 1.0
    raw = sqlite3.connect(db)
    assert raw.execute("SELECT COUNT(*) FROM taps").fetchone()[0] == 101
