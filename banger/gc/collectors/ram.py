"""Shared guest-RAM files (banger.templates.ram) of processes that are gone: clones that mapped one
keep their pages; the file itself is reaped."""

from __future__ import annotations

KEY = "staging"  # reported with the other staging leftovers


def collect(ctx, rep) -> None:
    from banger.templates import ram

    for p in ram.stale(ctx.cfg):
        rep.add(KEY, str(p))
        if not rep.dry_run:
            p.unlink(missing_ok=True)
