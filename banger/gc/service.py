"""`banger gc`: find and remove what crashed or killed commands left behind, and nothing else.

One collector per resource (banger.gc.collectors, run in ``ORDER``): each finds candidates, then
decides about each one under that resource's lock (taken without waiting: what an operation holds is
skipped and listed under ``busy``), re-reading the row and handles under the lock. Processes are known
positively (what banger recorded: pid + start time + role), never by their command lines. Everything
is within this BANGER_HOME / BANGER_RUN; ``dry_run`` only reports.
"""

from __future__ import annotations

import importlib

from banger.errors import BangerError
from banger.gc.base import Report
from banger.gc.collectors import ORDER


def keys() -> list[str]:
    out = []
    for name in ORDER:
        mod = importlib.import_module(f"banger.gc.collectors.{name}")
        out += list(getattr(mod, "KEYS", None) or (mod.KEY,))
    return out


def collect(ctx, *, dry_run: bool = False) -> dict:
    rep = Report(dry_run)
    for name in ORDER:
        mod = importlib.import_module(f"banger.gc.collectors.{name}")
        try:
            mod.collect(ctx, rep)
        except BangerError as e:
            rep.error(name, e)
    return rep.to_dict(keys())
