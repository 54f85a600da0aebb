"""Private staging directories: where slow work (pulls, builds, snapshots) fills a directory with
no lock held, before a short publish renames it into place.

Each staging dir carries an owner file (pid + process start time of the process filling it), so
`banger gc` removes it once that process is gone and never while it lives."""

from __future__ import annotations

import os
import re
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


# A file being written in a shared directory (a `.part` blob in the OCI cache) names its writer in
# its own name: ``.w<pid>-<start>.`` (owner_tag()); gc removes it once that writer is gone.
_TAG = re.compile(r"\.w(\d+)-(\d+)\.")


def owner_tag() -> str:
    """``.w<pid>-<start>.``: put it in a temp file's name (a mkstemp prefix) to mark this process as its writer."""
    return f".w{os.getpid()}-{procs.start_time(os.getpid()) or 0}."


def tagged_owner_alive(name: str) -> bool | None:
    """True/False when ``name`` carries an owner tag; None when it has none."""
    m = _TAG.search(name)
    if not m:
        return None
    return procs.alive(int(m[1]), int(m[2]) or None)


LOOPS_FILE = "loops.json"


def record_loop(staging: Path, backing_file: Path | str, device: str | None = None) -> None:
    """Note in the owner's staging dir a loop device it is about to attach (``device`` None: before
    the attach, so a kill in between still leaves the backing file on record) or has attached.
    gc spares the loops a live owner recorded and detaches those of a dead one."""
    import json

    from banger.host.fsutil import atomic_write_bytes, read_json

    path = Path(staging) / LOOPS_FILE
    loops = [x for x in (read_json(path, []) or []) if x.get("file") != str(backing_file) or x.get("device")]
    loops.append({"file": str(backing_file), "device": device})
    atomic_write_bytes(path, json.dumps(loops).encode(), 0o600, mkdir=False)


def recorded_loops(staging: Path) -> list[dict]:
    from banger.host.fsutil import read_json

    try:
        return list(read_json(Path(staging) / LOOPS_FILE, []) or [])
    except (OSError, ValueError):
        return []
