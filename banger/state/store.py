"""The SQLite state database (WAL mode, busy timeout, user_version migrations).

Durable facts only: what VMs, images, kernels, TAPs and snapshots exist and their
settings.  Transient kernel state (pids, sockets) lives in each VM's
handles.json.  Every write is a short transaction; ``immediate()`` takes the
write lock up front (BEGIN IMMEDIATE) so read-then-write sequences such as the
name + IP reservation are atomic across processes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from banger.state.records import VmRecord

BUSY_TIMEOUT_MS = 30_000

MIGRATIONS: list[str] = [
    # v1
    """
    CREATE TABLE vms (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,
        image TEXT,
        kernel TEXT,
        backend TEXT,
        vcpu INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        overlay_size_mib INTEGER NOT NULL,
        work_disk_size_mib INTEGER NOT NULL,
        nat INTEGER NOT NULL DEFAULT 0,
        slot INTEGER NOT NULL UNIQUE,
        ip TEXT NOT NULL UNIQUE,
        mac TEXT NOT NULL,
        error TEXT,
        options TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE images (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        source TEXT,
        digest TEXT,
        kernel TEXT,
        rootfs TEXT NOT NULL,
        work_seed TEXT,
        key_fingerprint TEXT,
        size_bytes INTEGER,
        meta TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL
    );
    CREATE TABLE kernels (
        name TEXT PRIMARY KEY,
        version TEXT,
        source TEXT,
        dir TEXT NOT NULL,
        manifest TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL
    );
    CREATE TABLE taps (
        name TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('idle', 'claimed')),
        vm_id TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE stage_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id TEXT NOT NULL,
        op TEXT NOT NULL,
        stage TEXT NOT NULL,
        started_at REAL NOT NULL,
        duration_ms REAL,
        ok INTEGER,
        error TEXT
    );
    CREATE INDEX stage_events_vm ON stage_events(vm_id);
    CREATE TABLE snapshots (
        name TEXT PRIMARY KEY,
        vm_id TEXT,
        vm_name TEXT,
        backend TEXT NOT NULL,
        dir TEXT NOT NULL,
        meta TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL
    );
    """,
    # v2: published ports (banger.net.ports); one VM per host port and protocol, whatever the host address
    """
    CREATE TABLE published_ports (
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        proto TEXT NOT NULL CHECK (proto IN ('tcp', 'udp')),
        host_ip TEXT,
        host_port INTEGER NOT NULL CHECK (host_port BETWEEN 1 AND 65535),
        guest_port INTEGER NOT NULL CHECK (guest_port BETWEEN 1 AND 65535),
        created_at REAL NOT NULL,
        PRIMARY KEY (proto, host_port)
    );
    CREATE INDEX published_ports_vm ON published_ports(vm_id);
    """,
    # v3: templates (a snapshot of a freshly booted VM, keyed by content) and the warm VM pool
    # (rows in state `pooled` carrying their template's key; a claim is one UPDATE on that index)
    """
    ALTER TABLE vms ADD COLUMN pool_key TEXT;
    CREATE INDEX vms_pool ON vms(state, pool_key);
    ALTER TABLE snapshots ADD COLUMN kind TEXT NOT NULL DEFAULT 'user';
    CREATE TABLE templates (
        key TEXT PRIMARY KEY,
        snapshot TEXT NOT NULL UNIQUE,
        image TEXT,
        kernel TEXT,
        backend TEXT NOT NULL,
        vcpu INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        overlay_size_mib INTEGER NOT NULL,
        work_disk_size_mib INTEGER NOT NULL,
        parts TEXT NOT NULL DEFAULT '{}',
        build_ms REAL,
        created_at REAL NOT NULL
    );
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


@contextmanager
def _init_lock(db: Path):
    """Serialise the first open of a database (the switch to WAL and the migrations) across processes.

    Two processes switching a fresh database to WAL at once both take SQLite's SHARED lock to read
    the header; the one that then asks for RESERVED while the other holds it gets "database is
    locked" immediately (a lock upgrade inside a read transaction never waits: it could deadlock).
    Under load a preempted converter makes that window wide: parallel `kernel pull`s and `image
    pull`s on a new BANGER_HOME failed so in CI. A flock held only for this step closes it; the lock
    file sits beside the database and is never deleted."""
    import fcntl

    fd = os.open(db.with_name(db.name + ".init.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    from banger.errors import LockTimeout

                    raise LockTimeout(f"another process has been initialising {db} for {BUSY_TIMEOUT_MS // 1000}s",
                                      "check for a hung banger process (ps) and retry") from None
                time.sleep(0.005)
        yield
    finally:
        os.close(fd)


def _dict_factory(cursor, row):
    return {d[0]: row[i] for i, d in enumerate(cursor.description)}


class Store:
    """A connection to the state database. Cheap to open; one per command."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN ourselves, so transactions are explicit.
        self.conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        self.conn.row_factory = _dict_factory
        self.conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if not self._ready():
            with _init_lock(self.path):
                self._initialise()
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- schema ----
    def _ready(self) -> bool:
        """WAL already and the schema current: the common case, two reads and no lock."""
        return self.journal_mode == "wal" and self._version() >= SCHEMA_VERSION

    def _version(self) -> int:
        return self.one("PRAGMA user_version")["user_version"]

    def _initialise(self) -> None:
        """Switch to WAL and migrate; the caller holds the init lock (see _init_lock)."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while self.journal_mode != "wal":
            try:
                self.conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError as e:
                # Only a process outside banger's init lock (an old banger, a sqlite3 shell) can be
                # part-way through a rollback-journal write here; this switch is the one lock upgrade
                # SQLite's busy handler does not wait for, so wait it out ourselves.
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self._migrate()

    def _migrate(self) -> None:
        with self.immediate():
            version = self._version()
            for i in range(version, SCHEMA_VERSION):
                for stmt in MIGRATIONS[i].split(";"):
                    if stmt.strip():
                        self.conn.execute(stmt)
                self.conn.execute(f"PRAGMA user_version={i + 1}")

    @property
    def journal_mode(self) -> str:
        return self.conn.execute("PRAGMA journal_mode").fetchone()["journal_mode"]

    @contextmanager
    def immediate(self):
        """A short write transaction that holds the database write lock from the start.
        Nested use joins the enclosing transaction."""
        if self.conn.in_transaction:
            yield self.conn
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    def query(self, sql: str, params=()) -> list[dict]:
        return self.conn.execute(sql, params).fetchall()

    def one(self, sql: str, params=()) -> dict | None:
        # close the cursor at once: a statement left un-finished keeps a read transaction open, and
        # the next BEGIN IMMEDIATE on this connection would then fail with SQLITE_BUSY_SNAPSHOT
        cur = self.conn.execute(sql, params)
        try:
            return cur.fetchone()
        finally:
            cur.close()

    def execute(self, sql: str, params=()) -> int:
        """Run one write statement in its own BEGIN IMMEDIATE transaction; returns rowcount.

        Not plain autocommit: in WAL mode an implicit transaction that has started reading and then
        needs the write lock after another process committed fails at once with "database is
        locked" (SQLITE_BUSY_SNAPSHOT; the busy timeout does not apply). Taking the write lock first
        makes it wait its turn instead."""
        with self.immediate() as c:
            return c.execute(sql, params).rowcount

    # ---- vms ----
    def get_vm(self, ref: str):
        """The VM whose name is ``ref``, else whose id is ``ref``, else whose id starts with ``ref``
        (4+ hex digits, an exact prefix: no LIKE wildcards). An ambiguous prefix is an error."""
        row = self.one("SELECT * FROM vms WHERE name = ?", (ref,)) or self.one("SELECT * FROM vms WHERE id = ?", (ref,))
        if row is None and len(ref) >= 4 and all(c in "0123456789abcdef" for c in ref):
            rows = self.query("SELECT * FROM vms WHERE substr(id, 1, ?) = ? ORDER BY name", (len(ref), ref))
            if len(rows) > 1:
                from banger.errors import Conflict

                raise Conflict(f"{ref!r} is the start of {len(rows)} VM ids ({', '.join(r['name'] for r in rows)})",
                               "give more of the id, or the VM's name")
            row = rows[0] if rows else None
        return VmRecord.from_row(row)

    def vm_by_name(self, name: str):
        """Exactly the VM named ``name`` (for name-taken checks: ids and prefixes never count)."""
        return VmRecord.from_row(self.one("SELECT * FROM vms WHERE name = ?", (name,)))

    def vm_by_id(self, vm_id: str):
        return VmRecord.from_row(self.one("SELECT * FROM vms WHERE id = ?", (vm_id,)))

    def list_vms(self, *, pooled: bool = True) -> list:
        """Every VM row; ``pooled=False`` leaves out warm-pool clones (capacity, not user VMs)."""
        where = "" if pooled else "WHERE state != 'pooled' "
        return [VmRecord.from_row(r) for r in self.query(f"SELECT * FROM vms {where}ORDER BY created_at, name")]

    def update_vm(self, vm_id: str, **fields) -> None:
        """Update one VM row; a row that vanished meanwhile (deleted under us) is an error, never a no-op."""
        if "options" in fields and not isinstance(fields["options"], str):
            fields["options"] = json.dumps(fields["options"], sort_keys=True)
        if "nat" in fields:
            fields["nat"] = int(bool(fields["nat"]))
        fields["updated_at"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in fields)
        if self.execute(f"UPDATE vms SET {cols} WHERE id = ?", (*fields.values(), vm_id)) == 0:
            from banger.errors import NotFound

            raise NotFound(f"VM {vm_id} was deleted while this command was working on it",
                           "see `banger vm list`; run the command again if you still need it")

    def delete_vm_row(self, vm_id: str) -> None:
        with self.immediate() as c:
            c.execute("DELETE FROM stage_events WHERE vm_id = ?", (vm_id,))
            c.execute("DELETE FROM vms WHERE id = ?", (vm_id,))

    # ---- stage events ----
    def record_stage(self, vm_id: str, op: str, stage: str, started_at: float, duration_ms: float | None,
                     ok: bool | None, error: str | None = None) -> None:
        self.execute(
            "INSERT INTO stage_events (vm_id, op, stage, started_at, duration_ms, ok, error) VALUES (?,?,?,?,?,?,?)",
            (vm_id, op, stage, started_at, duration_ms, None if ok is None else int(ok), error),
        )

    def stages(self, vm_id: str, op: str | None = None) -> list[dict]:
        if op:
            return self.query("SELECT * FROM stage_events WHERE vm_id = ? AND op = ? ORDER BY id", (vm_id, op))
        return self.query("SELECT * FROM stage_events WHERE vm_id = ? ORDER BY id", (vm_id,))

    # ---- generic json-column helpers ----
    @staticmethod
    def dumps(obj) -> str:
        return json.dumps(obj, sort_keys=True)


def open_store(cfg) -> Store:
    return Store(cfg.db_path)
