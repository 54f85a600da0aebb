"""Run external commands: always an argv list, never a shell string.

A failure raises CommandFailed carrying argv, exit code and the stderr tail.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from banger.errors import CommandFailed, HostError

GUEST_UMASK = 0o022  # inside guest trees: files 0644, dirs 0755 unless a tool says otherwise


def which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        p = os.path.join(d, tool)
        if os.access(p, os.X_OK):
            return p
    return None


def require(tool: str, package: str | None = None) -> str:
    path = which(tool)
    if not path:
        pkg = package or tool
        raise HostError(f"{tool} is not installed", f"install it: apt-get install {pkg} (or run banger doctor --fix)")
    return path


def run(argv: list[str], *, check: bool = True, input: bytes | str | None = None, timeout: float | None = None,
        cwd: str | None = None, env: dict | None = None, capture: bool = True, hint: str | None = None,
        umask: int | None = None) -> subprocess.CompletedProcess:
    """``umask``: the child's (default: banger's own 077). Tools that build a guest's file tree
    (debootstrap and its maintainer scripts) get GUEST_UMASK, so guest-visible modes stay conventional."""
    if isinstance(argv, str):  # a programming error, never allowed
        raise TypeError("run() takes an argv list, not a shell string")
    argv = [str(a) for a in argv]
    text = not isinstance(input, bytes)
    try:
        cp = subprocess.run(argv, input=input, timeout=timeout, cwd=cwd, env=env, text=text,
                            umask=-1 if umask is None else umask,
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.PIPE if capture else None)
    except FileNotFoundError:
        raise HostError(f"{argv[0]} is not installed", "install it (banger doctor --fix lists what is missing)") from None
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise CommandFailed(argv, -9, f"timed out after {timeout}s\n{err}", hint) from None
    if check and cp.returncode != 0:
        err = cp.stderr if isinstance(cp.stderr, str) else (cp.stderr or b"").decode(errors="replace")
        raise CommandFailed(argv, cp.returncode, err or "", hint)
    return cp
