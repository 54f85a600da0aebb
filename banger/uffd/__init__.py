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

from banger.uffd.flags import enabled, prefetch_enabled
from banger.uffd.spawn import spawn_handler

__all__ = ["enabled", "prefetch_enabled", "spawn_handler"]
