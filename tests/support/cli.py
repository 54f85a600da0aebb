"""Run the real CLI in its own process, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def banger(*args, env=None, check=True, input=None, timeout=600) -> subprocess.CompletedProcess:
    """Run the real CLI in its own process (every banger command is its own process)."""
    cp = subprocess.run([sys.executable, "-m", "banger.cli.main", *map(str, args)], env=env or os.environ.copy(),
                        capture_output=True, text=True, input=input, timeout=timeout)
    if check and cp.returncode != 0:
        raise AssertionError(f"banger {' '.join(map(str, args))} exited {cp.returncode}\n"
                             f"stdout:\n{cp.stdout}\nstderr:\n{cp.stderr}")
    return cp


def banger_json(*args, env=None, check=True, timeout=600) -> dict:
    cp = banger(*args, "--json", env=env, check=False, timeout=timeout)
    try:
        doc = json.loads(cp.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"not JSON from banger {args}: {cp.stdout!r}\nstderr:{cp.stderr}") from e
    if check and not doc.get("ok"):
        raise AssertionError(f"banger {args} failed: {doc}\nstderr:{cp.stderr}")
    return doc
