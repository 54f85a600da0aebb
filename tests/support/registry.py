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
