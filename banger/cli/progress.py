"""Rich progress on a terminal; plain step lines on stderr otherwise."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from banger.progress import Progress, Task


class _RichTask(Task):
    def __init__(self, prog, tid):
        self.prog, self.tid = prog, tid

    def advance(self, n: float = 1) -> None:
        self.prog.advance(self.tid, n)

    def update(self, *, completed=None, total=None, description=None) -> None:
        kw = {k: v for k, v in (("completed", completed), ("total", total), ("description", description))
              if v is not None}
        self.prog.update(self.tid, **kw)


class CliProgress(Progress):
    def __init__(self, json_out: bool = False):
        self.tty = sys.stderr.isatty()
        self.json_out = json_out
        self.t0 = time.monotonic()

    def step(self, message: str) -> None:
        if self.tty:
            from rich.console import Console

            Console(stderr=True, highlight=False).print(f"[dim]{time.monotonic() - self.t0:6.2f}s[/] {message}")
        else:
            sys.stderr.write(f"[{time.monotonic() - self.t0:6.2f}s] {message}\n")
            sys.stderr.flush()

    @contextmanager
    def task(self, description: str, total: float | None = None):
        if not self.tty:
            self.step(description)
            yield Task()
            return
        from rich.progress import BarColumn, DownloadColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RProgress

        cols = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
        if total and total > 1 << 20:
            cols.append(DownloadColumn())
        cols.append(TimeElapsedColumn())
        with RProgress(*cols, transient=True) as p:
            tid = p.add_task(description, total=total)
            yield _RichTask(p, tid)
        self.step(f"{description} done")
