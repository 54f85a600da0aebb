"""banger's userfaultfd page-fault handler for Firecracker snapshot restores.

One handler process per restored VM (``python -m banger.uffd.handler``), started
before ``PUT /snapshot/load`` and listening on the VM's UFFD socket. The
handshake and the prefetch/recording policy are Python (handshake.py,
policy.py, handler.py); the serving loop is C with the GIL released
(banger.uffd._uffd.Server).

Switches (environment):
  BANGER_UFFD=0           restore with the File backend instead (read by the
                          snapshot/driver code through ``enabled()``)
  BANGER_UFFD_PREFETCH=0  keep UFFD but neither prefetch nor record
"""

from __future__ import annotations

import os

from banger.uffd.spawn import spawn_handler

__all__ = ["enabled", "prefetch_enabled", "spawn_handler"]



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
