"""Progress reporting that services use without knowing about rich or typer.

Services accept a ``Progress`` and call ``step``/``task``; the CLI passes a rich
implementation on a terminal and a plain or silent one otherwise.
"""

from __future__ import annotations

from contextlib import contextmanager


class Task:
    def advance(self, n: float = 1) -> None:  # pragma: no cover - trivial
        pass

    def update(self, *, completed: float | None = None, total: float | None = None,
               description: str | None = None) -> None:  # pragma: no cover - trivial
        pass


class Progress:
    """Silent base implementation (also the default in services and tests)."""

    def step(self, message: str) -> None:
        pass

    @contextmanager
    def task(self, description: str, total: float | None = None):
        yield Task()


NULL = Progress()
