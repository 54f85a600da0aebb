"""``vm cp`` over SFTP without trusting the guest.

From the guest (``get``): everything the guest's SFTP server says (names, types, modes, sizes,
link targets) is hostile input.  The rules, each enforced here and nowhere else:

* **Names.**  Every name in a directory listing must be a plain file name: not empty, not ``.`` or
  ``..``, no ``/``, no NUL, valid UTF-8, at most 255 bytes; a name listed twice in one directory is
  refused.  (A real file system cannot produce any of these: the copy stops with
  ``UnsafeGuestData`` and nothing is kept.)
* **No path is ever joined.**  The destination's parent directory is opened once; below it every
  file and directory is created relative to a directory fd (``mkdir``/``open``/``symlink`` with
  ``dir_fd``), files with ``O_CREAT|O_EXCL|O_NOFOLLOW``, directories re-opened with
  ``O_NOFOLLOW|O_DIRECTORY``.  Nothing is written through a symlink, local or guest-made.
* **The destination is always new.**  ``cp VM:/root/d OUT`` creates ``OUT`` when it does not exist,
  or ``OUT/d`` when ``OUT`` is an existing directory; an existing target is refused (Conflict),
  never merged into or overwritten, so no pre-existing file or link is ever inside the tree being
  written.  A destination that is itself a symlink is refused (give its real path).
* **Modes, not privileges.**  Files get ``(guest_mode & 0o755) | 0o600``, directories
  ``(guest_mode & 0o755) | 0o700``, both masked by the process umask: never setuid, setgid, sticky
  or group/other write.  Ownership is never copied (files belong to the user running banger).
* **Symlinks** from the guest are recreated only when they are relative and provably stay inside
  the copied tree: a target of the form ``../`` * k followed by names without ``..``, with k at
  most the link's depth below the top of the copy.  (Because every link obeys that rule relative to
  its own real directory, no chain of them leaves the tree.)  Absolute or escaping links are
  skipped with a warning.  Devices, FIFOs and sockets are skipped with a warning.
* **Bounded.**  At most ``max_bytes`` of file content (default: the destination file system's
  free space minus a margin of max(64 MiB, 2 %)), at most MAX_ENTRIES names and MAX_DEPTH levels;
  the claimed size of each file is checked before it is fetched and the bytes actually received are
  counted as they arrive.  A server that sends nothing for STALL_S seconds times out.  When a bound
  is hit, or on any error or interrupt, what was written is removed.

To the guest (``put``): the local path the user names is followed if it is a symlink (it is their
choice); below it nothing is followed: symlinks are recreated in the guest as symlinks (their
target is never read on the host), only regular files are read (opened ``O_NOFOLLOW|O_NONBLOCK``
and checked with ``fstat``), FIFOs, devices and sockets are skipped with a warning.  A link in a
repository pointing at ``/etc/shadow`` therefore reaches the guest as a link, never as the file.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from banger.errors import BangerError, Conflict, GuestTimeout, HostError, NotFound, UsageError
from banger.guest.ssh import SshError

STALL_S = 60.0                 # no byte from the guest for this long: give up
MAX_DEPTH = 256
MAX_ENTRIES = 1_000_000
NAME_MAX = 255
READ_WINDOW = 1 << 21          # bytes requested in one pipelined round (64 x 32 KiB SFTP reads)
MARGIN_MIN = 64 << 20
MARGIN_FRACTION = 0.02
WARNINGS_MAX = 20              # then one summary line (a guest can hold a million FIFOs)


class UnsafeGuestData(SshError):
    """The guest's SFTP server sent something no real file system produces (a hostile or broken guest)."""

    code = "unsafe_guest_data"


class CopyLimitExceeded(BangerError):
    code = "limit_exceeded"


def show(s: str, limit: int = 160) -> str:
    """A guest-chosen string for a message: non-printable characters escaped, length capped."""
    r = repr(s)[1:-1]
    return r if len(r) <= limit else r[:limit] + "..."


def bad_name(name) -> str | None:
    """Why ``name`` is not a plain file name (None if it is one)."""
    if not isinstance(name, str):
        return "not text"
    if name == "":
        return "empty"
    if name in (".", ".."):
        return f"{name!r} is not a file name"
    if "/" in name:
        return "contains '/'"
    if "\0" in name:
        return "contains NUL"
    try:
        if len(name.encode("utf-8")) > NAME_MAX:
            return f"longer than {NAME_MAX} bytes"
    except UnicodeEncodeError:
        return "not valid UTF-8"
    return None


def safe_link_target(target, depth: int) -> bool:
    """True if a symlink with this target, ``depth`` directories below the top of the copied tree,
    resolves inside the tree whatever the other links in it are (see the module docstring)."""
    if not isinstance(target, str) or not target or target.startswith("/") or "\0" in target:
        return False
    if len(target.encode("utf-8", errors="replace")) >= 4096:
        return False
    parts = [p for p in target.split("/") if p not in ("", ".")]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    return ups <= depth and ".." not in parts[ups:]


def file_mode(guest_mode: int | None, umask: int) -> int:
    return (((guest_mode or 0) & 0o755) | 0o600) & ~umask & 0o777


def dir_mode(guest_mode: int | None, umask: int) -> int:
    return (((guest_mode or 0) & 0o755) | 0o700) & ~umask & 0o777


def current_umask() -> int:
    """The umask for files the user asked for (vm cp): the caller's own, which the CLI recorded before it
    switched to 077 for banger's private state; the process umask otherwise."""
    rec = os.environ.get("BANGER_CALLER_UMASK", "")
    if rec and len(rec) <= 4 and all(c in "01234567" for c in rec):
        return int(rec, 8)
    old = os.umask(0o077)
    os.umask(old)
    return old


def default_max_bytes(dir_fd: int) -> int:
    """Free space of the destination file system minus max(64 MiB, 2 % of its size)."""
    st = os.fstatvfs(dir_fd)
    free = st.f_bavail * st.f_frsize
    margin = max(MARGIN_MIN, int(st.f_blocks * st.f_frsize * MARGIN_FRACTION))
    return max(0, free - margin)


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _warn_stderr(msg: str) -> None:
    sys.stderr.write(f"warning: {msg}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------- from the guest
class _Download:
    def __init__(self, sftp, remote: str, *, max_bytes: int, user_limit: bool, warn: Callable[[str], None]):
        self.sftp = sftp
        self.remote = remote
        self.max_bytes = max_bytes
        self.left = max_bytes
        self.user_limit = user_limit
        self._warn = warn
        self.skipped = 0
        self.umask = current_umask()
        self.entries = 0
        self.files = 0
        self.progress: Callable[[int, int], None] | None = None

    def warn(self, msg: str) -> None:
        self.skipped += 1
        if self.skipped <= WARNINGS_MAX:
            self._warn(msg)

    def summary(self) -> None:
        if self.skipped > WARNINGS_MAX:
            self._warn(f"... {self.skipped - WARNINGS_MAX} more entries skipped ({self.skipped} in all)")

    # -- bounds
    def _over(self, what: str) -> CopyLimitExceeded:
        if self.user_limit:
            return CopyLimitExceeded(f"copy from guest:{show(self.remote)} stopped: {what} is more than the limit "
                                     f"--max-size {human(self.max_bytes)}; nothing was kept",
                                     "pass a larger --max-size if you expect that much data")
        return CopyLimitExceeded(f"copy from guest:{show(self.remote)} stopped: {what} would leave the destination "
                                 f"file system with less than its safety margin free (at most "
                                 f"{human(self.max_bytes)} may be copied there); nothing was kept",
                                 "free some space, copy to another file system, or set --max-size")

    # -- the guest's answers
    def listing(self, rpath: str) -> list:
        seen: set[str] = set()
        out = []
        try:
            # listdir_attr, not listdir_iter: the iterator's read-ahead leaves a READDIR in flight whose
            # answer a later request on the channel can take for its own (seen as a listing with a
            # bogus empty name, intermittently); one synchronous listing per directory is exact
            for a in self.sftp.listdir_attr(rpath):
                name = a.filename
                self.entries += 1
                if self.entries > MAX_ENTRIES:
                    raise self._over(f"more than {MAX_ENTRIES} files and directories")
                why = bad_name(name)
                if why:
                    raise UnsafeGuestData(f"the guest sent an invalid file name '{show(str(name))}' in "
                                          f"guest:{show(rpath)} ({why}); nothing was copied",
                                          "the guest's SFTP server is hostile or broken: do not trust this VM")
                if name in seen:
                    raise UnsafeGuestData(f"the guest listed '{show(name)}' twice in guest:{show(rpath)}; nothing "
                                          f"was copied", "the guest's SFTP server is hostile or broken")
                seen.add(name)
                out.append(a)
        except UnicodeDecodeError:
            raise UnsafeGuestData(f"a file name in guest:{show(rpath)} is not valid UTF-8; nothing was copied",
                                  "rename it in the guest (banger vm exec VM -- ls -b DIR)") from None
        return out

    def readlink(self, rpath: str):
        try:
            return self.sftp.readlink(rpath)
        except UnicodeDecodeError:
            return None
        except OSError:
            return None

    # -- writing
    def tree(self, rpath: str, dfd: int, depth: int) -> None:
        if depth >= MAX_DEPTH:
            raise UnsafeGuestData(f"guest:{show(rpath)} is nested deeper than {MAX_DEPTH} levels; nothing was copied",
                                  "copy a deeper part of the tree on its own")
        base = rpath.rstrip("/")
        for a in self.listing(rpath):
            name = a.filename
            rp = f"{base}/{name}"
            mode = a.st_mode if a.st_mode is not None else 0
            if stat.S_ISDIR(mode):
                try:
                    os.mkdir(name, 0o700, dir_fd=dfd)
                except FileExistsError:
                    raise UnsafeGuestData(f"guest:{show(rp)} was listed after something of the same name",
                                          "the guest's SFTP server is hostile or broken") from None
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                try:
                    self.tree(rp, sub, depth + 1)
                    os.fchmod(sub, dir_mode(mode, self.umask))
                finally:
                    os.close(sub)
            elif stat.S_ISREG(mode):
                fd = self.create(dfd, name, rp)
                try:
                    self.fill(fd, rp, a.st_size, mode)
                finally:
                    os.close(fd)
            elif stat.S_ISLNK(mode):
                self.link(rp, dfd, name, depth)
            else:
                self.warn(f"skipped guest:{show(rp)}: not a regular file, directory or symlink")

    @staticmethod
    def create(dfd: int, name: str, rpath: str) -> int:
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                           dir_fd=dfd)
        except FileExistsError:
            raise UnsafeGuestData(f"guest:{show(rpath)} was listed after something of the same name",
                                  "the guest's SFTP server is hostile or broken") from None

    def fill(self, fd: int, rpath: str, claimed, mode: int | None) -> None:
        """Write the guest file's bytes into ``fd`` (counted against the bound), then its safe mode."""
        if isinstance(claimed, int) and claimed > self.left:
            raise self._over(f"guest:{show(rpath)} ({human(claimed)})")
        with self.sftp.open(rpath, "rb") as f:
            pos = 0
            while True:
                block = b"".join(f.readv([(pos, READ_WINDOW)]))  # one pipelined round of reads
                if not block:
                    break
                if len(block) > self.left:  # write exactly up to the bound, then stop (and unwind)
                    _write_all(fd, block[:max(0, self.left)])
                    lied = isinstance(claimed, int) and pos + len(block) > claimed
                    raise self._over(f"guest:{show(rpath)}" + (f" (it sent more than the {human(claimed)} "
                                                                f"it claimed)" if lied else ""))
                _write_all(fd, block)
                self.left -= len(block)
                pos += len(block)
                if self.progress is not None:
                    self.progress(pos, claimed or 0)
                if len(block) < READ_WINDOW:
                    break
        os.fchmod(fd, file_mode(mode, self.umask))
        self.files += 1

    def link(self, rpath: str, dfd: int, name: str, depth: int) -> None:
        target = self.readlink(rpath)
        if target is None:
            self.warn(f"skipped symlink guest:{show(rpath)}: the guest did not say where it points")
            return
        if not safe_link_target(target, depth):
            self.warn(f"skipped symlink guest:{show(rpath)} -> {show(target)}: it points outside the copied tree")
            return
        try:
            os.symlink(target, name, dir_fd=dfd)
        except FileExistsError:
            raise UnsafeGuestData(f"guest:{show(rpath)} was listed after something of the same name",
                                  "the guest's SFTP server is hostile or broken") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _top_name(sftp, remote: str) -> str | None:
    name = os.path.basename(remote.rstrip("/"))
    if bad_name(name) is None:
        return name
    try:
        name = os.path.basename(sftp.normalize(remote).rstrip("/"))
    except (OSError, UnicodeDecodeError):
        return None
    return name if bad_name(name) is None else None


def _destination(sftp, remote: str, local: Path) -> tuple[Path, str]:
    """(existing parent directory, new name) for the copy of ``remote`` at ``local``."""
    try:
        lst = os.lstat(local)
    except FileNotFoundError:
        lst = None
    if lst is not None and stat.S_ISLNK(lst.st_mode):
        raise Conflict(f"the destination {local} is a symlink; banger does not write through links",
                       f"give the real directory instead: {os.path.realpath(local)}")
    if lst is not None and stat.S_ISDIR(lst.st_mode):
        name = _top_name(sftp, remote)
        if name is None:
            raise UsageError(f"cannot name the copy of guest:{show(remote)} inside {local}",
                             "give a destination path that does not exist yet, e.g. ./out")
        return local, name
    if lst is not None:
        raise Conflict(f"the destination {local} already exists", "remove it first or choose a new path")
    name = local.name
    if bad_name(name) is not None:
        raise UsageError(f"invalid destination {local}", "give a path ending in a new file or directory name")
    return local.parent, name


def get(t, remote: str, local: Path, *, max_bytes: int | None = None,
        warn: Callable[[str], None] | None = None) -> int:
    """Copy a guest file or directory tree to ``local`` (see the module docstring). Returns files copied."""
    local = Path(local)
    if max_bytes is not None and max_bytes < 0:
        raise UsageError(f"--max-size must not be negative (got {max_bytes})", "e.g. --max-size 2G")
    warn = warn or _warn_stderr
    sftp = t.open_sftp_client()
    try:
        sftp.get_channel().settimeout(STALL_S)
        try:
            st = sftp.stat(remote)
        except FileNotFoundError:
            raise NotFound(f"no such path in the guest: {show(remote)}",
                           "check the path (banger vm exec VM -- ls)") from None
        except OSError as e:
            raise SshError(f"cannot read guest:{show(remote)}: {e}", "check the path and its permissions") from None
        mode = st.st_mode or 0
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise UsageError(f"guest:{show(remote)} is not a regular file or a directory", "copy a file or a directory")
        parent, name = _destination(sftp, remote, local)
        try:
            pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"no such local directory: {parent}", "create it first") from None
        except NotADirectoryError:
            raise UsageError(f"{parent} is not a directory", "give a destination inside a directory") from None
        try:
            limit = default_max_bytes(pfd) if max_bytes is None else max_bytes
            d = _Download(sftp, remote, max_bytes=limit, user_limit=max_bytes is not None, warn=warn)
            return _run(d, remote, pfd, name, st, parent)
        finally:
            os.close(pfd)
    except TimeoutError:
        raise GuestTimeout(f"copy from guest:{show(remote)} stalled: nothing received for {STALL_S:g}s",
                           "is the VM wedged? (banger vm show)") from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HostError(f"copy from guest:{show(remote)} failed: the destination file system is full; "
                            f"nothing was kept", "free some space or copy elsewhere") from None
        raise SshError(f"copy from guest:{show(remote)} failed: {e}", "check the paths and local free space") from None
    finally:
        sftp.close()


def _run(d: _Download, remote: str, pfd: int, name: str, st, parent: Path) -> int:
    """Create the new top-level file or directory, fill it; on any failure remove what was created."""
    import struct

    from banger.guest.ssh import import_paramiko

    paramiko = import_paramiko()

    is_dir = stat.S_ISDIR(st.st_mode)
    created = False
    try:
        try:
            if is_dir:
                os.mkdir(name, 0o700, dir_fd=pfd)
            else:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=pfd)
        except FileExistsError:
            raise Conflict(f"the destination {parent / name} already exists",
                           "remove it first or choose a new path") from None
        created = True
        if is_dir:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            if is_dir:
                d.tree(remote, fd, 0)
                os.fchmod(fd, dir_mode(st.st_mode, d.umask))
            else:
                d.fill(fd, remote, st.st_size, st.st_mode)
        finally:
            os.close(fd)
        d.summary()
        return d.files
    except BaseException as e:
        if created:
            _remove(pfd, name, is_dir, d.warn)
        if isinstance(e, (paramiko.SSHException, EOFError, ValueError, IndexError, struct.error)):
            raise SshError(f"copy from guest:{show(remote)} failed: the guest's SFTP server sent a bad reply "
                           f"({show(str(e))}); nothing was kept", "the VM may have stopped; banger vm show") from None
        raise


def fetch_file(sftp, remote: str, local: Path, *, max_bytes: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> int:
    """One guest file into a NEW local file (0600, O_EXCL|O_NOFOLLOW in its parent's dir fd), at most
    ``max_bytes`` (default: free space minus the margin), removed on any failure; returns its size.
    For callers that hold an SFTP client already (workspace export bundles and patches);
    ``progress(done, claimed)`` is called after each window."""
    from banger.guest.ssh import import_paramiko

    paramiko = import_paramiko()

    local = Path(local)
    pfd = os.open(local.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = sftp.stat(remote)
        if not stat.S_ISREG(st.st_mode or 0):
            raise UnsafeGuestData(f"guest:{show(remote)} is not a regular file", "the guest changed it under us")
        limit = default_max_bytes(pfd) if max_bytes is None else max_bytes
        d = _Download(sftp, remote, max_bytes=limit, user_limit=max_bytes is not None, warn=_warn_stderr)
        d.progress = progress
        try:
            fd = os.open(local.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=pfd)
        except FileExistsError:
            raise Conflict(f"{local} already exists", "remove it first") from None
        try:
            try:
                d.fill(fd, remote, st.st_size, 0o600)
            finally:
                os.close(fd)
        except BaseException as e:
            _remove(pfd, local.name, False, _warn_stderr)
            if isinstance(e, (paramiko.SSHException, EOFError)):
                raise SshError(f"download of guest:{show(remote)} failed: {show(str(e))}",
                               "the VM may have stopped; banger vm show") from None
            raise
        return d.max_bytes - d.left
    finally:
        os.close(pfd)


def _remove(pfd: int, name: str, is_dir: bool, warn) -> None:
    import shutil

    try:
        if is_dir:
            shutil.rmtree(name, dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)
    except FileNotFoundError:
        pass
    except OSError as e:
        warn(f"could not remove the partial copy {name}: {e}")


# ---------------------------------------------------------------------------- to the guest
def put(t, local: Path, remote: str, *, warn: Callable[[str], None] | None = None) -> int:
    """Copy a local file or directory tree to ``remote`` in the guest. Returns files copied."""
    local = Path(local)
    warn = warn or _warn_stderr
    try:
        fd = os.open(local, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # the named path may be a link
    except FileNotFoundError:
        raise NotFound(f"no such local path: {local}", "check the path") from None
    except OSError as e:
        raise HostError(f"cannot open {local}: {e}", "check the path and its permissions") from None
    sftp = t.open_sftp_client()
    try:
        sftp.get_channel().settimeout(STALL_S)
        st = os.fstat(fd)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise UsageError(f"{local} is not a regular file or a directory", "copy a file or a directory")
        remote = _remote_target(sftp, remote, local.name or os.path.basename(os.path.realpath(local)))
        if stat.S_ISDIR(st.st_mode):
            return _put_tree(sftp, fd, remote, st.st_mode, warn)
        _put_file(sftp, fd, remote)
        return 1
    except TimeoutError:
        raise GuestTimeout(f"copy to guest:{show(remote)} stalled for {STALL_S:g}s", "is the VM wedged?") from None
    except OSError as e:
        raise SshError(f"copy to guest:{show(remote)} failed: {e}", "check the path and free space in the guest") from None
    finally:
        os.close(fd)
        sftp.close()


def _put_file(sftp, fd: int, remote: str) -> None:
    st = os.fstat(fd)
    with os.fdopen(os.dup(fd), "rb") as f:
        sftp.putfo(f, remote, file_size=st.st_size)
    sftp.chmod(remote, st.st_mode & 0o7777)


def _put_tree(sftp, dfd: int, remote: str, mode: int, warn) -> int:
    _mkdir(sftp, remote, mode & 0o7777)
    n = 0
    with os.scandir(dfd) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        rp = f"{remote.rstrip('/')}/{e.name}"
        if e.is_symlink():
            sftp.symlink(os.readlink(e.name, dir_fd=dfd), rp)  # the link itself, never its target
            continue
        try:
            fd = os.open(e.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as err:
            if err.errno == errno.ELOOP:  # became a link since the listing
                sftp.symlink(os.readlink(e.name, dir_fd=dfd), rp)
                continue
            raise
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                n += _put_tree(sftp, fd, rp, st.st_mode, warn)
            elif stat.S_ISREG(st.st_mode):
                _put_file(sftp, fd, rp)
                n += 1
            else:
                warn(f"skipped {e.path if isinstance(e.path, str) else e.name}: not a regular file, "
                     f"directory or symlink")
        finally:
            os.close(fd)
    return n


def _remote_target(sftp, remote: str, base: str) -> str:
    """`cp x VM:/dir` puts x inside /dir when /dir exists (like cp)."""
    try:
        if stat.S_ISDIR(sftp.stat(remote).st_mode):
            return f"{remote.rstrip('/')}/{base}"
    except OSError:
        pass
    return remote


def _mkdir(sftp, path: str, mode: int) -> None:
    try:
        sftp.mkdir(path, mode)
    except OSError:
        try:
            if not stat.S_ISDIR(sftp.stat(path).st_mode):
                raise
        except OSError as e:
            raise BangerError(f"cannot create guest directory {path}: {e}", "check the path") from None
