"""Processes banger recorded for a VM (its handles and spawn records: pid + start time + role) that are
still alive while the VM is not running: a VMM or helper orphaned by a crash or a killed command.
Known positively: gc never looks at command lines, so a user's `tail -f .../serial.log` or
`cp .../work.ext4` is never touched. Decided under the VM's lock."""

from __future__ import annotations

from banger.gc.base import in_progress, is_capacity, locked
from banger.host import procs
from banger.vms import runtime as rt

KEY = "processes"


def _strays(ctx, vm, h) -> list[dict]:
    if is_capacity(vm) or in_progress(vm):  # a live create's own; a dead one's: the vms collector
        return []
    if vm["state"] == rt.RUNNING and rt.vmm_alive(ctx, vm, h):
        return []  # the VM runs: everything recorded for it is its own
    return [p for p in rt.recorded_processes(ctx, vm, h) if procs.alive(p["pid"], p["start"])]


def collect(ctx, rep) -> None:
    for vm in ctx.store.list_vms():
        if not _strays(ctx, vm, rt.load_handles(ctx, vm)):
            continue
        with locked(ctx, rep, f"vm/{vm['id']}") as ok:
            if not ok:
                continue
            cur = ctx.store.vm_by_id(vm["id"])
            if cur is None:
                continue
            for p in _strays(ctx, cur, rt.load_handles(ctx, cur)):
                rep.add(KEY, {**p, "vm_id": cur["id"], "vm": cur["name"]})
                if not rep.dry_run and not procs.kill(p["pid"], p["start"]):
                    rep.errors.append(f"process {p['pid']} ({p.get('role')}) of VM {cur['name']} did not die")
