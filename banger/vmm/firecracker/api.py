"""Firecracker's HTTP API over its unix socket: one small resource object per API path.

Every non-2xx answer becomes an ExternalError carrying Firecracker's
``fault_message``; transport failures (socket gone, timeout) become
ExternalError / GuestTimeout with a hint.  The transport is the standard library's
http.client over an AF_UNIX socket (HTTP/1.1 keep-alive): a command that talks to a
VMM pays no import of requests (~60 ms here) for it.

Only fields Firecracker knows may be sent (every body rejects unknown fields), so
callers pass keyword arguments and ``None`` values are dropped rather than sent.
"""

from __future__ import annotations

import json
import re
import socket

from banger.errors import ExternalError, GuestTimeout

_ID = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def check_id(value: str, what: str = "id") -> str:
    """Firecracker resource IDs: letters, digits and '_' only (1-64 characters)."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ExternalError(f"invalid Firecracker {what} {value!r}",
                            "Firecracker IDs may only contain letters, digits and '_' (at most 64)")
    return value


def _clean(body: dict) -> dict:
    out = {}
    for k, v in body.items():
        if v is None:
            continue
        if isinstance(v, dict):
            v = _clean(v)
        elif isinstance(v, list):
            v = [_clean(x) if isinstance(x, dict) else x for x in v]
        out[k] = v
    return out


class FirecrackerApiError(ExternalError):
    code = "vmm_api"

    def __init__(self, method: str, path: str, status: int, fault: str, hint: str | None = None):
        super().__init__(f"Firecracker rejected {method} {path} (HTTP {status}): {fault}",
                         hint or "check the VM's firecracker.log (banger vm logs) for details",
                         details={"method": method, "path": path, "status": status, "fault_message": fault})
        self.method = method
        self.path = path
        self.status = status
        self.fault_message = fault


class Resource:
    """One API path (``/machine-config``, ``/drives/rootfs`` ...)."""

    def __init__(self, api: FirecrackerApi, path: str):
        self.api = api
        self.path = path

    def get(self, timeout: float | None = None):
        return self.api.request("GET", self.path, None, timeout=timeout)

    def put(self, timeout: float | None = None, **body):
        return self.api.request("PUT", self.path, _clean(body), timeout=timeout)

    def patch(self, timeout: float | None = None, **body):
        return self.api.request("PATCH", self.path, _clean(body), timeout=timeout)


class FirecrackerApi:
    """A client for one Firecracker process's API socket (HTTP/1.1 keep-alive)."""

    def __init__(self, socket_path: str, timeout: float = 10.0):
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._session = None
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of every request sent

    # ---- transport ----
    def _connect(self, timeout: float):
        import http.client

        class _UnixConnection(http.client.HTTPConnection):
            def connect(conn):  # noqa: N805 - http.client's own hook
                conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.sock.settimeout(conn.timeout)
                conn.sock.connect(self.socket_path)

        return _UnixConnection("localhost", timeout=timeout)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _send(self, method: str, path: str, payload: bytes | None, t: float):
        """One request/response on the kept-alive connection (a fresh one if the VMM closed it while idle)."""
        import http.client

        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            reused = self._session is not None
            if self._session is None:
                self._session = self._connect(t)
            conn = self._session
            conn.timeout = t
            if conn.sock is not None:
                conn.sock.settimeout(t)
            try:
                conn.request(method, path, body=payload, headers=headers)
                r = conn.getresponse()
                data = r.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if reused and attempt == 0:
                    continue  # the server dropped an idle keep-alive connection before reading this request
                raise
            except BaseException:
                self.close()
                raise
            if r.getheader("Connection", "").lower() == "close":
                self.close()
            return r.status, data
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, body: dict | None = None, *, timeout: float | None = None):
        t = self.timeout if timeout is None else timeout
        payload = None if body is None else json.dumps(body).encode()
        try:
            status, data = self._send(method, path, payload, t)
        except TimeoutError:
            self.log.append((method, path, -1))
            raise GuestTimeout(f"Firecracker did not answer {method} {path} within {t:g}s",
                               "the VMM may be stuck; banger vm kill stops it, banger gc cleans up",
                               details={"method": method, "path": path, "socket": self.socket_path}) from None
        except OSError as e:
            self.log.append((method, path, -2))
            raise ExternalError(f"cannot reach Firecracker's API at {self.socket_path} ({method} {path}): "
                                f"{_reason(e)}",
                                "the VMM process may have exited; see its firecracker.log",
                                details={"method": method, "path": path, "socket": self.socket_path}) from None
        except Exception as e:  # http.client's protocol errors (a garbled answer)
            self.log.append((method, path, -2))
            raise ExternalError(f"Firecracker's API at {self.socket_path} answered {method} {path} with "
                                f"something that is not HTTP: {type(e).__name__}: {e}",
                                "the VMM process may have crashed; see its firecracker.log") from None
        self.log.append((method, path, status))
        if status >= 300:
            fault = ""
            try:
                doc = json.loads(data or b"{}")
                fault = (doc.get("fault_message") or doc.get("error") or "") if isinstance(doc, dict) else ""
            except ValueError:
                fault = data.decode(errors="replace").strip()
            raise FirecrackerApiError(method, path, status, fault or "(no fault_message)")
        if status == 204 or not data:
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise ExternalError(f"Firecracker answered {method} {path} with invalid JSON",
                                "see the VM's firecracker.log") from None

    # ---- resources (one per API path) ----
    @property
    def instance(self) -> Resource:
        return Resource(self, "/")

    @property
    def version(self) -> Resource:
        return Resource(self, "/version")

    @property
    def vm_config(self) -> Resource:
        return Resource(self, "/vm/config")

    @property
    def machine_config(self) -> Resource:
        return Resource(self, "/machine-config")

    @property
    def boot_source(self) -> Resource:
        return Resource(self, "/boot-source")

    def drive(self, drive_id: str) -> Resource:
        return Resource(self, f"/drives/{check_id(drive_id, 'drive id')}")

    def network_interface(self, iface_id: str) -> Resource:
        return Resource(self, f"/network-interfaces/{check_id(iface_id, 'interface id')}")

    @property
    def entropy(self) -> Resource:
        return Resource(self, "/entropy")

    @property
    def logger(self) -> Resource:
        return Resource(self, "/logger")

    @property
    def metrics(self) -> Resource:
        return Resource(self, "/metrics")

    @property
    def actions(self) -> Resource:
        return Resource(self, "/actions")

    @property
    def vm(self) -> Resource:
        return Resource(self, "/vm")

    @property
    def snapshot_create(self) -> Resource:
        return Resource(self, "/snapshot/create")

    @property
    def snapshot_load(self) -> Resource:
        return Resource(self, "/snapshot/load")

    # ---- conveniences ----
    def describe(self) -> dict:
        return self.instance.get()

    def action(self, action_type: str, timeout: float | None = None) -> None:
        self.actions.put(action_type=action_type, timeout=timeout)


def _reason(e: Exception) -> str:
    s = str(e)
    for key in ("No such file or directory", "Connection refused", "Connection reset", "Broken pipe"):
        if key in s:
            return key
    return s[-200:]
