"""VM rows: a create whose creator died (everything it built is torn down, the row removed), a VM left
behind by a dead `vm run --rm` (deleted: that was its creator's intent), a guest left paused by a
killed `snapshot create` (resumed). Each decided under the VM's lock, on the row re-read there."""

from __future__ import annotations

from banger.gc.base import in_progress, is_capacity, locked
from banger.vms import runtime as rt

KEYS = ("rows", "resumed")


def _verdict(ctx, vm, h) -> str | None:
    if is_capacity(vm):
        return None
    if vm["state"] == rt.CREATING and not rt.creator_alive(vm):
        return "stale_create"
    if (vm.get("options") or {}).get("rm") and not in_progress(vm) and not rt.creator_alive(vm):
        return "rm_creator_dead"
    if vm["state"] == rt.RUNNING and rt.pause_orphaned(h) and rt.vmm_alive(ctx, vm, h):
        return "paused_orphan"
    return None


def collect(ctx, rep) -> None:
    for vm in ctx.store.list_vms():
        if _verdict(ctx, vm, rt.load_handles(ctx, vm)) is None:
            continue
        with locked(ctx, rep, f"vm/{vm['id']}") as ok:
            if not ok:
                continue
            cur = ctx.store.vm_by_id(vm["id"])
            if cur is None:
                continue
            h = rt.load_handles(ctx, cur)
            why = _verdict(ctx, cur, h)
            if why is None:
                continue
            item = {"id": cur["id"], "name": cur["name"], "reason": why}
            try:
                if why == "paused_orphan":
                    rep.add("resumed", item)
                    if not rep.dry_run:
                        rt.resume_orphaned(ctx, cur, h)
                    continue
                rep.add("rows", item)
                if not rep.dry_run:
                    rt.destroy_vm(ctx, cur)
            except Exception as e:  # noqa: BLE001 - one VM's failure must not stop the others
                rep.error(f"VM {cur['name']}", e)
