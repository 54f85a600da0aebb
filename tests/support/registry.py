"""A real OCI registry on loopback (Debian's docker-registry) plus our own push client.

* ``registry`` fixture: docker-registry with a temp config and storage dir on a free
  127.0.0.1 port; yields a ``Registry`` helper that pushes blobs, manifests and indexes
  with plain HTTP (distribution API v2, monolithic uploads).
* ``AuthFront``: a loopback front that demands ``Bearer`` tokens (401 +
  ``WWW-Authenticate: Bearer realm=..,service=..,scope=..``), issues them from /token,
  proxies everything else to the registry, and records every request (path, time) so
  tests can count blob downloads and see whether pulls overlapped. Optional delay per
  blob GET.
* ``layer()``: build a layer tar (plain/gzip/zstd) from a list of entries.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import socket
import subprocess
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- layers
def layer(entries: list[tuple], compression: str = "gzip") -> tuple[bytes, str, str]:
    """Build a layer. Returns (blob, media type, diff_id).

    Entries: ("dir", name, mode, uid, gid) | ("file", name, data, mode, uid, gid) |
    ("symlink", name, target) | ("hardlink", name, target) | ("whiteout", path) |
    ("opaque", dir) | ("chr", name, major, minor) | ("fifo", name) | ("raw", TarInfo, data|None)
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            kind = e[0]
            if kind == "raw":
                ti, data = e[1], e[2]
                tf.addfile(ti, io.BytesIO(data) if data is not None else None)
                continue
            ti = tarfile.TarInfo()
            ti.mtime = 1_700_000_000
            if kind == "dir":
                ti.name, ti.type = e[1], tarfile.DIRTYPE
                ti.mode, ti.uid, ti.gid = (e[2:5] if len(e) >= 5 else (0o755, 0, 0))
                tf.addfile(ti)
            elif kind == "file":
                name, data = e[1], e[2]
                ti.name, ti.size = name, len(data)
                ti.mode, ti.uid, ti.gid = (e[3:6] if len(e) >= 6 else (0o644, 0, 0))
                tf.addfile(ti, io.BytesIO(data))
            elif kind == "symlink":
                ti.name, ti.type, ti.linkname, ti.mode = e[1], tarfile.SYMTYPE, e[2], 0o777
                tf.addfile(ti)
            elif kind == "hardlink":
                ti.name, ti.type, ti.linkname, ti.mode = e[1], tarfile.LNKTYPE, e[2], 0o644
                tf.addfile(ti)
            elif kind == "whiteout":
                d, _, b = e[1].rpartition("/")
                ti.name = (d + "/" if d else "") + ".wh." + b
                tf.addfile(ti, io.BytesIO(b""))
            elif kind == "opaque":
                ti.name = e[1].rstrip("/") + "/.wh..wh..opq"
                tf.addfile(ti, io.BytesIO(b""))
            elif kind == "chr":
                ti.name, ti.type, ti.devmajor, ti.devminor, ti.mode = e[1], tarfile.CHRTYPE, e[2], e[3], 0o666
                tf.addfile(ti)
            elif kind == "fifo":
                ti.name, ti.type, ti.mode = e[1], tarfile.FIFOTYPE, 0o644
                tf.addfile(ti)
            else:
                raise ValueError(kind)
    raw = buf.getvalue()
    if compression == "gzip":
        return gzip.compress(raw, mtime=0), MT_GZIP, digest(raw)
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(raw), MT_ZSTD, digest(raw)
    return raw, MT_TAR, digest(raw)


# ---------------------------------------------------------------- push client (our own code)
class Registry:
    def __init__(self, url: str, storage: Path | None = None):
        self.url = url.rstrip("/")
        self.storage = storage
        self.host = urlsplit(self.url).netloc

    def push_blob(self, repo: str, data: bytes) -> str:
        d = digest(data)
        r = requests.post(f"{self.url}/v2/{repo}/blobs/uploads/", timeout=30)
        assert r.status_code == 202, (r.status_code, r.text)
        loc = r.headers["Location"]
        if loc.startswith("/"):
            loc = self.url + loc
        sep = "&" if "?" in loc else "?"
        r = requests.put(f"{loc}{sep}digest={d}", data=data,
                         headers={"Content-Type": "application/octet-stream"}, timeout=60)
        assert r.status_code == 201, (r.status_code, r.text)
        return d

    def push_manifest(self, repo: str, ref: str, doc: dict | bytes, media_type: str = MT_MANIFEST) -> tuple[str, int]:
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        r = requests.put(f"{self.url}/v2/{repo}/manifests/{ref}", data=body,
                         headers={"Content-Type": media_type}, timeout=30)
        assert r.status_code == 201, (r.status_code, r.text)
        return digest(body), len(body)

    def push_image(self, repo: str, tag: str | None, layers: list[tuple[bytes, str, str]], *,
                   arch: str = "amd64", config_extra: dict | None = None) -> dict:
        descs = []
        for blob, mt, _ in layers:
            descs.append({"mediaType": mt, "digest": self.push_blob(repo, blob), "size": len(blob)})
        config = {"architecture": arch, "os": "linux",
                  "rootfs": {"type": "layers", "diff_ids": [diff for _, _, diff in layers]},
                  "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"], **(config_extra or {})}}
        cbytes = json.dumps(config).encode()
        cdesc = {"mediaType": MT_CONFIG, "digest": self.push_blob(repo, cbytes), "size": len(cbytes)}
        manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": cdesc, "layers": descs}
        body = json.dumps(manifest).encode()
        d, size = self.push_manifest(repo, tag or digest(body), body)
        return {"digest": d, "size": size, "layers": descs, "config": cdesc, "manifest": manifest}

    def push_index(self, repo: str, tag: str, entries: list[tuple[dict, str, str]]) -> str:
        """entries: (pushed image dict, os, arch)."""
        idx = {"schemaVersion": 2, "mediaType": MT_INDEX,
               "manifests": [{"mediaType": MT_MANIFEST, "digest": img["digest"], "size": img["size"],
                              "platform": {"os": o, "architecture": a}} for img, o, a in entries]}
        d, _ = self.push_manifest(repo, tag, idx, MT_INDEX)
        return d


def start_registry(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    conf = workdir / "config.yml"
    conf.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = open(workdir / "registry.log", "wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"{url}/v2/", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"docker-registry did not start: {(workdir / 'registry.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, url


def stop_registry(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    work = tmp_path_factory.mktemp("registry")
    proc, url = start_registry(work)
    try:
        yield Registry(url, work / "storage")
    finally:
        stop_registry(proc)


# ---------------------------------------------------------------- token-auth front + request log
class AuthFront:
    """Loopback front: Bearer challenge + token issuer + proxy; logs requests."""

    def __init__(self, upstream: str, *, require_token: bool = True, blob_delay: float = 0.0):
        self.upstream = urlsplit(upstream).netloc
        self.require_token = require_token
        self.blob_delay = blob_delay
        self.token = "tok-" + os.urandom(8).hex()
        self.log: list[tuple[float, str, str, int]] = []  # (time, method, path, status)
        self.token_requests: list[dict] = []
        self._lock = threading.Lock()
        front = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _record(self, status):
                with front._lock:
                    front.log.append((time.monotonic(), self.command, self.path, status))

            def do_GET(self):
                u = urlsplit(self.path)
                if u.path == "/token":
                    q = {k: v[0] for k, v in parse_qs(u.query).items()}
                    front.token_requests.append(q)
                    body = json.dumps({"token": front.token, "expires_in": 300}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    self._record(200)
                    return
                if front.require_token and self.headers.get("Authorization") != f"Bearer {front.token}":
                    repo = u.path[len("/v2/"):].split("/manifests/")[0].split("/blobs/")[0]
                    body = b'{"errors":[{"code":"UNAUTHORIZED"}]}'
                    self.send_response(401)
                    self.send_header("WWW-Authenticate",
                                     f'Bearer realm="{front.url}/token",service="banger-test",'
                                     f'scope="repository:{repo}:pull"')
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    self._record(401)
                    return
                if "/blobs/" in u.path and front.blob_delay:
                    time.sleep(front.blob_delay)
                conn = http.client.HTTPConnection(front.upstream, timeout=60)
                hdrs = {k: v for k, v in self.headers.items() if k.lower() in ("accept",)}
                conn.request("GET", self.path, headers=hdrs)
                resp = conn.getresponse()
                # follow the registry's own redirects (none for the filesystem driver) transparently
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() in ("content-type", "docker-content-digest", "location"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()
                self._record(resp.status)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.host = urlsplit(self.url).netloc
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def blob_gets(self, digests=None) -> list[str]:
        out = []
        for _, m, p, st in self.log:
            if m == "GET" and "/blobs/" in p and st == 200:
                d = p.rsplit("/", 1)[1]
                if digests is None or d in digests:
                    out.append(d)
        return out


# ---------------------------------------------------------------- a hostile registry front
class TokenServer:
    """A token service on its own loopback address (default 127.0.0.2, which banger does not treat
    as loopback): answers /token with ``token`` and records each request."""

    def __init__(self, token: str, host: str = "127.0.0.2"):
        self.token = token
        self.requests: list[str] = []
        srv = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                srv.requests.append(self.path)
                body = json.dumps({"token": srv.token}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer((host, 0), H)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class HostileFront:
    """A loopback proxy in front of the real registry that misbehaves on purpose.

    ``rules``: [(match, behaviour)], ``match(path) -> bool``, the first match applies; other
    requests are proxied faithfully. Behaviours (dicts with ``do``):

    * ``trickle``: real headers at once, then the body one byte every ``every`` s;
    * ``trickle_headers``: the status line and headers one byte every ``every`` s;
    * ``silent``: headers, then nothing, holding the socket open until the client leaves;
    * ``oversend``: the real body then ``extra`` more bytes; ``length`` "none" (close-delimited)
      or "claimed" (Content-Length counts the extra bytes);
    * ``undersend``: the body ``missing`` bytes short; ``length`` "claimed" (Content-Length says
      the short length) or "none" (the connection closes early);
    * ``serve``: ``body`` bytes as ``content_type``; ``chunked`` for no Content-Length.

    ``realm``: answer every request without ``Authorization: Bearer <token>`` with a 401 Bearer
    challenge naming that realm. Each answer is logged: {"path", "do", "sent", "hung_up"}.
    """

    def __init__(self, upstream: str, rules=(), *, realm: str | None = None, token: str | None = None):
        self.upstream = urlsplit(upstream).netloc
        self.rules = list(rules)
        self.realm, self.token = realm, token
        self.log: list[dict] = []
        self.stop = threading.Event()
        front = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, entry, data: bytes, every: float = 0.0) -> None:
                try:
                    if not every:
                        self.wfile.write(data)
                        entry["sent"] += len(data)
                        return
                    for i in range(len(data)):
                        if front.stop.is_set():
                            return
                        self.wfile.write(data[i:i + 1])
                        entry["sent"] += 1
                        front.stop.wait(every)
                except (BrokenPipeError, ConnectionResetError):
                    entry["hung_up"] = True
                    self.close_connection = True

            def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
                lines = [f"HTTP/1.1 {status} {http.client.responses.get(status, 'X')}"]
                lines += [f"{k}: {v}" for k, v in headers]
                return ("\r\n".join(lines) + "\r\n\r\n").encode()

            def _wait_hangup(self, entry) -> None:
                import select

                while not front.stop.is_set():
                    r, _, _ = select.select([self.connection], [], [], 0.1)
                    if r:
                        try:
                            if not self.connection.recv(65536):
                                break
                        except OSError:
                            break
                entry["hung_up"] = True
                self.close_connection = True

            def do_GET(self):
                entry = {"path": self.path, "do": "proxy", "sent": 0, "hung_up": False, "t": time.monotonic()}
                front.log.append(entry)
                if front.realm and self.headers.get("Authorization") != f"Bearer {front.token}":
                    entry["do"] = "challenge"
                    body = b'{"errors":[{"code":"UNAUTHORIZED"}]}'
                    self._send(entry, self._head(401, [
                        ("WWW-Authenticate", f'Bearer realm="{front.realm}",service="hostile"'),
                        ("Content-Length", str(len(body)))]) + body)
                    return
                rule = next((b for m, b in front.rules if m(self.path)), None)
                if rule is not None and rule["do"] == "serve":
                    entry["do"] = "serve"
                    body = rule["body"]
                    hdrs = [("Content-Type", rule.get("content_type", MT_MANIFEST))]
                    if rule.get("chunked"):
                        hdrs.append(("Transfer-Encoding", "chunked"))
                        self._send(entry, self._head(200, hdrs))
                        for i in range(0, len(body), 1 << 16):
                            piece = body[i:i + (1 << 16)]
                            self._send(entry, b"%x\r\n" % len(piece) + piece + b"\r\n")
                            if entry["hung_up"]:
                                return
                        self._send(entry, b"0\r\n\r\n")
                    else:
                        hdrs.append(("Content-Length", str(len(body))))
                        self._send(entry, self._head(200, hdrs) + body)
                    return
                conn = http.client.HTTPConnection(front.upstream, timeout=60)
                conn.request("GET", self.path, headers={k: v for k, v in self.headers.items()
                                                        if k.lower() == "accept"})
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                hdrs = [(k, v) for k, v in resp.getheaders()
                        if k.lower() in ("content-type", "docker-content-digest", "location")]
                if rule is None or resp.status != 200:
                    self._send(entry, self._head(resp.status, hdrs + [("Content-Length", str(len(data)))]) + data)
                    return
                do = entry["do"] = rule["do"]
                if do == "trickle":
                    self._send(entry, self._head(200, hdrs + [("Content-Length", str(len(data)))]))
                    self._send(entry, data, rule["every"])
                elif do == "trickle_headers":
                    self._send(entry, self._head(200, hdrs + [("Content-Length", str(len(data)))]), rule["every"])
                    self._send(entry, data)
                elif do == "silent":
                    self._send(entry, self._head(200, hdrs + [("Content-Length", str(len(data)))]))
                    self._wait_hangup(entry)
                elif do == "oversend":
                    extra = bytes(rule["extra"])
                    if rule["length"] == "claimed":
                        self._send(entry, self._head(200, hdrs + [("Content-Length", str(len(data) + len(extra)))]))
                    else:
                        self._send(entry, self._head(200, hdrs + [("Connection", "close")]))
                        self.close_connection = True
                    self._send(entry, data)
                    for i in range(0, len(extra), 1 << 20):
                        if entry["hung_up"]:
                            break
                        self._send(entry, extra[i:i + (1 << 20)])
                elif do == "undersend":
                    short = data[:len(data) - rule["missing"]]
                    if rule["length"] == "claimed":
                        self._send(entry, self._head(200, hdrs + [("Content-Length", str(len(short)))]) + short)
                    else:
                        self._send(entry, self._head(200, hdrs + [("Connection", "close")]) + short)
                        self.close_connection = True
                else:
                    raise ValueError(do)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.host = urlsplit(self.url).netloc
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()

    def entries(self, do: str) -> list[dict]:
        return [e for e in self.log if e["do"] == do]


def bomb_layer(files: list[tuple[str, int]], *, chunk: int = 16 << 20) -> bytes:
    """A gzip layer whose files are ``size`` bytes of zeros each, built without ever holding them:
    one gzip member per tar header and per run of zeros (gzip readers join members; runs of one
    length are compressed once), so 20 GiB of zeros costs about 20 MiB of blob."""
    cache: dict[int, bytes] = {}

    def zeros(n: int) -> bytes:
        if n not in cache:
            cache[n] = gzip.compress(bytes(n), compresslevel=9, mtime=0)
        return cache[n]

    out = []
    for name, size in files:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = size, 0o644, 1_700_000_000
        out.append(gzip.compress(ti.tobuf(format=tarfile.PAX_FORMAT), mtime=0))
        full, rest = divmod(size, chunk)
        out.extend([zeros(chunk)] * full)
        if rest:
            out.append(zeros(rest))
        if size % 512:
            out.append(zeros(-size % 512))
    out.append(zeros(1024))
    return b"".join(out)
