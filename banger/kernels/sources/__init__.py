"""Where kernels come from: one fetcher module each, one line here.

A catalog source module (its ``type`` in banger/data/kernels.json) exposes
``expected_digest(name, src, sha256_flag) -> str | None`` (validates the entry and the
``--sha256`` flag before anything is locked or downloaded) and
``fetch(ctx, name, src, stage, digest) -> fetched``: it fills the private staging dir ``stage``
and returns ``{"kernel", "modules_root", "initrd", "config", "source"}`` for
banger.kernels.assemble. ``local`` (files and kernel directories on this host, `kernel import`)
is not a catalog source and has its own entry points.

Adding a catalog source = its module here + one line in SOURCES. Importing this module imports
no source; ``source(type)`` imports only that one.
"""

from __future__ import annotations

import json
import os
import time

SOURCES: dict[str, str] = {
    "apt": "banger.kernels.sources.apt",
    "url": "banger.kernels.sources.url",
}
CATALOG_TYPES = tuple(SOURCES)
DOWNLOAD_LOG = "kernel-downloads.log"


def source(kind: str):
    import importlib

    if kind not in SOURCES:
        from banger.errors import UsageError

        raise UsageError(f"unknown kernel source type {kind!r}", f"use one of: {', '.join(SOURCES)}")
    return importlib.import_module(SOURCES[kind])


def log_download(ctx, record: dict) -> None:
    """One JSON line per real download in cfg.cache_dir/kernel-downloads.log."""
    ctx.cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    line = (json.dumps({**record, "pid": os.getpid(), "at": time.time()}, sort_keys=True) + "\n").encode()
    fd = os.open(ctx.cfg.cache_dir / DOWNLOAD_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
