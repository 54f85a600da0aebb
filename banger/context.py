"""What a service needs from its environment: config, store, locks, progress.

Services take a Ctx (and adapters) as parameters; nothing is a global singleton.
"""

from __future__ import annotations

from functools import cached_property

from banger.config import Config, load_config
from banger.progress import NULL, Progress


class Ctx:
    def __init__(self, cfg: Config | None = None, progress: Progress | None = None):
        self.cfg = cfg or load_config()
        self.progress = progress or NULL

    @cached_property
    def store(self):
        from banger.state.store import Store

        return Store(self.cfg.db_path)

    @cached_property
    def locks(self):
        from banger.state.locks import Locks

        return Locks(self.cfg.locks_dir, self.cfg.lock_timeout_s)

    def close(self) -> None:
        if "store" in self.__dict__:
            self.store.close()
