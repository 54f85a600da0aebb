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


def _collector(entry: str):
    name, _, fn = entry.partition(":")
    mod = importlib.import_module(f"banger.gc.collectors.{name}")
    return mod, getattr(mod, fn or "collect")


def keys() -> list[str]:
    out = []
    for entry in ORDER:
        mod, _ = _collector(entry)
        for k in getattr(mod, "KEYS", None) or (mod.KEY,):
            if k not in out:
                out.append(k)
    return out


def collect(ctx, *, dry_run: bool = False) -> dict:
    rep = Report(dry_run)
    for entry in ORDER:
        _, fn = _collector(entry)
        try:
            fn(ctx, rep)
        except BangerError as e:
            rep.error(entry, e)
    out = rep.to_dict(keys())
    out["names"] = getattr(rep, "names", None)
    return out
