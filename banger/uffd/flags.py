"""The two environment switches of lazy restore (see banger/uffd/__init__.py)."""

from __future__ import annotations

import os


def _flag(name: str, env: dict | None) -> bool:
    value = (env if env is not None else os.environ).get(name, "1")
    from banger.validate import boolean  # strict: BANGER_UFFD=maybe is an error naming the variable

    return boolean(value, name)


def enabled(env: dict | None = None) -> bool:
    """False when BANGER_UFFD=0: restores should use Firecracker's File backend."""
    return _flag("BANGER_UFFD", env)


def prefetch_enabled(env: dict | None = None) -> bool:
    """False when BANGER_UFFD_PREFETCH=0: serve faults on demand only, record nothing."""
    return _flag("BANGER_UFFD_PREFETCH", env)
