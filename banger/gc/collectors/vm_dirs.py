"""VM dirs (``vms/<id>``) without a row: what a dead create or delete left. Under the VM's lock (a
create takes it before its row exists, so a dir being filled is never taken for an orphan); the
processes recorded in it are killed first."""

from __future__ import annotations

import shutil

from banger.gc.base import locked
from banger.host import procs
from banger.host.fsutil import read_json
from banger.vms import runtime as rt

KEY = "vm_dirs"


def collect(ctx, rep) -> None:
    d = ctx.cfg.vms_dir
    for p in sorted(d.iterdir()) if d.is_dir() else []:
        if ctx.store.vm_by_id(p.name) is not None:
            continue
        with locked(ctx, rep, f"vm/{p.name}") as ok:
            if not ok or ctx.store.vm_by_id(p.name) is not None:
                continue
            rep.add(KEY, str(p))
            if rep.dry_run:
                continue
            ref = {"id": p.name, "backend": (read_json(p / rt.HANDLES, {}) or {}).get("backend") or "qemu"}
            for proc in rt.recorded_processes(ctx, ref):
                procs.kill(proc["pid"], proc["start"])
            shutil.rmtree(p, ignore_errors=True)
