"""A hostile guest SFTP server: a real paramiko SSH server over a socketpair, answering whatever the
test scripted (names with ``/``, ``..``, NUL, absolute paths, duplicates, non-UTF-8 bytes, links then
writes through them, setuid modes, files larger than they claim or endless, infinite nesting,
reads that never answer).  It also records what a client writes to it (``put``).

Usage::

    g = HostileGuest()
    g.dir("/root/d", [g.file("sh", b"#!", mode=0o104755), g.link("l", "/etc"), g.file("l/passwd", b"x")])
    with serve(g) as t:          # t: an authenticated client paramiko.Transport
        sftpcopy.get(t, "/root/d", out)

Paths the client asks for are looked up as the exact strings it sends (``dir + "/" + name``), so a
client that joins hostile names gets exactly what it asked for.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import paramiko
from paramiko.sftp import SFTP_FAILURE, SFTP_NO_SUCH_FILE, SFTP_OK

_HOST_KEY = None


def _host_key():
    global _HOST_KEY
    if _HOST_KEY is None:
        _HOST_KEY = paramiko.ECDSAKey.generate()
    return _HOST_KEY


@dataclass
class Entry:
    name: str | bytes
    mode: int                                    # full st_mode (type bits included)
    data: bytes | Callable[[int, int], bytes] = b""  # callable(offset, length) for generated contents
    size: int | None = None                      # the size the server claims (default: len(data))
    target: str | None = None                    # for links
    uid: int = 1000
    gid: int = 1000

    def attrs(self) -> paramiko.SFTPAttributes:
        a = paramiko.SFTPAttributes()
        a.filename = self.name
        a.st_mode = self.mode
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_size = self.size if self.size is not None else (len(self.data) if isinstance(self.data, bytes) else 0)
        a.st_atime = a.st_mtime = 1_700_000_000
        return a


@dataclass
class HostileGuest:
    dirs: dict[str, list[Entry]] = field(default_factory=dict)
    top: dict[str, Entry] = field(default_factory=dict)        # stat() answers for top-level paths
    deep: Callable[[str], list[Entry] | None] | None = None    # dynamic listings (infinite nesting)
    stall: threading.Event | None = None                       # set: reads block until it is set
    # what a client wrote (put direction)
    written: dict[str, bytearray] = field(default_factory=dict)
    made_dirs: list[str] = field(default_factory=list)
    symlinks: dict[str, str] = field(default_factory=dict)
    chmods: dict[str, int] = field(default_factory=dict)
    requests: list[tuple] = field(default_factory=list)

    # -- building scripts
    @staticmethod
    def file(name, data=b"", *, mode=0o100644, size=None, uid=1000, gid=1000) -> Entry:
        return Entry(name, mode if mode & 0o170000 else stat.S_IFREG | mode, data, size, uid=uid, gid=gid)

    @staticmethod
    def subdir(name, *, mode=0o40755) -> Entry:
        return Entry(name, mode if mode & 0o170000 else stat.S_IFDIR | mode)

    @staticmethod
    def link(name, target: str) -> Entry:
        return Entry(name, stat.S_IFLNK | 0o777, target=target)

    def dir(self, path: str, entries: list[Entry], *, mode: int = 0o40755) -> None:
        self.dirs[path] = entries
        self.top.setdefault(path, Entry(os.path.basename(path), mode if mode & 0o170000 else stat.S_IFDIR | mode))

    # -- lookups
    def listing(self, path: str) -> list[Entry] | None:
        if path in self.dirs:
            return self.dirs[path]
        return self.deep(path) if self.deep else None

    def entry(self, path: str) -> Entry | None:
        if path in self.top:
            return self.top[path]
        parent, _, name = path.rpartition("/")
        for e in self.listing(parent or "/") or []:
            if (e.name.decode(errors="replace") if isinstance(e.name, bytes) else e.name) == name:
                return e
        # a name with "/" in it: the client joined it into a longer path
        for d, entries in self.dirs.items():
            for e in entries:
                if isinstance(e.name, str) and f"{d.rstrip('/')}/{e.name}" == path:
                    return e
        return None


class _Handle(paramiko.SFTPHandle):
    def __init__(self, guest: HostileGuest, path: str, entry: Entry | None, writing: bool):
        super().__init__()
        self.guest, self.path, self.e, self.writing = guest, path, entry, writing

    def read(self, offset, length):
        if self.guest.stall is not None:
            self.guest.stall.wait()
            return SFTP_FAILURE
        d = self.e.data
        if callable(d):
            return d(offset, length)
        return d[offset:offset + length]

    def write(self, offset, data):
        buf = self.guest.written.setdefault(self.path, bytearray())
        if len(buf) < offset:
            buf.extend(b"\0" * (offset - len(buf)))
        buf[offset:offset + len(data)] = data
        return SFTP_OK

    def stat(self):
        if self.writing:
            a = paramiko.SFTPAttributes()
            a.st_mode, a.st_size = stat.S_IFREG | 0o644, len(self.guest.written.get(self.path, b""))
            return a
        return self.e.attrs()


class _Sftp(paramiko.SFTPServerInterface):
    def __init__(self, server, guest: HostileGuest, *a, **kw):
        super().__init__(server, *a, **kw)
        self.g = guest

    def list_folder(self, path):
        self.g.requests.append(("list", path))
        entries = self.g.listing(path)
        if entries is None:
            return SFTP_NO_SUCH_FILE
        return [e.attrs() for e in entries]

    def _stat(self, path):
        if path in self.g.written:
            a = paramiko.SFTPAttributes()
            a.st_mode, a.st_size = stat.S_IFREG | 0o644, len(self.g.written[path])
            return a
        if path in self.g.made_dirs:
            a = paramiko.SFTPAttributes()
            a.st_mode = stat.S_IFDIR | 0o755
            return a
        e = self.g.entry(path)
        if e is None:
            return SFTP_NO_SUCH_FILE
        return e.attrs()

    def stat(self, path):
        self.g.requests.append(("stat", path))
        return self._stat(path)

    def lstat(self, path):
        self.g.requests.append(("lstat", path))
        return self._stat(path)

    def open(self, path, flags, attr):
        self.g.requests.append(("open", path, flags))
        writing = bool(flags & (os.O_WRONLY | os.O_RDWR))
        if writing:
            self.g.written[path] = bytearray()
            return _Handle(self.g, path, None, True)
        e = self.g.entry(path)
        if e is None or not stat.S_ISREG(e.mode):
            return SFTP_NO_SUCH_FILE
        return _Handle(self.g, path, e, False)

    def readlink(self, path):
        self.g.requests.append(("readlink", path))
        e = self.g.entry(path)
        if e is None or e.target is None:
            return SFTP_NO_SUCH_FILE
        return e.target

    def mkdir(self, path, attr):
        self.g.requests.append(("mkdir", path))
        self.g.made_dirs.append(path)
        return SFTP_OK

    def chattr(self, path, attr):
        if attr.st_mode is not None:
            self.g.chmods[path] = attr.st_mode
        return SFTP_OK

    def symlink(self, target_path, path):
        self.g.requests.append(("symlink", target_path, path))
        self.g.symlinks[path] = target_path
        return SFTP_OK

    def canonicalize(self, path):
        return os.path.normpath("/" + path)


class _Server(paramiko.ServerInterface):
    def get_allowed_auths(self, username):
        return "none"

    def check_auth_none(self, username):
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind, chanid):
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


@contextlib.contextmanager
def serve(guest: HostileGuest):
    """An authenticated client Transport talking to a hostile SFTP server over a socketpair."""
    a, b = socket.socketpair()
    st = paramiko.Transport(b)
    st.add_server_key(_host_key())
    st.set_subsystem_handler("sftp", paramiko.SFTPServer, _Sftp, guest)
    started = threading.Event()
    err: list[BaseException] = []

    def run():
        try:
            st.start_server(server=_Server())
        except BaseException as e:  # surfaced below
            err.append(e)
        finally:
            started.set()

    threading.Thread(target=run, daemon=True).start()
    ct = paramiko.Transport(a)
    try:
        ct.start_client(timeout=10)
        ct.auth_none("root")
        started.wait(10)
        if err:
            raise err[0]
        yield ct
    finally:
        if guest.stall is not None:
            guest.stall.set()
        ct.close()
        st.close()
        a.close()
        b.close()
