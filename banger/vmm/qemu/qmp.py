"""A small QMP (QEMU Machine Protocol) client over a unix socket.

One JSON object per line. After the greeting we send ``qmp_capabilities``; every
``execute`` returns the ``return`` member or raises ExternalError with QEMU's
``error.desc``.  Asynchronous events arriving in between are collected in
``events``.  File descriptors (for ``getfd``) travel as SCM_RIGHTS ancillary data.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from banger.errors import ExternalError


class QmpError(ExternalError):
    code = "qmp"


class Qmp:
    def __init__(self, path: Path | str, timeout: float = 10.0):
        self.path = str(path)
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._buf = b""
        self.events: list[dict] = []

    # ---- connection ----
    def connect(self, deadline: float | None = None) -> Qmp:
        """Connect, retrying until ``deadline`` (monotonic) while the socket does not exist yet."""
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if deadline is None or time.monotonic() >= deadline:
                    raise QmpError(f"cannot connect to QMP socket {self.path}: {e}",
                                   "the VMM is not running; see `banger vm show` / `banger vm logs`") from None
                time.sleep(0.005)  # a connect attempt costs nothing; QEMU listens ~50-100 ms after it starts
        self.sock = s
        greeting = self._read()
        if "QMP" not in greeting:
            self.close()
            raise QmpError(f"unexpected QMP greeting: {greeting}", "is this socket really QEMU's QMP?")
        self.execute("qmp_capabilities")
        return self

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- protocol ----
    def _read(self) -> dict:
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise QmpError(f"QMP did not answer within {self.timeout:g}s", "the VMM may be wedged; "
                               "`banger vm stop -f` forces it down") from None
            except OSError as e:
                raise QmpError(f"QMP connection failed: {e}", "the VMM probably exited") from None
            if not chunk:
                raise QmpError("QMP connection closed by QEMU", "the VMM exited; see `banger vm logs`")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def execute(self, command: str, args: dict | None = None, *, fds: list[int] | None = None):
        if self.sock is None:
            raise QmpError("QMP is not connected", "connect first")
        msg = {"execute": command}
        if args:
            msg["arguments"] = args
        data = (json.dumps(msg) + "\n").encode()
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.sendall(data)
        except OSError as e:
            raise QmpError(f"QMP send failed: {e}", "the VMM probably exited") from None
        while True:
            resp = self._read()
            if "event" in resp:
                self.events.append(resp)
                continue
            if "error" in resp:
                err = resp["error"]
                raise QmpError(f"QMP {command} failed: {err.get('class')}: {err.get('desc')}",
                               "see `banger vm logs` for the VMM's output")
            return resp.get("return")

    def status(self) -> str:
        return self.execute("query-status")["status"]


def qmp_call(path: Path | str, command: str, args: dict | None = None, timeout: float = 10.0):
    with Qmp(path, timeout).connect() as q:
        return q.execute(command, args)
