"""The TAP pool: persistent ``tap-pool-<n>`` devices attached to the bridge.

Rows in the ``taps`` table are the truth about ownership (``idle`` or ``claimed``
by a VM); the kernel is the truth about existence.  Rules:

* Creating or deleting pooled devices happens under the ``pool`` lock only, device
  first then row on create (a crash in between leaves a device without a row, which
  ``warm`` adopts and ``gc`` reports), row first then device on delete.
* ``claim`` on a warm pool takes no lock: one ``UPDATE ... WHERE name = (SELECT ...
  LIMIT 1)`` inside ``BEGIN IMMEDIATE`` hands out an idle TAP atomically, so
  concurrent claims never share one and never wait on TAP creation.  Only when the
  pool is empty does it take the ``pool`` lock and create one.
* Lock order: ``pool`` -> ``hostnet`` (the bridge is ensured before ``pool`` is taken).
"""

from __future__ import annotations

import re
import time

from banger.errors import Conflict, InvalidState, UsageError

PREFIX = "tap-pool-"
_NAME = re.compile(r"^tap-pool-(\d{1,6})$")
MAX_POOL = 4096


def is_pool_name(name: str) -> bool:
    return bool(_NAME.match(name or ""))


# ---------------------------------------------------------------------------
# reading

def _rows(store) -> list[dict]:
    return store.query("SELECT name, state, vm_id, created_at FROM taps ORDER BY created_at, name")


def _devices(nl) -> dict[str, dict]:
    return {link["name"]: link for link in nl.links(prefix=PREFIX) if is_pool_name(link["name"])}


def _usable(link: dict | None, bridge: str) -> bool:
    return bool(link and link["kind"] == "tun" and link["up"] and link["master"] == bridge)


def status(ctx) -> dict:
    """Rows joined with devices, plus the bridge (read only, no lock)."""
    from banger.net import bridge as hostnet
    from banger.net.netlink import Netlink

    with Netlink() as nl:
        devs = _devices(nl)
        rows = _rows(ctx.store)
        bridge = hostnet.bridge_state(ctx, nl)
    taps = []
    for r in rows:
        d = devs.get(r["name"])
        taps.append({**r, "device": d is not None, "up": bool(d and d["up"]), "master": d and d["master"],
                     "in_use": bool(d and d["carrier"])})
    known = {r["name"] for r in rows}
    return {
        "bridge": bridge,
        "idle": sum(1 for t in taps if t["state"] == "idle" and t["device"]),
        "claimed": sum(1 for t in taps if t["state"] == "claimed"),
        "total": len(taps),
        "taps": taps,
        "unknown_devices": sorted(n for n in devs if n not in known),
        "missing_devices": sorted(t["name"] for t in taps if not t["device"]),
    }


# ---------------------------------------------------------------------------
# creating (caller holds the pool lock)

def _next_name(store) -> str:
    import socket

    used = {r["name"] for r in store.query("SELECT name FROM taps")} | {n for _i, n in socket.if_nameindex()}
    for i in range(MAX_POOL * 4):
        name = f"{PREFIX}{i}"
        if name not in used:
            return name
    raise Conflict("no free TAP name left", "run banger pool drain and banger gc")


def _create(ctx, nl, *, vm_id: str | None = None) -> str:
    """Create one TAP attached to the bridge and insert its row (idle, or claimed by vm_id)."""
    name = _next_name(ctx.store)
    nl.add_tap(name, master=ctx.cfg.bridge, up=True)
    try:
        ctx.store.execute("INSERT INTO taps (name, state, vm_id, created_at) VALUES (?, ?, ?, ?)",
                          (name, "claimed" if vm_id else "idle", vm_id, time.time()))
    except BaseException:
        nl.del_link(name)
        raise
    return name


def _fix(nl, link: dict, bridge: str) -> None:
    if link["master"] != bridge:
        nl.set_master(link["name"], bridge)
    if not link["up"]:
        nl.set_up(link["name"])


def _repair(ctx, nl) -> dict:
    """Under the pool lock: drop idle rows whose device vanished, adopt unattached devices
    that lost their row, re-attach pooled devices that fell off the bridge (e.g. after the
    bridge was deleted and re-created)."""
    bridge = ctx.cfg.bridge
    devs = _devices(nl)
    rows = {r["name"]: r for r in _rows(ctx.store)}
    dropped, adopted, fixed = [], [], []
    for name, r in rows.items():
        if r["state"] == "idle" and name not in devs:
            ctx.store.execute("DELETE FROM taps WHERE name = ? AND state = 'idle'", (name,))
            dropped.append(name)
    for name, link in devs.items():
        if name in rows or link["kind"] != "tun" or link["carrier"]:
            continue  # a device some process has open is not ours to adopt: gc reports it
        _fix(nl, link, bridge)
        ctx.store.execute("INSERT OR IGNORE INTO taps (name, state, vm_id, created_at) VALUES (?, 'idle', NULL, ?)",
                          (name, time.time()))
        adopted.append(name)
    for name, _r in rows.items():  # idle or claimed: a re-created bridge lost all its ports
        link = devs.get(name)
        if link and link["kind"] == "tun" and not _usable(link, bridge):
            _fix(nl, link, bridge)
            fixed.append(name)
    return {"dropped_rows": dropped, "adopted_devices": adopted, "fixed": fixed}


def _warm_enough(ctx, nl, n: int) -> bool:
    """True when nothing needs doing: >= n usable idle TAPs, every pooled device usable,
    no adoptable device without a row."""
    bridge = ctx.cfg.bridge
    devs = _devices(nl)
    rows = _rows(ctx.store)
    names = {r["name"] for r in rows}
    if any(name not in names and link["kind"] == "tun" and not link["carrier"] for name, link in devs.items()):
        return False
    idle_ok = 0
    for r in rows:
        link = devs.get(r["name"])
        if r["state"] == "idle":
            if not _usable(link, bridge):
                return False
            idle_ok += 1
        elif link is not None and not _usable(link, bridge):
            return False
    return idle_ok >= n


# ---------------------------------------------------------------------------
# public operations

def warm(ctx, n: int) -> dict:
    """Ensure at least ``n`` idle pooled TAPs exist. Idempotent; a quick no-op when already warm."""
    from banger.net import bridge as hostnet
    from banger.net.netlink import Netlink

    if n < 0 or n > MAX_POOL:
        raise UsageError(f"pool size {n} is out of range", f"use a number from 0 to {MAX_POOL}")
    t0 = time.monotonic()
    with Netlink() as nl:
        bridge = hostnet.ensure_bridge(ctx, nl)
        if not bridge["changed"] and _warm_enough(ctx, nl, n):
            return _warm_result(ctx, n, [], None, bridge, t0, noop=True)
        with ctx.locks.hold("pool", purpose=f"pool warm {n}"):
            repaired = _repair(ctx, nl)
            idle = ctx.store.one("SELECT count(*) AS c FROM taps WHERE state = 'idle'")["c"]
            need = max(0, n - idle)
            created: list[str] = []
            if need:
                with ctx.progress.task(f"creating {need} TAP device(s)", need) as t:
                    for _ in range(need):
                        created.append(_create(ctx, nl))
                        t.advance(1)
        return _warm_result(ctx, n, created, repaired, bridge, t0, noop=False)


def _warm_result(ctx, n, created, repaired, bridge, t0, *, noop) -> dict:
    counts = {r["state"]: r["c"] for r in
              ctx.store.query("SELECT state, count(*) AS c FROM taps GROUP BY state")}
    return {"requested": n, "created": created, "noop": noop and not created,
            "repaired": repaired or {"dropped_rows": [], "adopted_devices": [], "fixed": []},
            "idle": counts.get("idle", 0), "claimed": counts.get("claimed", 0),
            "bridge": bridge["name"], "bridge_created": bridge["created"],
            "elapsed_ms": round((time.monotonic() - t0) * 1000, 1)}


def _claim_row(store, vm_id: str) -> tuple[str | None, bool]:
    """Atomically claim one idle row for vm_id. Returns (name, was_already_ours)."""
    with store.immediate() as c:
        mine = c.execute("SELECT name FROM taps WHERE vm_id = ? AND state = 'claimed' ORDER BY name LIMIT 1",
                         (vm_id,)).fetchone()
        if mine:
            return mine["name"], True
        row = c.execute(
            "UPDATE taps SET state = 'claimed', vm_id = ? "
            "WHERE name = (SELECT name FROM taps WHERE state = 'idle' ORDER BY created_at, name LIMIT 1) "
            "AND state = 'idle' RETURNING name", (vm_id,)).fetchone()
    return (row["name"] if row else None), False


def _drop_claimed(store, name: str, vm_id: str) -> None:
    store.execute("DELETE FROM taps WHERE name = ? AND vm_id = ? AND state = 'claimed'", (name, vm_id))


def _claim_existing(ctx, nl, vm_id: str) -> str | None:
    bridge = ctx.cfg.bridge
    for _ in range(16):
        name, _mine = _claim_row(ctx.store, vm_id)
        if name is None:
            return None
        link = nl.link(name)
        if link is not None and link["kind"] == "tun":
            _fix(nl, link, bridge)
            return name
        _drop_claimed(ctx.store, name, vm_id)  # its device vanished: forget it, take the next
    return None


def _claim_fast(ctx, vm_id: str) -> str | None:
    """Warm-pool claim verified through sysfs only (no pyroute2 import): the row update, then
    a check that the device is a TAP on our bridge and up. Anything else -> None, and the
    netlink path takes over (it finds the row already ours and repairs or replaces the device)."""
    from banger.net import fastnet

    name, _mine = _claim_row(ctx.store, vm_id)
    if name is None:
        return None
    link = fastnet.link(name)
    if link and link["kind"] == "tun" and link["master"] == ctx.cfg.bridge and link["up"]:
        return name
    return None


def claim(ctx, vm_id: str) -> str:
    """Claim a TAP for ``vm_id`` (the one it already holds, an idle pooled one, or a new one).

    The warm-pool path takes no lock. Idempotent per VM.
    """
    from banger.net import bridge as hostnet
    from banger.net.netlink import Netlink

    if not vm_id:
        raise UsageError("claim needs a VM id")
    name = _claim_fast(ctx, vm_id)
    if name:
        return name
    with Netlink() as nl:
        name = _claim_existing(ctx, nl, vm_id)
        if name:
            return name
        hostnet.ensure_bridge(ctx, nl)
        with ctx.locks.hold("pool", purpose=f"create TAP for {vm_id}"):
            name = _claim_existing(ctx, nl, vm_id)  # a warm may have refilled the pool while we waited
            if name:
                return name
            ctx.progress.step("TAP pool empty: creating a TAP (banger pool warm N keeps some ready)")
            return _create(ctx, nl, vm_id=vm_id)


def claimed_by(ctx, vm_id: str) -> list[str]:
    return [r["name"] for r in ctx.store.query("SELECT name FROM taps WHERE vm_id = ? ORDER BY name", (vm_id,))]


def release(ctx, vm_id: str, destroy: bool = False, *, detach_timeout: float = 3.0) -> dict:
    """Return ``vm_id``'s TAP(s) to the pool (down/up to flush state) or delete them. Idempotent.

    Returning a TAP that a process still has open would hand a busy device to the
    next VM, so that waits up to ``detach_timeout`` for the VMM to let go, then
    raises InvalidState (destroy=True deletes it regardless).
    """
    from banger.net.netlink import Netlink, _poll

    names = claimed_by(ctx, vm_id)
    out = {"vm_id": vm_id, "released": [], "destroyed": []}
    if not names:
        return out
    with Netlink() as nl:
        for name in names:
            if destroy:
                with ctx.locks.hold("pool", purpose=f"delete TAP of {vm_id}"):
                    ctx.store.execute("DELETE FROM taps WHERE name = ? AND vm_id = ?", (name, vm_id))
                    nl.del_link(name)
                out["destroyed"].append(name)
                continue
            link = nl.link(name)
            if link is None or link["kind"] != "tun":
                ctx.store.execute("DELETE FROM taps WHERE name = ? AND vm_id = ?", (name, vm_id))
                out["destroyed"].append(name)
                continue
            if link["carrier"]:  # a VMM still has it open: give an exiting one a moment
                _poll(lambda n=name: not (nl.link(n) or {}).get("carrier"), detach_timeout)
                link = nl.link(name)
                if link is None:
                    ctx.store.execute("DELETE FROM taps WHERE name = ? AND vm_id = ?", (name, vm_id))
                    out["destroyed"].append(name)
                    continue
                if link["carrier"]:
                    raise InvalidState(f"TAP {name} of VM {vm_id} is still open by a process",
                                       "stop the VM's VMM before releasing its TAP (banger vm stop), "
                                       "or release it with destroy")
            nl.set_up(name, False)  # flushes the port's learned FDB entries and qdisc
            nl.set_master(name, ctx.cfg.bridge)
            nl.set_up(name, True)
            ctx.store.execute("UPDATE taps SET state = 'idle', vm_id = NULL WHERE name = ? AND vm_id = ?",
                              (name, vm_id))
            out["released"].append(name)
    return out


def drain(ctx) -> dict:
    """Delete idle pooled TAPs (rows first, then devices); claimed ones stay."""
    from banger.net.netlink import Netlink

    with Netlink() as nl, ctx.locks.hold("pool", purpose="pool drain"):
        with ctx.store.immediate() as c:
            names = [r["name"] for r in c.execute("SELECT name FROM taps WHERE state = 'idle' ORDER BY name")]
            c.execute("DELETE FROM taps WHERE state = 'idle'")
        deleted = [n for n in names if nl.del_link(n)]
        kept = ctx.store.one("SELECT count(*) AS c FROM taps WHERE state = 'claimed'")["c"]
    return {"drained": names, "deleted_devices": deleted, "claimed_kept": kept}


# ---------------------------------------------------------------------------
# leaks (for banger gc)

def _leaks(ctx, nl) -> list[dict]:
    devs = _devices(nl)
    rows = _rows(ctx.store)
    vm_ids = {r["id"] for r in ctx.store.query("SELECT id FROM vms")}
    out = []
    for r in rows:
        dev = devs.get(r["name"])
        if r["state"] == "claimed" and r["vm_id"] not in vm_ids:
            out.append({"kind": "tap", "reason": "claimed_without_vm", "name": r["name"], "vm_id": r["vm_id"],
                        "device": dev is not None, "row": True})
        elif dev is None:
            out.append({"kind": "tap", "reason": "row_without_device", "name": r["name"], "vm_id": r["vm_id"],
                        "state": r["state"], "device": False, "row": True})
    names = {r["name"] for r in rows}
    for name, dev in sorted(devs.items()):
        if name not in names:
            out.append({"kind": "tap", "reason": "device_without_row", "name": name, "vm_id": None,
                        "device": True, "row": False, "in_use": dev["carrier"]})
    return out


def leaks(ctx) -> list[dict]:
    """Leaked TAPs: claimed rows whose VM is gone, tap-pool-* devices without a row, rows
    without a device. Idle pooled TAPs are capacity, not leaks. Read under the pool lock so
    a create or drain in progress is never mistaken for a leak."""
    from banger.net.netlink import Netlink

    with Netlink() as nl, ctx.locks.hold("pool", purpose="find TAP leaks"):
        return _leaks(ctx, nl)


def reap(ctx, names: list[str]) -> list[dict]:
    """Remove the given leaks (re-checked under the pool lock; names no longer leaking are skipped)."""
    from banger.net.netlink import Netlink

    wanted = set(names)
    done = []
    with Netlink() as nl, ctx.locks.hold("pool", purpose="reap TAP leaks"):
        for leak in _leaks(ctx, nl):
            if leak["name"] not in wanted:
                continue
            if leak["row"]:
                ctx.store.execute("DELETE FROM taps WHERE name = ?", (leak["name"],))
            if leak["device"]:
                nl.del_link(leak["name"])
            done.append(leak)
    return done
