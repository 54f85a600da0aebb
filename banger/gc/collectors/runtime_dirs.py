"""Runtime dirs (``$BANGER_RUN/vms/<id>``: QMP, API, serial and UFFD sockets) of VMs that are gone or
not running, decided under the VM's lock; and the test hook's ``paused-*`` markers whose process died."""

from __future__ import annotations

import shutil

from banger.gc.base import in_progress, is_capacity, locked
from banger.host import procs
from banger.vms import runtime as rt

KEY = "sockets"


def _stale(ctx, vm_id: str) -> bool:
    vm = ctx.store.vm_by_id(vm_id)
    if vm is None:
        return True
    if is_capacity(vm) or in_progress(vm):
        return False  # a create in progress (it holds the lock) or a dead one's (the vms collector)
    return not rt.vmm_alive(ctx, vm)


def collect(ctx, rep) -> None:
    base = ctx.cfg.run / "vms"
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        if not _stale(ctx, d.name):
            continue
        with locked(ctx, rep, f"vm/{d.name}") as ok:
            if not ok or not _stale(ctx, d.name):
                continue
            rep.add(KEY, str(d))
            if not rep.dry_run:
                shutil.rmtree(d, ignore_errors=True)
    for m in sorted(ctx.cfg.run.glob("paused-*")) if ctx.cfg.run.is_dir() else []:
        try:
            fields = m.read_text().split()
            pid, start = int(fields[2]), (int(fields[3]) if len(fields) > 3 else None)
        except (OSError, ValueError, IndexError):
            continue
        if not procs.alive(pid, start):
            rep.add(KEY, str(m))
            if not rep.dry_run:
                m.unlink(missing_ok=True)
