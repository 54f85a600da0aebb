"""Firecracker's HTTP API over its unix socket: one small resource object per API path.

Every non-2xx answer becomes an ExternalError carrying Firecracker's
``fault_message``; transport failures (socket gone, timeout) become
ExternalError / GuestTimeout with a hint.  ``requests`` and
``requests_unixsocket`` are imported lazily (only commands that talk to a VMM pay
for them).

Only fields Firecracker knows may be sent (every body rejects unknown fields), so
callers pass keyword arguments and ``None`` values are dropped rather than sent.
"""

from __future__ import annotations

import re
from urllib.parse import quote

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
    @property
    def session(self):
        if self._session is None:
            import requests_unixsocket

            self._session = requests_unixsocket.Session()
        return self._session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def url(self, path: str) -> str:
        return f"http+unix://{quote(self.socket_path, safe='')}{path}"

    def request(self, method: str, path: str, body: dict | None = None, *, timeout: float | None = None):
        import requests

        t = self.timeout if timeout is None else timeout
        try:
            if body is None:
                r = self.session.request(method, self.url(path), timeout=t)
            else:
                r = self.session.request(method, self.url(path), json=body, timeout=t)
        except requests.Timeout:
            self.log.append((method, path, -1))
            raise GuestTimeout(f"Firecracker did not answer {method} {path} within {t:g}s",
                               "the VMM may be stuck; banger vm kill stops it, banger gc cleans up",
                               details={"method": method, "path": path, "socket": self.socket_path}) from None
        except requests.ConnectionError as e:
            self.log.append((method, path, -2))
            raise ExternalError(f"cannot reach Firecracker's API at {self.socket_path} ({method} {path}): "
                                f"{_reason(e)}",
                                "the VMM process may have exited; see its firecracker.log",
                                details={"method": method, "path": path, "socket": self.socket_path}) from None
        self.log.append((method, path, r.status_code))
        if r.status_code >= 300:
            fault = ""
            try:
                doc = r.json()
                fault = doc.get("fault_message") or doc.get("error") or ""
            except ValueError:
                fault = r.text.strip()
            raise FirecrackerApiError(method, path, r.status_code, fault or "(no fault_message)")
        if r.status_code == 204 or not r.content:
            return None
        return r.json()

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
