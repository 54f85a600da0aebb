"""Private staging directories: where slow work (pulls, builds, snapshots) fills a directory with
no lock held, before a short publish renames it into place.

Each staging dir carries an owner file (pid + process start time of the process filling it), so
`banger gc` removes it once that process is gone and never while it lives."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from banger.host import procs

OWNER_FILE = ".owner"
MAX_AGE_S = 3600.0  # staging dirs without an owner file are left alone this long


def write_owner(staging: Path) -> None:
    """Mark a staging dir as owned by this process (gc removes it once the process is gone)."""
    (Path(staging) / OWNER_FILE).write_text(f"{os.getpid()} {procs.start_time(os.getpid()) or 0}\n")


def owner_alive(staging: Path) -> bool | None:
    """True/False when the dir names an owner process; None when it has no (readable) owner file."""
    try:
        pid, start = (Path(staging) / OWNER_FILE).read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return procs.alive(int(pid), int(start) or None)


def new_dir(cfg, label: str) -> Path:
    """A fresh staging dir under BANGER_HOME/staging, owned by this process."""
    d = cfg.staging_dir / f"{label}-{secrets.token_hex(4)}"
    d.mkdir(parents=True, mode=0o700)
    write_owner(d)
    return d
