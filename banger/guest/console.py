"""Guest console text on the host: stripped of terminal controls, and kept in a size-capped log.

Everything a guest prints on its serial console is hostile input.  Two rules:

* **Never raw to a terminal.**  ``sanitize`` removes every terminal control: CSI (``ESC [`` and the
  8-bit ``0x9b``), OSC / DCS / SOS / PM / APC strings up to their terminator, other ESC sequences,
  a lone ESC, C0 controls except ``\\n`` and ``\\t`` (so ``\\r`` and backspace too: they can
  overwrite what the user sees), DEL and C1 controls.  After it no character in 0x00-0x1f (but
  ``\\n``/``\\t``), 0x7f-0x9f is left, whatever the parser made of a malformed sequence.  ``tail``
  (the console in error messages) and ``vm logs`` on a terminal go through it; ``Sanitizer``
  does the same for a stream cut at arbitrary byte boundaries.
* **Bounded on disk.**  The VMM's serial output goes to a small per-VM *console pump* process
  (``python -I -c ... pump``, cwd ``/``, started before the VMM) which writes ``serial.log`` and
  rotates it to ``serial.log.1`` when it would pass the cap (``console_log_max_kib``, default 1024
  KiB): each file stays <= cap, so the log never takes more than 2 x cap.  The pump gets its file
  descriptors from banger (the VMM end of the console, the VM directory, for QEMU a listening
  control socket) rather than paths, so nothing it opens can be redirected, and it needs no
  readiness handshake.  It exits by itself when the VMM side reaches EOF (the VMM is gone), and
  the VMM driver also kills it (pid + start time in handles.json, ``console_pid``).
  QEMU: the serial chardev is one end of a socketpair (``-chardev socket,fd=N``); the pump
  forwards what clients write to the control socket (``serial.sock``, banger's ``@banger net ...``
  line) into the guest.  Firecracker: its stdout is a pipe to the pump (input stays the FIFO).
  A guest that prints faster than the pump writes is slowed down (the UART waits), never lost
  in memory.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # (not `typing`: the pump process should start fast)

if TYPE_CHECKING:  # the pump process imports nothing it does not need (start-up competes with the VMM's)
    from pathlib import Path

ROTATED_SUFFIX = ".1"
PUMP_LOG = "console-pump.log"
DEFAULT_MAX_KIB = 1024
MIN_MAX_KIB, MAX_MAX_KIB = 16, 1024 * 1024
HOLD_MAX = 4096             # a streaming sanitizer keeps at most this much of an unfinished sequence
CONTROL_CLIENTS_MAX = 8
INPUT_PENDING_MAX = 65536   # bytes queued for the guest's console input before clients are throttled

_SEQ = None
_PARTIAL = None


def _patterns():
    global _SEQ, _PARTIAL
    if _SEQ is None:
        import re

        strings = r"(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])"      # OSC, DCS, SOS, PM, APC
        body = r"[^\x07\x18\x1a\x1b\x9c]*"
        _SEQ = re.compile(
            r"(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?"    # CSI (a truncated one too)
            rf"|{strings}{body}(?:\x07|\x18|\x1a|\x1b\\|\x9c)?"        # strings up to BEL / CAN / SUB / ST
            r"|\x1b[\x20-\x2f]*[\x30-\x7e]?"                          # other escapes, a lone ESC
            r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]",                        # any other C0 (not \t \n), DEL, C1
            re.S)
        # an unfinished sequence at the very end of a chunk (the next chunk may complete it)
        _PARTIAL = re.compile(rf"(?:(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*|{strings}{body}|\x1b[\x20-\x2f]*)\Z",
                              re.S)
    return _SEQ, _PARTIAL


def sanitize(text: str | bytes) -> str:
    """``text`` with every terminal control and escape sequence removed (keeps ``\\n`` and ``\\t``).

    Bytes are decoded as UTF-8 with replacement (an invalid byte becomes U+FFFD, never a C1 control).
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    seq, _ = _patterns()
    return seq.sub("", text)


class Sanitizer:
    """``sanitize`` for a byte stream cut anywhere: holds back an incomplete UTF-8 character and an
    unfinished escape sequence (up to HOLD_MAX characters) until the next chunk or ``flush``."""

    def __init__(self):
        import codecs

        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""

    def feed(self, data: bytes) -> str:
        text = self._held + self._dec.decode(data)
        self._held = ""
        _, partial = _patterns()
        cut = max(text.rfind("\x1b"), *(text.rfind(c) for c in "\x9b\x90\x98\x9d\x9e\x9f"))
        if cut >= 0 and len(text) - cut <= HOLD_MAX and partial.match(text, cut):
            text, self._held = text[:cut], text[cut:]
        return sanitize(text)

    def flush(self) -> str:
        text = self._held + self._dec.decode(b"", final=True)
        self._held = ""
        return sanitize(text)


# ---------------------------------------------------------------------------- reading the log
def rotated(path: Path | str) -> str:
    return os.fspath(path) + ROTATED_SUFFIX


def read_all(path: Path | str) -> bytes:
    """The whole retained console: ``serial.log.1`` then ``serial.log`` (consistent across a rotation
    that happens while reading: retried until ``serial.log`` is the file that was read)."""
    path = os.fspath(path)
    for _ in range(5):
        try:
            cur = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            cur = -1
        try:
            old = _read_path(rotated(path))
            data = _read_fd(cur) if cur >= 0 else b""
            try:
                same = cur < 0 or os.stat(path, follow_symlinks=False).st_ino == os.fstat(cur).st_ino
            except FileNotFoundError:
                same = cur < 0
            if same:
                return old + data
        finally:
            if cur >= 0:
                os.close(cur)
    return old + data


def _read_path(p: str) -> bytes:
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _read_fd(fd: int, start: int = 0, limit: int | None = None) -> bytes:
    out = []
    os.lseek(fd, start, os.SEEK_SET)
    left = limit
    while left is None or left > 0:
        b = os.read(fd, 1 << 20 if left is None else min(left, 1 << 20))
        if not b:
            break
        out.append(b)
        if left is not None:
            left -= len(b)
    return b"".join(out)


def _tail_bytes(p: str, nbytes: int) -> bytes:
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        size = os.fstat(fd).st_size
        return _read_fd(fd, max(0, size - nbytes), nbytes)
    finally:
        os.close(fd)


def tail(path: Path | str, n: int = 20, *, rotation: bool = True) -> str:
    """The last ``n`` lines of a log, sanitized, without reading all of a large file.

    With ``rotation`` the end of ``serial.log.1`` is prepended when ``serial.log`` was just rotated
    and holds fewer than ``n`` lines."""
    path = os.fspath(path)
    data = _tail_bytes(path, 16384)
    if rotation and data.count(b"\n") < n:
        data = _tail_bytes(rotated(path), 16384) + data
    text = sanitize(data.replace(b"\r", b""))
    return "\n".join(text.splitlines()[-n:])


def follow(path: Path | str, write, *, keep_going, poll_s: float = 0.2, sanitizer: Sanitizer | None = None) -> None:
    """Write the retained console, then new output as it comes, to ``write(bytes)`` until
    ``keep_going()`` is false and everything has been written. Survives rotations (the old file is
    read to its end before switching to the new one)."""
    import time

    path = os.fspath(path)
    emit = (lambda b: write(sanitizer.feed(b).encode())) if sanitizer else write
    emit(_read_path(rotated(path)))
    fd, pos = -1, 0
    try:
        while True:
            if fd < 0:
                try:
                    fd, pos = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), 0
                except FileNotFoundError:
                    fd = -1
            progressed = False
            if fd >= 0:
                data = _read_fd(fd, pos)
                if data:
                    pos += len(data)
                    emit(data)
                    progressed = True
                try:
                    moved = os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino
                except FileNotFoundError:
                    moved = True
                if moved:  # rotated: finish the old file, then start on the new one
                    rest = _read_fd(fd, pos)
                    if rest:
                        emit(rest)
                    os.close(fd)
                    fd = -1
                    continue
            if not progressed and not keep_going():
                break
            if not progressed:
                time.sleep(poll_s)
    finally:
        if fd >= 0:
            os.close(fd)
        if sanitizer:
            write(sanitizer.flush().encode())


# ---------------------------------------------------------------------------- the pump (host side)
def cap_bytes(cfg) -> int:
    from banger.errors import UsageError

    v = getattr(cfg, "console_log_max_kib", DEFAULT_MAX_KIB)
    if isinstance(v, bool) or not isinstance(v, int) or not MIN_MAX_KIB <= v <= MAX_MAX_KIB:
        raise UsageError(f"console_log_max_kib = {v!r} is out of range",
                         f"set an integer from {MIN_MAX_KIB} to {MAX_MAX_KIB} (KiB per log file) in config.toml")
    return v * 1024


def isolated_python_argv(module: str, *args) -> list[str]:
    """``python -I -S -c ...`` running ``module._main(argv)`` from the banger tree that is running now:
    no PYTHONPATH, site-packages, user site or working directory on the path (spawn it with cwd ``/``);
    for helpers that need only the standard library and banger."""
    import banger

    root = os.path.dirname(os.path.dirname(os.path.realpath(banger.__file__)))
    boot = (f"import sys; sys.path.insert(0, sys.argv.pop(1)); "
            f"from {module} import _main; sys.exit(_main(sys.argv[1:]))")
    return [sys.executable, "-I", "-S", "-c", boot, root, *map(str, args)]


def spawn_pump(*, vm_id: str, vm_dir: Path, log_name: str, cap: int, vmm_fd: int, control_fd: int | None = None,
               diag_path: Path | None = None) -> tuple[int, int]:
    """Start the console pump detached; return (pid, start_time). It owns copies of ``vmm_fd`` and
    ``control_fd`` (the caller closes its own) and a directory fd for ``vm_dir``."""
    from banger.host import procs

    dfd = os.open(vm_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fds = [vmm_fd, dfd] + ([control_fd] if control_fd is not None else [])
        args = ["pump", "--vm", vm_id, "--vmm-fd", vmm_fd, "--dir-fd", dfd, "--log", log_name, "--cap", cap]
        if control_fd is not None:
            args += ["--control-fd", control_fd]
        return procs.spawn_detached(isolated_python_argv("banger.guest.console", *args),
                                    stdout_path=str(diag_path) if diag_path else None, pass_fds=tuple(fds),
                                    cwd="/")
    finally:
        os.close(dfd)


def stop_pump(handles: dict, *, grace: float = 1.0) -> None:
    """Let the pump drain and exit by itself (its VMM is gone), then SIGTERM, then SIGKILL."""
    import signal

    from banger.host import procs

    p = (handles.get("console_pid"), handles.get("console_pid_start"))
    if not p[0]:
        return
    if not procs.kill(*p, 0, wait=grace) and not procs.kill(*p, signal.SIGTERM, wait=1.0):
        procs.kill(*p, signal.SIGKILL)


# ---------------------------------------------------------------------------- the pump (its process)
class _Log:
    """serial.log in a directory fd, rotated to serial.log.1 before it would pass ``cap`` bytes."""

    def __init__(self, dfd: int, name: str, cap: int):
        self.dfd, self.name, self.cap = dfd, name, cap
        self.fd = -1
        self.size = 0
        self.errors: set[str] = set()
        self._open(truncate=False)
        if self.size > cap:  # a log from before the cap existed
            self._rotate()

    def _open(self, truncate: bool) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
        try:
            self.fd = os.open(self.name, flags, 0o600, dir_fd=self.dfd)
            self.size = os.fstat(self.fd).st_size
        except OSError as e:
            self.fd = -1
            self._note(f"cannot open {self.name}: {e}")

    def _rotate(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.rename(self.name, self.name + ROTATED_SUFFIX, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
        except OSError as e:
            self._note(f"cannot rotate {self.name}: {e}")
        self._open(truncate=True)

    def _note(self, msg: str) -> None:
        if msg not in self.errors and len(self.errors) < 20:  # each problem once: this log is not capped
            self.errors.add(msg)
            sys.stderr.write(f"banger console pump: {msg}\n")
            sys.stderr.flush()

    def write(self, data: bytes) -> None:
        while data:
            if self.fd < 0:
                self._open(truncate=False)
                if self.fd < 0:
                    return  # dropped: a console line is not worth dying for
            room = self.cap - self.size
            if room <= 0:
                self._rotate()
                continue
            chunk, rotate_after = data, False
            if len(data) > room:  # the rest starts the next file; cut at a line end when there is one
                chunk, rotate_after = data[:room], True
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    chunk = chunk[:nl + 1]
            data = data[len(chunk):]
            try:
                while chunk:
                    n = os.write(self.fd, chunk)
                    chunk = chunk[n:]
                    self.size += n
            except OSError as e:  # ENOSPC and the like: drop this output, keep the VM's console flowing
                self._note(f"cannot write {self.name}: {e}")
                return
            if rotate_after:
                self._rotate()


def pump(vmm_fd: int, dir_fd: int, log_name: str, cap: int, control_fd: int | None = None) -> int:
    """Copy the VMM's console output into the capped log; forward control clients' bytes to the VMM.
    Returns when the VMM side reaches EOF or fails."""
    import select
    import signal
    import socket

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    log = _Log(dir_fd, log_name, cap)
    os.set_blocking(vmm_fd, False)
    listener = None
    if control_fd is not None:
        listener = socket.socket(fileno=control_fd)
        listener.setblocking(False)
    clients: dict[int, socket.socket] = {}
    pending = bytearray()
    poller = select.poll()
    poller.register(vmm_fd, select.POLLIN)
    if listener is not None:
        poller.register(listener.fileno(), select.POLLIN)
    reading_clients = True
    while True:
        want_out = bool(pending)
        poller.modify(vmm_fd, select.POLLIN | (select.POLLOUT if want_out else 0))
        throttle = len(pending) >= INPUT_PENDING_MAX
        if throttle == reading_clients:
            reading_clients = not throttle
            for fd in clients:
                poller.modify(fd, select.POLLIN if reading_clients else 0)
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for fd, ev in events:
            if fd == vmm_fd:
                if ev & select.POLLIN:
                    try:
                        data = os.read(vmm_fd, 65536)
                    except BlockingIOError:
                        data = None
                    except OSError:
                        return 0
                    if data == b"":
                        return 0
                    if data:
                        log.write(data)
                elif ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    return 0
                if ev & select.POLLOUT and pending:
                    try:
                        n = os.write(vmm_fd, bytes(pending))
                        del pending[:n]
                    except BlockingIOError:
                        pass
                    except OSError:
                        pending.clear()
            elif listener is not None and fd == listener.fileno():
                try:
                    c, _ = listener.accept()
                except OSError:
                    continue
                if len(clients) >= CONTROL_CLIENTS_MAX:
                    c.close()
                    continue
                c.setblocking(False)
                clients[c.fileno()] = c
                poller.register(c.fileno(), select.POLLIN if reading_clients else 0)
            elif fd in clients:
                c = clients[fd]
                try:
                    data = c.recv(min(65536, max(1, INPUT_PENDING_MAX - len(pending))))
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    pending += data
                else:
                    poller.unregister(fd)
                    del clients[fd]
                    c.close()


def _main(argv: list[str]) -> int:
    """``pump --vm ID --vmm-fd N --dir-fd N --log NAME --cap BYTES [--control-fd N]`` (no argparse: start-up
    time matters, it runs while the VMM boots)."""
    usage = "usage: pump --vm ID --vmm-fd N --dir-fd N --log NAME --cap BYTES [--control-fd N]\n"
    if not argv or argv[0] != "pump" or len(argv) % 2 != 1:
        sys.stderr.write(usage)
        return 2
    opts = dict(zip(argv[1::2], argv[2::2], strict=True))
    try:
        vmm_fd, dir_fd, cap = int(opts["--vmm-fd"]), int(opts["--dir-fd"]), int(opts["--cap"])
        control = int(opts["--control-fd"]) if "--control-fd" in opts else None
        log, _vm = opts["--log"], opts["--vm"]  # --vm: for `ps` and gc, which VM this pump serves
    except (KeyError, ValueError):
        sys.stderr.write(usage)
        return 2
    if "/" in log or log in ("", ".", "..") or cap < MIN_MAX_KIB * 1024 or set(opts) - {
            "--vm", "--vmm-fd", "--dir-fd", "--log", "--cap", "--control-fd"}:
        sys.stderr.write(usage + "--log must be a plain file name and --cap at least 16 KiB\n")
        return 2
    return pump(vmm_fd, dir_fd, log, cap, control)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
