"""Helpers to run Python snippets in real, separate processes (for flock/SQLite races)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def spawn_py(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env or os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
