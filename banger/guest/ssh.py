"""SSH to guests through paramiko: pinned host keys, readiness polling, exec, shell, sftp copy.

Host keys are never auto-accepted: each VM's ``known_hosts`` (written when its
overlay disk got its injected host key) is loaded explicitly and the server key
must match it, else the connection is refused.  Key exchange prefers
curve25519-sha256 (the post-quantum default costs ~0.3 s under emulation), and
keepalives stop a session hanging forever on a dead VM.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from banger.errors import ExternalError, GuestTimeout

KEX_FIRST = "curve25519-sha256@libssh.org"
KEEPALIVE_S = 5


class SshError(ExternalError):
    code = "ssh"
    refused = False  # the connection was refused (nothing listens yet)


class HostKeyMismatch(SshError):
    code = "host_key_mismatch"


def import_paramiko():
    """paramiko, without ``invoke`` (its config parser's optional `Match exec` runner, which banger never
    uses: it parses no ssh_config, and importing invoke costs ~40-80 ms of the ~150 ms import here)."""
    if "paramiko" not in sys.modules and "invoke" not in sys.modules:
        sys.modules["invoke"] = None  # a failed import: paramiko.config records it and goes on
        try:
            import paramiko
        finally:
            if sys.modules.get("invoke", 0) is None:
                del sys.modules["invoke"]
        return paramiko
    import paramiko

    return paramiko


def preload() -> None:
    """Import paramiko in a background thread (CPU the main thread does not wait for: start it once the
    VMM runs, while the guest boots, or before a resume); the first real use joins the import."""
    import threading

    if "paramiko" not in sys.modules:
        threading.Thread(target=_preload, name="preload-ssh", daemon=True).start()


def _preload() -> None:
    try:
        import_paramiko()
    except Exception:  # noqa: BLE001 - the real import later reports it
        pass


def connect(ip: str, *, key_path: Path, known_hosts: Path, user: str = "root", port: int = 22,
            timeout: float = 10.0):
    """Open an authenticated paramiko Transport to ``ip`` whose host key matches ``known_hosts``."""
    paramiko = import_paramiko()

    try:
        sock = socket.create_connection((ip, port), timeout=timeout)
    except OSError as e:
        err = SshError(f"cannot reach {ip}:{port}: {e}", "is the VM running? (banger vm show)")
        err.refused = isinstance(e, ConnectionRefusedError)
        raise err from None
    t = paramiko.Transport(sock)
    try:
        t.banner_timeout = timeout
        t.auth_timeout = timeout
        opts = t.get_security_options()
        kex = list(opts.kex)
        if KEX_FIRST in kex:
            kex.remove(KEX_FIRST)
            opts.kex = [KEX_FIRST, *kex]
        opts.key_types = ["ssh-ed25519"]  # the only host key type banger injects and pins
        try:
            t.start_client(timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise SshError(f"SSH handshake with {ip} failed: {e}", "the guest's sshd may still be starting") from None
        _check_host_key(t, ip, port, known_hosts)
        pkey = paramiko.Ed25519Key.from_private_key_file(str(key_path))
        try:
            t.auth_publickey(user, pkey)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise SshError(f"SSH authentication as {user}@{ip} failed: {e}",
                           "the image's authorized key does not match banger's client key "
                           "(rebuild the image, or check /root/.ssh on the work disk)") from None
        t.set_keepalive(KEEPALIVE_S)
        return t
    except BaseException:
        t.close()
        raise


def _check_host_key(t, ip: str, port: int, known_hosts: Path) -> None:
    import paramiko

    if not Path(known_hosts).is_file():
        raise HostKeyMismatch(f"no pinned host key for {ip} ({known_hosts} missing)",
                              "the VM directory is damaged; recreate the VM")
    hk = paramiko.HostKeys(str(known_hosts))
    key = t.get_remote_server_key()
    host = ip if port == 22 else f"[{ip}]:{port}"
    known = hk.lookup(host)
    if not known or key.get_name() not in known or known[key.get_name()] != key:
        raise HostKeyMismatch(f"host key of {ip} does not match the key pinned for this VM "
                              f"(got {key.get_name()} {key.get_base64()[:24]}...)",
                              "another machine may answer on this address; check `banger vm list` and "
                              "`banger gc`")


def wait_ready(ip: str, *, key_path: Path, known_hosts: Path, deadline: float,
               alive: Callable[[], None] | None = None, attempt_timeout: float = 3.0):
    """Poll until SSH authenticates (returns the Transport) or ``deadline`` (monotonic) passes.

    ``alive()`` is called between attempts and should raise if the VM died. A host key
    mismatch is not retried: it is never going to get better.
    """
    last = None
    while True:
        if alive is not None:
            alive()
        try:
            return connect(ip, key_path=key_path, known_hosts=known_hosts,
                           timeout=max(0.5, min(attempt_timeout, deadline - time.monotonic())))
        except HostKeyMismatch:
            raise
        except SshError as e:
            last = e.message
            refused = e.refused
        now = time.monotonic()
        if now >= deadline:
            raise GuestTimeout(f"SSH on {ip} not ready: {last}", "see the serial console: banger vm logs")
        # refused: the guest's sshd is about to listen (a clone's standby taking its new key): a refusal
        # costs the guest nothing, so ask again soon
        time.sleep(min(0.02 if refused else 0.1, max(0.0, deadline - now)))


def command_string(argv: list[str]) -> str:
    """One argument is passed to the remote shell as written; several are quoted word by word."""
    return argv[0] if len(argv) == 1 else shlex.join(argv)


def _command_bytes(argv: list[str]) -> bytes:
    # names read from non-UTF-8 git output (surrogateescape) go back to the guest as the same bytes
    return command_string(argv).encode("utf-8", "surrogateescape")


def exec_command(t, argv: list[str], *, stdin=None, stdout=None, stderr=None, get_pty: bool = False) -> int:
    """Run ``argv`` in the guest, streaming output; return its exit status.

    ``stdin`` is a binary file to forward (None: none); stdout/stderr default to ours.
    """
    import select
    import threading

    out = stdout or sys.stdout.buffer
    err = stderr or sys.stderr.buffer
    chan = t.open_session()
    try:
        if get_pty:
            chan.get_pty()
        chan.exec_command(_command_bytes(argv))
        if stdin is not None:
            def pump():
                try:
                    while True:
                        data = os.read(stdin.fileno(), 65536)
                        if not data:
                            break
                        chan.sendall(data)
                except OSError:
                    pass
                finally:
                    try:
                        chan.shutdown_write()
                    except OSError:
                        pass
            threading.Thread(target=pump, daemon=True).start()
        else:
            chan.shutdown_write()
        while True:
            r, _, _ = select.select([chan], [], [], 1.0)
            progressed = False
            while chan.recv_ready():
                out.write(chan.recv(65536))
                progressed = True
            while chan.recv_stderr_ready():
                err.write(chan.recv_stderr(65536))
                progressed = True
            out.flush()
            err.flush()
            if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                break
            if not progressed and not t.is_active():
                raise SshError("SSH connection to the guest dropped", "the VM may have stopped; banger vm show")
        return chan.recv_exit_status()
    finally:
        chan.close()


def run_capture(t, argv: list[str], timeout: float = 60.0, max_bytes: int = 64 << 20) -> tuple[int, str, str]:
    """Run ``argv`` and return (status, stdout, stderr) as text; status -1 if the channel closed without one.

    stdout and stderr are drained together (a command writing megabytes to stderr before its
    stdout would otherwise fill the SSH window and stall both sides until the timeout). stdout is
    decoded as UTF-8 with surrogateescape (non-UTF-8 names survive and encode back to the same
    bytes), stderr with replacement characters. ``timeout`` bounds the whole command; more than
    ``max_bytes`` of output in all is an error (a guest cannot make the host buffer without bound).
    """
    import select

    chan = t.open_session()
    try:
        deadline = time.monotonic() + timeout
        chan.exec_command(_command_bytes(argv))
        chan.shutdown_write()
        out, err = bytearray(), bytearray()

        def drain() -> bool:
            """One chunk from each stream that has data (so neither can starve the other)."""
            got = False
            if chan.recv_ready():
                out.extend(chan.recv(65536))
                got = True
            if chan.recv_stderr_ready():
                err.extend(chan.recv_stderr(65536))
                got = True
            if len(out) + len(err) > max_bytes:
                raise SshError(f"guest command {argv!r} wrote more than {max_bytes >> 20} MiB of output",
                               "run it with its output redirected to a file in the guest")
            return got

        while True:
            eof = chan.eof_received or chan.closed  # read before draining: all data precedes the EOF
            got = drain()
            if not got and eof:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if not got:
                if not t.is_active():
                    raise SshError("SSH connection to the guest dropped", "the VM may have stopped; banger vm show")
                select.select([chan], [], [], min(left, 1.0))
        if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError
        return chan.recv_exit_status(), out.decode("utf-8", "surrogateescape"), err.decode("utf-8", "replace")
    except TimeoutError:
        raise GuestTimeout(f"guest command {argv!r} did not finish within {timeout:g}s", "is the VM wedged?") from None
    finally:
        chan.close()


def interactive_shell(t, argv: list[str] | None = None) -> int:
    """An interactive login shell (raw tty loop with window-size updates); returns the exit status."""
    import select
    import signal

    if not sys.stdin.isatty():
        return exec_command(t, argv or ["exec ${SHELL:-/bin/sh} -l"], stdin=sys.stdin)
    import termios
    import tty

    cols, rows = os.get_terminal_size(sys.stdout.fileno()) if sys.stdout.isatty() else (80, 24)
    chan = t.open_session()
    chan.get_pty(term=os.environ.get("TERM", "xterm"), width=cols, height=rows)
    if argv:
        chan.exec_command(command_string(argv))
    else:
        chan.invoke_shell()

    def on_winch(*_):
        try:
            c, r = os.get_terminal_size(sys.stdout.fileno())
            chan.resize_pty(width=c, height=r)
        except OSError:
            pass

    old_winch = signal.signal(signal.SIGWINCH, on_winch)
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        chan.settimeout(0.0)
        while True:
            try:
                r, _, _ = select.select([chan, fd], [], [], 1.0)
            except InterruptedError:
                continue
            if chan in r:
                try:
                    data = chan.recv(65536)
                except TimeoutError:
                    data = None
                if data == b"":
                    break
                if data:
                    os.write(sys.stdout.fileno(), data)
            if fd in r:
                data = os.read(fd, 4096)
                if not data:
                    break
                chan.sendall(data)
            if chan.exit_status_ready() and not chan.recv_ready():
                break
            if not t.is_active():
                break
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)
        signal.signal(signal.SIGWINCH, old_winch)
    status = chan.recv_exit_status() if chan.exit_status_ready() else 255
    chan.close()
    return status
