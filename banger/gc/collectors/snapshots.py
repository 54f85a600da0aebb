"""Snapshot dirs without a row (a `snapshot create` killed between its rename and its row insert),
decided under ``snapshot/<name>`` (a publish in progress holds it)."""

from __future__ import annotations

import shutil

from banger.gc.base import locked

KEY = "snapshots"


def collect(ctx, rep) -> None:
    from banger.snapshots import service as snapshots

    for d in snapshots.orphans(ctx):
        with locked(ctx, rep, f"snapshot/{d.name}") as ok:
            if not ok:
                continue
            if d.name in {r["name"] for r in ctx.store.query("SELECT name FROM snapshots WHERE name = ?",
                                                              (d.name,))}:
                continue
            rep.add(KEY, str(d))
            if not rep.dry_run:
                shutil.rmtree(d, ignore_errors=True)
