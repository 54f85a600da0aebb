"""Partial downloads (``.part``) in the OCI blob cache whose writer is gone. A writer names itself in
the file's name (banger.state.staging.owner_tag); an untagged one (an older banger) goes once no
process has it open and it is an hour old."""

from __future__ import annotations

import os
import time

from banger.state import staging

KEY = "blobs"


def _open_anywhere(paths: set[str]) -> set[str]:
    """Which of ``paths`` some process has open (scan of /proc/*/fd; we run as root)."""
    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target in paths:
                found.add(target)
    return found


def collect(ctx, rep) -> None:
    root = ctx.cfg.cache_dir / "blobs"
    parts = sorted(root.rglob("*.part")) if root.is_dir() else []
    untagged = []
    for p in parts:
        owner = staging.tagged_owner_alive(p.name)
        if owner is None:
            untagged.append(p)
        elif owner is False:
            rep.add(KEY, str(p))
            if not rep.dry_run:
                p.unlink(missing_ok=True)
    if untagged:
        busy = _open_anywhere({str(p) for p in untagged})
        now = time.time()
        for p in untagged:
            try:
                old = now - p.stat().st_mtime > staging.MAX_AGE_S
            except OSError:
                continue
            if old and str(p) not in busy:
                rep.add(KEY, str(p))
                if not rep.dry_run:
                    p.unlink(missing_ok=True)
