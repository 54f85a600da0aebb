"""NAT rules (nftables, tagged with their VM's id) of VMs that are gone or not running, each decided
under that VM's lock; the banger table goes with its last rule."""

from __future__ import annotations

from banger.gc.base import in_progress, is_capacity, locked
from banger.vms import runtime as rt

KEY = "nat"


def _stale(ctx, vm_id: str) -> bool:
    vm = ctx.store.vm_by_id(vm_id)
    if vm is None:
        return True
    if is_capacity(vm) or in_progress(vm):
        return False
    return rt.effective_state(ctx, vm) not in (rt.RUNNING, rt.PAUSED)


def collect(ctx, rep) -> None:
    from banger.host.runner import which

    if not which("nft"):
        return
    from banger.net import nft

    for entry in nft.list_nat(ctx):
        if not _stale(ctx, entry["vm_id"]):
            continue
        with locked(ctx, rep, f"vm/{entry['vm_id']}") as ok:
            if not ok or not _stale(ctx, entry["vm_id"]):
                continue
            rep.add(KEY, {"vm_id": entry["vm_id"], "ip": entry["ip"], "rules": len(entry["rules"])})
            if not rep.dry_run:
                nft.disable_nat(ctx, {"id": entry["vm_id"], "ip": entry["ip"]})
