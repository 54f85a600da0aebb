"""The warm VM pool: clones of a template restored ahead of time and kept PAUSED, each already holding
its own slot (IP, MAC), TAP, overlay and work disks, SSH host key (pinned) and machine-id.

Rows: a clone being filled is ``creating`` (its filler is its creator); a ready one is ``pooled`` with
``pool_key`` = its template's key; a claim moves it to ``claiming`` and then ``running``.  Pooled rows
are capacity, not user VMs: `vm list` hides them (``--all`` shows them), `banger gc` leaves them alone
while their VMM lives.

* ``warm(n, spec)``: under ``vmpool/<key>`` (cron-safe: a second warm waits, then finds enough),
  drop clones that died or whose template went stale for the same image/kernel/shape, make sure the
  template exists (banger.templates.service.ensure), and fill up to ``n`` with ``pool_fill_plan``.
* ``claim(spec, name)``: ONE ``UPDATE ... WHERE id = (SELECT ... state = 'pooled' AND pool_key = ? LIMIT 1)
  AND state = 'pooled' RETURNING id`` hands out a clone (two claims never get the same one, no lock
  is taken for it), then ``claim_plan`` under ``vm/<id>`` renames it, sets its clock, reseeds its
  RNG, resumes it and waits for SSH.  No clone, or a key that does not match (stale template): None,
  and `vm create` boots cold.  A claim never waits for a refill.
* A claimer killed before it resumed the clone leaves a ``claiming`` row whose creator is gone:
  ``recover`` (called by gc) puts a clone that is still paused back in the pool, and makes one that was
  already resumed an ordinary running VM (claimed).  Either way nothing leaks.
"""

from __future__ import annotations

import json
import os
import time

from banger.errors import BangerError, Conflict, UsageError
from banger.vms import runtime as rt

POOLED, CLAIMING = "pooled", "claiming"
MAX_VMS = 256


def _me() -> dict:
    from banger.host import procs

    return {"pid": os.getpid(), "start": procs.start_time(os.getpid())}


# ---------------------------------------------------------------- reading
def pooled(ctx, key: str | None = None) -> list:
    from banger.state.records import VmRecord

    if key is None:
        rows = ctx.store.query("SELECT * FROM vms WHERE state = 'pooled' ORDER BY created_at, id")
    else:
        rows = ctx.store.query("SELECT * FROM vms WHERE state = 'pooled' AND pool_key = ? ORDER BY created_at, id",
                               (key,))
    return [VmRecord.from_row(r) for r in rows]


def status(ctx) -> dict:
    """Pooled clones grouped by template key, with liveness and whether their key is still current."""
    from banger.templates import service as templates

    tpl = {t["key"]: t for t in templates._rows(ctx)}
    current = {k: templates.current_key(ctx, t) == k for k, t in tpl.items()}
    groups: dict[str, dict] = {}
    for vm in pooled(ctx):
        k = vm["pool_key"] or ""
        t = tpl.get(k)
        g = groups.setdefault(k, {"key": k[:12], "full_key": k, "image": vm["image"], "kernel": vm["kernel"],
                                  "backend": vm["backend"], "vcpu": vm["vcpu"], "memory_mib": vm["memory_mib"],
                                  "template": t["snapshot"] if t else None, "current": current.get(k, False),
                                  "vms": []})
        alive = rt.vmm_alive(ctx, vm)
        g["vms"].append({"id": vm["id"], "name": vm["name"], "ip": vm["ip"], "mac": vm["mac"],
                         "alive": alive, "tap": rt.load_handles(ctx, vm).get("tap") if alive else None})
    claiming = [{"id": v["id"], "name": v["name"]} for v in ctx.store.list_vms() if v["state"] == CLAIMING]
    return {"groups": list(groups.values()), "pooled": sum(len(g["vms"]) for g in groups.values()),
            "claiming": claiming}


# ---------------------------------------------------------------- fill
def _fill_one(ctx, t, snap: dict, *, wait_ssh: bool):
    from contextlib import ExitStack
    from pathlib import Path

    from banger.names import new_vm_id
    from banger.templates import clone
    from banger.vms import plan

    meta = snap["meta"]
    name = f"pool-{new_vm_id()}"
    vm = clone.reserve_clone(ctx, meta, backend=t["backend"], name=name, role="pool",
                             made={"how": "pool", "template": t["key"][:12], "snapshot": t["snapshot"]})
    ctx.store.update_vm(vm["id"], pool_key=t["key"])
    vm = ctx.store.vm_by_id(vm["id"])
    timings: dict = {}
    with ctx.locks.hold(f"vm/{vm['id']}", purpose="pool fill"), ExitStack() as snap_lock:
        snap_lock.enter_context(ctx.locks.hold(f"snapshot/{t['snapshot']}", purpose="pool fill"))
        plan.execute(ctx, vm, clone.pool_fill_plan(wait_ssh=wait_ssh), success_state=POOLED, delete_on_unwind=True,
                     snapshot=t["snapshot"], sdir=Path(snap["dir"]), meta=meta, snap_lock=snap_lock,
                     timings=timings, t0=time.monotonic())
    return vm["id"]


def _drop_clone(ctx, vm_id: str, *, expect: str = POOLED) -> bool:
    """Take one clone out of the pool for good (state ``expect`` -> gone). False if someone else took it."""
    with ctx.store.immediate() as c:
        n = c.execute("UPDATE vms SET state = 'creating', options = json_set(options, '$.creator', json(?)), "
                      "updated_at = ? WHERE id = ? AND state = ?",
                      (json.dumps(_me()), time.time(), vm_id, expect)).rowcount
    if not n:
        return False
    vm = ctx.store.vm_by_id(vm_id)
    with ctx.locks.hold(f"vm/{vm_id}", purpose="pool drain"):
        rt.destroy_vm(ctx, vm)
    return True


def _same_shape(vm, spec) -> bool:
    return (vm["image"], vm["kernel"], vm["backend"], vm["vcpu"], vm["memory_mib"], vm["overlay_size_mib"],
            vm["work_disk_size_mib"]) == (spec.img["name"], spec.ker["name"], spec.backend, spec.vcpu,
                                          spec.memory_mib, spec.overlay_size_mib, spec.work_disk_size_mib)


def warm(ctx, n: int, *, image: str | None = None, kernel: str | None = None, backend: str | None = None,
         vcpu: int | None = None, memory_mib: int | None = None, wait_ssh: bool = True) -> dict:
    """Keep at least ``n`` paused clones of the template for this spec. Idempotent, cron-safe."""
    from banger.templates import service as templates

    if not 0 <= n <= MAX_VMS:
        raise UsageError(f"--vms {n} is out of range", f"use a number from 0 to {MAX_VMS}")
    t0 = time.monotonic()
    spec = templates.resolve_spec(ctx, image=image, kernel=kernel, backend=backend, vcpu=vcpu, memory_mib=memory_mib)
    out = {"requested": n, "key": spec.key[:12], **spec.describe(), "created": [], "dropped": [],
           "template": None, "noop": False}
    with ctx.locks.hold(f"vmpool/{spec.key}", purpose=f"pool warm --vms {n}"):
        for vm in pooled(ctx):
            stale = vm["pool_key"] != spec.key and _same_shape(vm, spec)
            if stale or not rt.vmm_alive(ctx, vm):  # a clone whose VMM died, or of an outdated template
                if _drop_clone(ctx, vm["id"]):
                    out["dropped"].append({"name": vm["name"], "reason": "stale template" if stale else "VMM gone"})
        have = len(pooled(ctx, spec.key))
        need = max(0, n - have)
        if need:
            tv = templates.ensure(ctx, spec, wait_ssh=wait_ssh)
            out["template"] = {"id": tv["id"], "built": tv["built"], "build_ms": tv["build_ms"]}
            t = templates._row(ctx, spec.key)
            snap = templates.snapshot_of(ctx, t)
            with ctx.progress.task(f"restoring {need} paused clone(s)", need) as task:
                for _ in range(need):
                    tf = time.monotonic()
                    vm_id = _fill_one(ctx, t, snap, wait_ssh=wait_ssh)
                    out["created"].append({"id": vm_id, "ms": round((time.monotonic() - tf) * 1000, 1)})
                    task.advance(1)
        else:
            out["noop"] = not out["dropped"]
        out["pooled"] = len(pooled(ctx, spec.key))
    out["elapsed_ms"] = round((time.monotonic() - t0) * 1000, 1)
    return out


def drain(ctx) -> dict:
    """Remove every pooled clone (their TAPs go back to the TAP pool)."""
    out = []
    for vm in pooled(ctx):
        if _drop_clone(ctx, vm["id"]):
            out.append({"id": vm["id"], "name": vm["name"]})
    return {"drained": out}


# ---------------------------------------------------------------- claim
def _take(ctx, key: str, name: str | None):
    """ONE update hands out a pooled clone of ``key`` to this process, renamed. None: none left."""
    from banger.names import generate_name

    now = time.time()
    with ctx.store.immediate() as c:
        if name is None:
            for _ in range(50):
                cand = generate_name()
                if c.execute("SELECT 1 FROM vms WHERE name = ?", (cand,)).fetchone() is None:
                    name = cand
                    break
        elif c.execute("SELECT 1 FROM vms WHERE name = ?", (name,)).fetchone() is not None:
            raise rt.name_taken(name)
        made = {"how": "pool", "template": key[:12], "claimed_at": now}
        row = c.execute(
            "UPDATE vms SET state = 'claiming', name = ?, error = NULL, updated_at = ?, "
            "options = json_set(json_remove(options, '$.role'), '$.creator', json(?), '$.pool_name', name, "
            "'$.made', json_patch(coalesce(json_extract(options, '$.made'), '{}'), json(?))) "
            "WHERE id = (SELECT id FROM vms WHERE state = 'pooled' AND pool_key = ? ORDER BY created_at, id LIMIT 1) "
            "AND state = 'pooled' RETURNING id",
            (name, now, json.dumps(_me()), json.dumps(made), key)).fetchone()
    return ctx.store.vm_by_id(row["id"]) if row else None


def has_pooled(ctx) -> bool:
    return ctx.store.one("SELECT 1 AS x FROM vms WHERE state = 'pooled' LIMIT 1") is not None


def claim(ctx, spec, *, name: str | None = None, wait_ssh: bool = True):
    """Claim a pooled clone for ``spec`` (a banger.templates.service.Spec) and bring it up as ``name``.
    Returns the finished Run, or None when the pool has no (live) clone for this key."""
    from banger.templates import clone
    from banger.vms import plan

    for _ in range(4):  # a clone whose VMM died while pooled is discarded; take the next
        vm = _take(ctx, spec.key, name)
        if vm is None:
            return None
        if wait_ssh:  # paramiko's import (~0.1 s) overlaps the resume and the guest's rename
            from banger.guest import ssh

            ssh.preload()
        with ctx.locks.hold(f"vm/{vm['id']}", purpose="claim"):
            vm = ctx.store.vm_by_id(vm["id"])
            if vm is None:  # deleted (`vm delete` of the pooled row) between the update and the lock
                continue
            if not rt.vmm_alive(ctx, vm):  # died while pooled: drop it, take the next
                rt.destroy_vm(ctx, vm)
                continue
            try:
                return plan.execute(ctx, vm, clone.claim_plan(wait_ssh=wait_ssh), success_state=rt.RUNNING,
                                    delete_on_unwind=True, timings={}, t0=time.monotonic())
            except BangerError as e:
                if e.code in ("timeout",) and ctx.store.vm_by_id(vm["id"]) is not None:
                    raise  # kept for inspection (SSH did not answer): the create fails as a cold one would
                ctx.progress.step(f"the pooled clone failed ({e.message}); booting cold instead")
                return None
    return None




def recover(ctx, vm, *, dry_run: bool = False) -> str | None:
    """A ``claiming`` row whose claimer died (gc; caller holds vm/<id>): back to the pool while its VMM is
    still paused and never resumed, else claimed (running). Returns what was done."""
    from banger.errors import NotFound

    h = rt.load_handles(ctx, vm)
    if not rt.vmm_alive(ctx, vm, h):
        if not dry_run:
            rt.destroy_vm(ctx, vm)
        return "removed (VMM gone)"
    paused = _is_paused(ctx, vm, h)
    if dry_run:
        return "back to the pool" if paused else "claimed"
    o = dict(vm["options"] or {})
    o.pop("creator", None)
    try:
        if paused:
            o.setdefault("made", {}).pop("claimed_at", None)
            o["role"] = "pool"
            ctx.store.update_vm(vm["id"], state=POOLED, name=o.pop("pool_name", vm["name"]), options=o,
                                error=None)
            return "back to the pool"
        ctx.store.update_vm(vm["id"], state=rt.RUNNING, options=o,
                            error="its claim was interrupted after the clone was resumed; check it before use")
    except (NotFound, Conflict):
        return None
    return "claimed"


def _is_paused(ctx, vm, h) -> bool:
    drv = rt.vm_driver(ctx, vm)
    try:
        if vm["backend"] == "qemu":
            return drv.status(h) in ("paused", "postmigrate")
        return drv.describe(h).get("state") == "Paused"
    except BangerError:
        return False


def claim_for_create(ctx, img, ker, be, *, name, vcpu, memory_mib, overlay_size_mib, work_disk_size_mib, wait_ssh):
    """What `vm create` asks first (banger.vms.lifecycle.create(claim=...)): a pooled clone of exactly this
    spec, claimed and up (the finished Run), or None (boot cold)."""
    if not has_pooled(ctx):  # the common case costs one indexed query
        return None
    from banger.templates.service import Spec

    spec = Spec(ctx, img, ker, be, vcpu=vcpu, memory_mib=memory_mib, overlay_size_mib=overlay_size_mib,
                work_disk_size_mib=work_disk_size_mib)
    return claim(ctx, spec, name=name, wait_ssh=wait_ssh)
