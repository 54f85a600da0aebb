"""The handler's side of Firecracker's UFFD handshake (firecracker-facts.md section 4).

The handler listens on an AF_UNIX stream socket before the restore request,
accepts ONE connection and receives ONE message: a JSON array of
``{base_host_virt_addr, size, offset, page_size, page_size_kib}`` (no framing)
with exactly one SCM_RIGHTS fd, the userfaultfd. Nothing is sent back.

Everything the peer sends is validated here; anything off raises
HandshakeError (a banger.errors.ExternalError) with a message and a hint.
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
import stat
import struct
import time
from dataclasses import dataclass, field

from banger.errors import ExternalError, GuestTimeout

PAGE_SIZES = (4096, 2097152)
MAX_MESSAGE = 1 << 20
MAX_FDS = 16  # room to see (and close) a peer sending too many
_HINT = ("the VMM's UFFD handshake is not what banger expects (Firecracker 1.x: a JSON array of regions "
         "plus one userfaultfd); check the Firecracker version and the snapshot's memory file")


class HandshakeError(ExternalError):
    code = "uffd_handshake"

    def __init__(self, message: str, hint: str | None = _HINT, **kw):
        super().__init__(message, hint, **kw)


class ConnectTimeout(GuestTimeout):
    code = "uffd_connect_timeout"


class HandlerFailed(ExternalError):
    code = "uffd_failed"


@dataclass(frozen=True)
class Region:
    base: int
    size: int
    offset: int  # in the memory file


@dataclass
class PeerCred:
    pid: int
    uid: int
    gid: int
    pidfd: int = -1  # a pidfd for the process that connected (the caller owns it), -1 if none


SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5+


def peer_pidfd(conn: socket.socket, pid: int) -> int:
    """A pidfd for the process that connected: SO_PEERPIDFD names exactly that process, so a signal
    through it never hits a later owner of its pid. Older kernels: pidfd_open of the SO_PEERCRED pid,
    right after accept (only a peer that already died could have had its pid reused by then).
    -1 when neither works."""
    try:
        return conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        pass
    if pid <= 0:
        return -1
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return -1
    os.set_inheritable(fd, False)
    return fd


@dataclass
class Handshake:
    regions: list[Region]
    page_size: int
    uffd: int
    uffd_features: int | None = None
    ignored_fields: list[str] = field(default_factory=list)


def listen(path: str) -> socket.socket:
    """Bind and listen, then publish the socket under ``path`` by rename.

    The path appears only once the socket already listens, so whoever waits for
    the file (spawn_handler, the VMM) never sees ECONNREFUSED.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISSOCK(st.st_mode):
        raise HandshakeError(f"{path} exists and is not a socket", "remove it or pick another UFFD socket path")
    tmp = f"{path}.{os.getpid()}.tmp"
    if len(os.fsencode(tmp)) > 107:
        raise HandshakeError(f"UFFD socket path is too long for AF_UNIX: {path}",
                             "use a shorter runtime directory (BANGER_RUN)")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        s.bind(tmp)
        s.listen(1)
        os.replace(tmp, path)
    except BaseException:
        s.close()
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return s


def accept(listener: socket.socket, timeout: float) -> tuple[socket.socket, PeerCred]:
    """Accept the one connection, or raise ConnectTimeout after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    p = select.poll()
    p.register(listener, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectTimeout(f"the VMM never connected to the UFFD socket within {timeout:g}s",
                                 "check that Firecracker was asked to restore with backend_type Uffd and this "
                                 "socket as backend_path; see the VMM log")
        if p.poll(max(1, int(left * 1000))):
            conn, _ = listener.accept()
            conn.setblocking(True)
            pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return conn, PeerCred(pid, uid, gid, peer_pidfd(conn, pid))


def receive(conn: socket.socket, timeout: float) -> tuple[bytes, list[int]]:
    """Receive the handshake bytes and every fd passed with them (the caller owns the fds)."""
    deadline = time.monotonic() + timeout
    data = b""
    fds: list[int] = []
    truncated = False
    p = select.poll()
    p.register(conn, select.POLLIN)
    while True:
        # the first chunk may take until the deadline; later ones must follow promptly
        wait = deadline - time.monotonic() if not data else min(0.2, deadline - time.monotonic())
        if wait <= 0 or not p.poll(max(1, int(wait * 1000))):
            if not data:
                _close_all(fds)
                raise HandshakeError(f"the VMM connected but sent nothing within {timeout:g}s")
            break
        msg, anc, flags, _ = conn.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        if flags & socket.MSG_CTRUNC:
            truncated = True
        if not msg:
            break  # EOF
        data += msg
        if len(data) > MAX_MESSAGE:
            _close_all(fds)
            raise HandshakeError(f"the handshake message is larger than {MAX_MESSAGE} bytes")
        if _complete_json(data):
            break
    if truncated:
        _close_all(fds)
        raise HandshakeError(f"the VMM sent more than {MAX_FDS} file descriptors; exactly one (the userfaultfd) "
                             "is expected")
    return data, fds


def _complete_json(data: bytes) -> bool:
    try:
        json.loads(data.decode("utf-8"))
        return True
    except (ValueError, UnicodeDecodeError):
        return False


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def parse_regions(data: bytes, mem_size: int) -> tuple[list[Region], int, list[str]]:
    """Validate the JSON region list against a memory file of ``mem_size`` bytes.

    Returns (regions in the order sent, page size, sorted names of ignored fields).
    """
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise HandshakeError("the handshake message is not UTF-8 JSON") from None
    except ValueError as e:
        raise HandshakeError(f"the handshake message is not valid JSON ({e}): {_preview(data)}") from None
    if not isinstance(doc, list) or not doc:
        raise HandshakeError(f"the handshake must be a non-empty JSON array of regions, got {_preview(data)}")
    regions: list[Region] = []
    page_size = None
    ignored: set[str] = set()
    known = {"base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"}
    for i, item in enumerate(doc):
        if not isinstance(item, dict):
            raise HandshakeError(f"region {i} is not a JSON object: {item!r}")
        vals = {}
        for key in ("base_host_virt_addr", "size", "offset"):
            if key not in item:
                raise HandshakeError(f"region {i} has no {key!r}")
            vals[key] = _uint(item[key], i, key)
        ps = None
        for key in ("page_size", "page_size_kib"):  # page_size_kib carries bytes too (Firecracker 1.7+)
            if key in item and item[key] is not None:
                v = _uint(item[key], i, key)
                if ps is not None and v != ps:
                    raise HandshakeError(f"region {i}: page_size {ps} and page_size_kib {v} disagree")
                ps = v if ps is None else ps
        ps = 4096 if ps is None else ps
        if ps not in PAGE_SIZES:
            raise HandshakeError(f"region {i}: unsupported page size {ps} (banger serves 4096 and 2097152)")
        if page_size is None:
            page_size = ps
        elif ps != page_size:
            raise HandshakeError(f"region {i}: page size {ps} differs from region 0's {page_size}")
        ignored.update(k for k in item if k not in known)
        base, size, off = vals["base_host_virt_addr"], vals["size"], vals["offset"]
        if size == 0:
            raise HandshakeError(f"region {i} is empty")
        for name, v in (("base_host_virt_addr", base), ("size", size), ("offset", off)):
            if v % ps:
                raise HandshakeError(f"region {i}: {name} {v:#x} is not aligned to the {ps}-byte page size")
        if off + size > mem_size:
            raise HandshakeError(
                f"region {i} (file offset {off}, size {size}) ends past the end of the memory file "
                f"({mem_size} bytes)", "the memory file does not belong to this snapshot or is truncated; "
                "re-create the snapshot")
        if base + size > 1 << 64:
            raise HandshakeError(f"region {i} wraps around the address space")
        regions.append(Region(base, size, off))
    assert page_size is not None
    if mem_size % page_size:
        raise HandshakeError(f"the memory file size {mem_size} is not a multiple of the page size {page_size}",
                             "the memory file does not belong to this snapshot; re-create the snapshot")
    by_base = sorted(regions, key=lambda r: r.base)
    for a, b in zip(by_base, by_base[1:], strict=False):
        if a.base + a.size > b.base:
            raise HandshakeError(f"regions overlap in memory: [{a.base:#x}, +{a.size:#x}) and "
                                 f"[{b.base:#x}, +{b.size:#x})")
    by_off = sorted(regions, key=lambda r: r.offset)
    for a, b in zip(by_off, by_off[1:], strict=False):
        if a.offset + a.size > b.offset:
            raise HandshakeError(f"regions overlap in the memory file: offsets {a.offset}+{a.size} and {b.offset}")
    return regions, page_size, sorted(ignored)


def _uint(v, i: int, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v >= 1 << 64:
        raise HandshakeError(f"region {i}: {key} must be an unsigned 64-bit integer, got {v!r}")
    return v


def _preview(data: bytes) -> str:
    text = data[:120].decode("utf-8", "replace")
    return repr(text) + ("..." if len(data) > 120 else "")


def check_uffd(fds: list[int]) -> tuple[int, int | None]:
    """Exactly one fd, and it must be a userfaultfd. Returns (fd, negotiated features or None).

    Closes every fd on error. Makes the fd non-blocking (Firecracker creates it so).
    """
    if not fds:
        raise HandshakeError("the handshake carried no file descriptor (SCM_RIGHTS); the userfaultfd is missing")
    if len(fds) > 1:
        _close_all(fds)
        raise HandshakeError(f"the handshake carried {len(fds)} file descriptors; exactly one (the userfaultfd) "
                             "is expected")
    fd = fds[0]
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = "?"
    if "userfaultfd" not in target:
        _close_all(fds)
        raise HandshakeError(f"the file descriptor sent is not a userfaultfd ({target})")
    os.set_blocking(fd, False)
    features = None
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("API:"):
                    features = int(line.split()[1].split(":")[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return fd, features
