"""TAPs: the ones still claimed by a VM that is not running (decided under that VM's lock), and the
pool's leaks (claimed rows whose VM is gone, devices without rows, rows without devices; read and
reaped under the pool lock). Idle pooled TAPs are capacity, not leaks."""

from __future__ import annotations

from banger.gc.base import in_progress, is_capacity, locked
from banger.vms import runtime as rt

KEY = "taps"


def _stale_claim(ctx, vm) -> bool:
    if is_capacity(vm) or in_progress(vm):
        return False
    return rt.effective_state(ctx, vm) not in (rt.RUNNING, rt.PAUSED)


def collect(ctx, rep) -> None:
    from banger.net import pool

    for vm in ctx.store.list_vms():
        if not _stale_claim(ctx, vm) or not pool.claimed_by(ctx, vm["id"]):
            continue
        with locked(ctx, rep, f"vm/{vm['id']}") as ok:
            if not ok:
                continue
            cur = ctx.store.vm_by_id(vm["id"])
            if cur is None or not _stale_claim(ctx, cur):
                continue
            names = pool.claimed_by(ctx, cur["id"])
            rep.items.setdefault(KEY, []).extend(
                {"name": n, "reason": "claimed_by_stopped_vm", "vm_id": cur["id"]} for n in names)
            if names and not rep.dry_run:
                try:
                    pool.release(ctx, cur["id"], destroy=True)
                except Exception as e:  # noqa: BLE001
                    rep.error(f"TAP of VM {cur['name']}", e)
    leaks = pool.leaks(ctx)
    for x in leaks:
        rep.add(KEY, x)
    if leaks and not rep.dry_run:
        pool.reap(ctx, [x["name"] for x in leaks])
