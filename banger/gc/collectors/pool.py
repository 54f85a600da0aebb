"""The warm VM pool's rows (banger.vmpool): a pooled clone whose VMM died is removed; a ``claiming``
row whose claimer died goes back to the pool if the clone is still paused, else becomes a claimed
running VM (banger.vmpool.service.recover). Each under the VM's lock, taken without waiting."""

from __future__ import annotations

from banger.gc.base import locked
from banger.vms import runtime as rt

KEY = "pool"


def _dead(ctx, vm) -> bool:
    return ((vm["state"] == rt.POOLED and not rt.vmm_alive(ctx, vm))
            or (vm["state"] == rt.CLAIMING and not rt.creator_alive(vm)))


def collect(ctx, rep) -> None:
    from banger.vmpool import service as vmpool

    for vm in ctx.store.list_vms():
        if not _dead(ctx, vm):
            continue
        with locked(ctx, rep, f"vm/{vm['id']}") as ok:
            cur = ctx.store.vm_by_id(vm["id"]) if ok else None
            if cur is None or cur["state"] != vm["state"] or not _dead(ctx, cur):
                continue
            if cur["state"] == rt.POOLED:
                if not rep.dry_run:
                    rt.destroy_vm(ctx, cur)
                rep.add(KEY, {"id": cur["id"], "name": cur["name"], "done": "removed (VMM gone)"})
            else:
                rep.add(KEY, {"id": cur["id"], "name": cur["name"],
                              "done": vmpool.recover(ctx, cur, dry_run=rep.dry_run)})
