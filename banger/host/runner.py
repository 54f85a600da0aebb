"""Run external commands: always an argv list, never a shell string.

A failure raises CommandFailed carrying argv, exit code and the stderr tail.
"""

from __future__ import annotations

import os
import subprocess

from banger.errors import CommandFailed, HostError

GUEST_UMASK = 0o022  # inside guest trees: files 0644, dirs 0755 unless a tool says otherwise


def which(tool: str) -> str | None:
    """``tool``'s path on PATH (an absolute or relative path: itself, if executable), then the sbin
    directories; None if not found. (Not shutil.which: shutil costs ~2 ms to import on a create.)"""
    if os.sep in tool:
        return tool if os.path.isfile(tool) and os.access(tool, os.X_OK) else None
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        p = os.path.join(d or ".", tool)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
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


_PR_SET_PDEATHSIG = 1
_prctl = None


def _die_with_parent():
    """A preexec_fn making the child die (SIGKILL) when this process does: a command `run` waits for
    must never outlive a banger killed with -9 (a `dpkg-deb -x` or `mkfs` still writing into a staging
    dir that `banger gc` is about to remove). Resolved before the fork; the child only calls prctl."""
    global _prctl
    if _prctl is None:
        import ctypes

        try:
            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            _prctl = False
    if not _prctl:
        return None
    parent, prctl = os.getpid(), _prctl

    def child():
        prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os._exit(137)

    return child


def contained(argv: list[str]) -> list[str]:
    """``argv`` in its own PID namespace whose init dies with us: for a command that forks a tree of
    workers (``dpkg-deb -x``'s decompressor and tar, debootstrap's dpkg) which would otherwise go on
    writing after a banger killed with -9; the kernel kills every process of the namespace when its
    init goes. Needs root (banger's host operations run as root); unchanged when unshare is missing."""
    unshare = which("unshare")
    if not unshare or os.geteuid() != 0:
        return argv
    return [unshare, "--pid", "--fork", "--kill-child=SIGKILL", "--", *argv]


def run(argv: list[str], *, check: bool = True, input: bytes | str | None = None, timeout: float | None = None,
        cwd: str | None = None, env: dict | None = None, capture: bool = True, hint: str | None = None,
        stdin=None, stdout=None, pass_fds: tuple[int, ...] = (), umask: int | None = None,
        contain: bool = False) -> subprocess.CompletedProcess:
    """Run ``argv`` and wait. The child dies with this process (PR_SET_PDEATHSIG); with ``contain`` so
    does every process it forks (``contained``). Text results (``input`` not bytes): stdout is decoded as UTF-8 with
    surrogateescape (non-UTF-8 names from git -z or debugfs survive, and encode back to the same
    bytes), stderr with replacement characters (it is for people). ``stdout=`` (a file or fd)
    sends the output there instead of capturing it; ``stdin=`` reads input from a file or fd.
    ``umask``: the child's (default: banger's own 077). Tools that build a guest's file tree
    (debootstrap and its maintainer scripts) get GUEST_UMASK, so guest-visible modes stay conventional."""
    if isinstance(argv, str):  # a programming error, never allowed
        raise TypeError("run() takes an argv list, not a shell string")
    argv = [str(a) for a in argv]
    if contain:
        argv = contained(argv)
    text = not isinstance(input, bytes)
    data = input.encode() if isinstance(input, str) else input
    try:
        cp = subprocess.run(argv, input=data, timeout=timeout, cwd=cwd, env=env, pass_fds=pass_fds,
                            umask=-1 if umask is None else umask,
                            **({"stdin": stdin} if stdin is not None else {}),
                            stdout=stdout if stdout is not None else subprocess.PIPE if capture else None,
                            stderr=subprocess.PIPE if capture else None, preexec_fn=_die_with_parent())
    except FileNotFoundError:
        raise HostError(f"{argv[0]} is not installed", "install it (banger doctor --fix lists what is missing)") from None
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise CommandFailed(argv, -9, f"timed out after {timeout}s\n{err}", hint) from None
    if text:
        if isinstance(cp.stdout, bytes):
            cp.stdout = cp.stdout.decode("utf-8", "surrogateescape")
        if isinstance(cp.stderr, bytes):
            cp.stderr = cp.stderr.decode("utf-8", "replace")
    if check and cp.returncode != 0:
        err = cp.stderr if isinstance(cp.stderr, str) else (cp.stderr or b"").decode(errors="replace")
        raise CommandFailed(argv, cp.returncode, err or "", hint)
    return cp
