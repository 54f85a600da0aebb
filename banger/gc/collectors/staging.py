"""Staging dirs (pulls, builds, promotes, snapshots, removals in progress) whose owner process is
gone; never while the owner lives. A dir without an owner file is left alone for an hour."""

from __future__ import annotations

import shutil
import time

from banger.gc.base import unmount_under
from banger.state import staging

KEY = "staging"


def collect(ctx, rep) -> None:
    d = ctx.cfg.staging_dir
    now = time.time()
    for s in sorted(d.iterdir()) if d.is_dir() else []:
        owner = staging.owner_alive(s)
        try:
            age = now - s.lstat().st_mtime
        except OSError:
            continue
        if owner is True or (owner is None and age < staging.MAX_AGE_S):
            continue
        rep.add(KEY, str(s))
        if rep.dry_run:
            continue
        if s.is_dir() and not s.is_symlink():
            unmount_under(s)  # a killed promote's overlay view, say
            shutil.rmtree(s, ignore_errors=True)
        else:
            s.unlink(missing_ok=True)
