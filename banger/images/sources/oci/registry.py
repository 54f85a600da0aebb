"""A small OCI distribution (registry API v2) client: manifests, indexes, blobs.

* anonymous Bearer token auth: a 401 with ``WWW-Authenticate: Bearer realm=..,service=..,scope=..``
  -> GET the realm -> retry with ``Authorization: Bearer <token>``; the realm must be https
  unless the pull is ``insecure`` (or both registry and realm are loopback);
* every manifest and blob is verified against its sha256 digest;
* blobs are cached by digest (``<cache>/sha256/<hex>``); a file there has been verified
  (it is only renamed into place after its digest matched);
* plain http for loopback registries (127.0.0.1, localhost, ::1) or when ``insecure``.

Everything a registry sends is hostile input, bounded before it is trusted:

* manifests, indexes, configs and token answers are read streamed and refused beyond
  ``MAX_DOC_BYTES`` (4 MiB); their fields are checked (media types, digests, sizes, counts)
  and a malformed one is a ``BadManifest`` naming the field and the value;
* a blob is read up to its descriptor's size and no further: a registry that announces or
  sends more, or less, is an ``IntegrityError``; its digest is still verified;
* every transfer runs under a stall watch (``_Watch``): fewer than ``STALL_MIN_RATE`` bytes a
  second over ``stall_timeout`` seconds (response headers included) ends it with a
  ``TransferTimeout`` (exit 7), on top of the socket read timeout. A watchdog thread shuts the
  socket down, so even a read blocked inside http.client returns.

``requests`` is imported lazily. HTTP failures become banger errors at this edge.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from banger.errors import (
    ExternalError,
    GuestTimeout,
    IntegrityError,
    LimitExceeded,
    NoSpace,
    NotFound,
    UsageError,
)
from banger.host.fsutil import publish_by_rename
from banger.images.sources.oci.layers import FREE_RESERVE, human, require_free

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
ACCEPT = ", ".join(INDEX_TYPES + MANIFEST_TYPES)
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}

CONFIG_TYPES = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")

MiB = 1 << 20
MAX_DOC_BYTES = 4 * MiB      # a manifest, an index, an image config or a token answer
MAX_LAYERS = 500             # overlayfs' own stacking limit; Docker stops at 125
MAX_INDEX_ENTRIES = 1024
MAX_BLOB_BYTES = 1 << 40     # a descriptor claiming more than 1 TiB is malformed, not big
STALL_MIN_RATE = 1024        # bytes/s: slower than this over a whole stall window is a stall

DOCKER_HUB = "registry-1.docker.io"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_ANY_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_REPO = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass(frozen=True)
class Ref:
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"

    @property
    def host(self) -> str:
        if self.registry.startswith("["):  # [v6]:port
            return self.registry.split("]", 1)[0] + "]"
        return self.registry.rsplit(":", 1)[0]

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def parse_ref(ref: str) -> Ref:
    """``[registry[:port]/]repo[:tag][@sha256:...]``; Docker Hub when no registry is named."""
    bad = UsageError(f"invalid image reference {ref!r}",
                     "use [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST], e.g. debian:bookworm or 127.0.0.1:5000/app:1")
    if not ref or ref.strip() != ref or len(ref) > 512:
        raise bad
    rest, digest = ref, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.match(digest):
            raise bad
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, remainder
    else:
        registry, path = DOCKER_HUB, rest
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
        if not _TAG.match(tag):
            raise bad
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not _REPO.match(path):
        raise bad
    if not tag and not digest:
        tag = "latest"
    return Ref(registry, path, tag, digest)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _parse_challenge(header: str) -> tuple[str, dict]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


# ---------------------------------------------------------------- errors
class BadManifest(ExternalError):
    """Registry metadata (a manifest, an index, an image config, a token answer) is malformed."""

    code = "bad_manifest"


class InsecureRealm(ExternalError):
    """The registry names a plain-http token service and the pull is not ``--insecure``."""

    code = "insecure_realm"


class TransferTimeout(GuestTimeout):
    """A registry transfer stalled or hit its read timeout (exit 7, like every timeout)."""

    code = "timeout"


_MALFORMED = "the registry served malformed image metadata; nothing was installed. Use another image or tag"
_TAMPERED = "the registry served corrupt or tampered data; nothing was installed"


def _show(value, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _kind(value) -> str:
    for typ, name in ((bool, "a boolean"), (dict, "an object"), (list, "an array"), (str, "a string"),
                      (int, "a number"), (float, "a number")):
        if isinstance(value, typ):
            return name
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------- metadata checks (pure)
def parse_document(body: bytes, what: str) -> dict:
    """A JSON object from registry bytes, or BadManifest (never a traceback)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; deep nesting recurses
        raise BadManifest(f"{what} is not valid JSON", _MALFORMED) from None
    if not isinstance(doc, dict):
        raise BadManifest(f"{what} is {_kind(doc)}, not a JSON object", _MALFORMED)
    return doc


def check_digest(value, where: str, what: str, *, sha256_only: bool = True) -> str:
    if isinstance(value, str) and _DIGEST.match(value):
        return value
    if isinstance(value, str) and len(value) <= 200 and _ANY_DIGEST.match(value) and not value.startswith("sha256:"):
        if not sha256_only:
            return value
        raise BadManifest(f"{what}: {where}.digest {_show(value)} uses an algorithm banger cannot verify",
                          "banger verifies sha256 digests only; use an image published with sha256 digests")
    raise BadManifest(f"{what}: {where}.digest is {_show(value)}; expected sha256:<64 lowercase hex digits>",
                      _MALFORMED)


def check_size(value, where: str, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_BLOB_BYTES:
        return value
    raise BadManifest(f"{what}: {where}.size is {_show(value)}; expected a whole number of bytes "
                      f"from 0 to {MAX_BLOB_BYTES}", _MALFORMED)


def check_descriptor(d, where: str, what: str, *, media_types=None, sha256_only: bool = True) -> dict:
    """A content descriptor: an object with a known mediaType, a well-formed digest and a size."""
    if not isinstance(d, dict):
        raise BadManifest(f"{what}: {where} is {_kind(d)}, not a descriptor object", _MALFORMED)
    mt = d.get("mediaType")
    if media_types is not None and mt not in media_types:
        raise BadManifest(f"{what}: {where}.mediaType is {_show(mt)}; expected one of: {', '.join(media_types)}",
                          _MALFORMED)
    if mt is not None and not isinstance(mt, str):
        raise BadManifest(f"{what}: {where}.mediaType is {_kind(mt)}, not a string", _MALFORMED)
    check_digest(d.get("digest"), where, what, sha256_only=sha256_only)
    check_size(d.get("size"), where, what)
    return d


def document_type(doc: dict, header_type: str, what: str) -> str:
    """The media type of a manifest or index: its own field, else the Content-Type, else its shape."""
    sv = doc.get("schemaVersion")
    if type(sv) is not int or sv != 2:
        if type(sv) is int and sv == 1:
            raise BadManifest(f"{what} is a Docker schema 1 manifest (schemaVersion 1)",
                              "schema 1 is obsolete and unsigned content; pull a tag pushed by a current tool")
        raise BadManifest(f"{what}: schemaVersion is {_show(sv)}; expected 2", _MALFORMED)
    mt = doc.get("mediaType")
    if mt is not None:
        if mt in INDEX_TYPES + MANIFEST_TYPES:
            return mt
        raise BadManifest(f"{what}: mediaType is {_show(mt)}; banger pulls OCI and Docker v2 images and indexes "
                          f"({', '.join(INDEX_TYPES + MANIFEST_TYPES)})", "this is not a container image")
    if header_type in INDEX_TYPES + MANIFEST_TYPES:
        return header_type
    if "manifests" in doc:
        return MT_OCI_INDEX
    if "layers" in doc or "config" in doc:
        return MT_OCI_MANIFEST
    raise BadManifest(f"{what} has no mediaType and is neither an index nor an image manifest", _MALFORMED)


def check_index(doc: dict, what: str) -> list[dict]:
    ms = doc.get("manifests")
    if not isinstance(ms, list):
        raise BadManifest(f"{what}: manifests is {_kind(ms)}; expected an array of descriptors", _MALFORMED)
    if len(ms) > MAX_INDEX_ENTRIES:
        raise LimitExceeded(f"{what} lists {len(ms)} manifests; banger reads at most {MAX_INDEX_ENTRIES}",
                            "the index is hostile or broken; use a platform-specific tag or digest")
    for i, m in enumerate(ms):
        check_descriptor(m, f"manifests[{i}]", what, sha256_only=False)
        p = m.get("platform")
        if p is not None and not (isinstance(p, dict) and all(
                isinstance(p.get(k), (str, type(None))) for k in ("os", "architecture", "variant"))):
            raise BadManifest(f"{what}: manifests[{i}].platform is {_show(p)}; expected an object with "
                              "string os and architecture", _MALFORMED)
    return ms


def check_manifest(doc: dict, what: str) -> tuple[dict, list[dict]]:
    """(config descriptor, layer descriptors) of an image manifest, every field checked."""
    if "config" not in doc:
        raise BadManifest(f"{what} has no config descriptor", _MALFORMED)
    cfg = check_descriptor(doc["config"], "config", what)
    if cfg.get("mediaType") not in CONFIG_TYPES:
        raise BadManifest(f"{what}: config.mediaType is {_show(cfg.get('mediaType'))}; expected one of: "
                          f"{', '.join(CONFIG_TYPES)}", "this is not a container image (an OCI artifact?)")
    if cfg["size"] > MAX_DOC_BYTES:
        raise LimitExceeded(f"{what}: the image config is {human(cfg['size'])} by its descriptor; banger reads "
                            f"at most {human(MAX_DOC_BYTES)} of an image config",
                            "no real image config is that large; the image is hostile or broken")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise BadManifest(f"{what}: layers is {_kind(layers)}; expected an array of descriptors", _MALFORMED)
    if len(layers) > MAX_LAYERS:
        raise LimitExceeded(f"{what} has {len(layers)} layers; banger applies at most {MAX_LAYERS}",
                            "the image is hostile or broken; use another image or tag")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise BadManifest(f"{what}: layers[{i}] is {_kind(layer)}, not a descriptor object", _MALFORMED)
        if layer.get("mediaType") not in LAYER_TYPES:
            raise BadManifest(f"{what}: layers[{i}].mediaType is unsupported: {_show(layer.get('mediaType'))}",
                              "banger handles tar, tar+gzip and tar+zstd layers")
        check_descriptor(layer, f"layers[{i}]", what)
    return cfg, layers


def check_config(doc: dict, what: str = "image config") -> dict:
    """The fields of an image config banger keeps (Env, Entrypoint, Cmd, WorkingDir, User), typed."""
    c = doc.get("config")
    if c is None:
        return doc
    if not isinstance(c, dict):
        raise BadManifest(f"{what}: config is {_kind(c)}; expected an object", _MALFORMED)
    for k in ("Env", "Entrypoint", "Cmd"):
        v = c.get(k)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise BadManifest(f"{what}: config.{k} is {_show(v)}; expected an array of strings", _MALFORMED)
    for k in ("WorkingDir", "User"):
        v = c.get(k)
        if v is not None and not isinstance(v, str):
            raise BadManifest(f"{what}: config.{k} is {_show(v)}; expected a string", _MALFORMED)
    return doc


_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_realm(realm: str, *, registry: str, insecure: bool, registry_loopback: bool) -> str:
    """A token service URL may be used: https, or plain http when the pull is insecure or when
    registry and realm are both loopback (like the registry's own plain-http rule)."""
    try:
        u = urlsplit(realm)
        host = (u.hostname or "").lower()
        u.port  # noqa: B018  (raises ValueError on a malformed port)
    except ValueError:
        host, u = "", None
    if u is None or u.scheme.lower() not in ("http", "https") or not host:
        raise BadManifest(f"registry {registry} names a token service {_show(realm)} that is not an http(s) URL",
                          "the registry is misconfigured or hostile")
    if u.scheme.lower() == "https" or insecure or (registry_loopback and host in _LOOPBACK_HOSTS):
        return realm
    raise InsecureRealm(f"registry {registry} wants banger to fetch a token from {_show(realm)} over plain http",
                        "token services must be https; pass --insecure only if you trust every network "
                        "between this host and that service")


def _check_token(value, realm: str) -> str:
    if isinstance(value, str) and 0 < len(value) <= 65536 and all(0x21 <= ord(ch) <= 0x7E for ch in value):
        return value
    raise BadManifest(f"token service {_show(realm)} sent no usable token (got {_kind(value)})",
                      "the token service is broken or hostile; try again later")


# ---------------------------------------------------------------- the stall watch
_current = threading.local()  # the _Watch of the transfer running on this thread


class _Watch:
    """Stall deadline of one transfer (response headers and body, redirects included).

    Progress is at least ``STALL_MIN_RATE * window`` bytes since the last mark; a transfer with
    no progress for ``window`` seconds is stalled. The reading thread checks after every read;
    a watchdog thread checks every tick and shuts the transfer's sockets down, which wakes a
    read blocked in the kernel. A registry trickling a byte every few seconds, or sending its
    headers one byte at a time, is therefore cut off after ``window`` seconds, whatever the
    socket read timeout.
    """

    def __init__(self, window: float, what: str, registry: str):
        self.window = float(window)
        self.need = max(1, int(STALL_MIN_RATE * self.window))
        self.what, self.registry = what, registry
        self.total = 0
        self.fired = False
        self._mark = (time.monotonic(), 0)
        self._socks: list = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._prev = None

    def __enter__(self) -> _Watch:
        self._prev = getattr(_current, "watch", None)
        _current.watch = self
        self._thread = threading.Thread(target=self._run, name="banger-stall-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        _current.watch = self._prev
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def attach(self, sock) -> None:
        with self._lock:
            self._socks.append(sock)
            if self.fired:
                _shutdown(sock)

    def advance(self, n: int) -> None:
        with self._lock:
            self.total += n

    def _stalled(self, now: float) -> bool:  # under the lock
        t, n = self._mark
        if self.total - n >= self.need:
            self._mark = (now, self.total)
            return False
        return now - t >= self.window

    def _fire(self) -> None:  # under the lock
        self.fired = True
        for s in self._socks:
            _shutdown(s)

    def check(self) -> None:
        with self._lock:
            if not self.fired and self._stalled(time.monotonic()):
                self._fire()
            fired = self.fired
        if fired:
            raise self.error()

    def _run(self) -> None:
        tick = max(0.05, min(1.0, self.window / 8))
        while not self._done.wait(tick):
            with self._lock:
                if self._stalled(time.monotonic()):
                    self._fire()
                    return

    def error(self) -> TransferTimeout:
        return TransferTimeout(
            f"registry {self.registry} stalled: {self.what} received {self.total} bytes and less than "
            f"{self.need} bytes in {self.window:g} s (the floor is {STALL_MIN_RATE} bytes/s); transfer dropped",
            "the registry or the network is too slow or hostile; try again later, or raise "
            "pull_stall_timeout_s in config.toml")


def _shutdown(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError, ValueError):
        pass


_ADAPTER_CLS = None


def _watched_adapter():
    """A requests adapter whose connections hand their socket to the current ``_Watch`` before they
    wait for response headers (the only way to bound a registry that trickles its headers)."""
    global _ADAPTER_CLS
    if _ADAPTER_CLS is None:
        from requests.adapters import HTTPAdapter
        from urllib3 import connection, connectionpool, poolmanager

        class _Hook:
            def getresponse(self, *a, **kw):
                w = getattr(_current, "watch", None)
                if w is not None and getattr(self, "sock", None) is not None:
                    w.attach(self.sock)
                return super().getresponse(*a, **kw)

        class _HTTP(_Hook, connection.HTTPConnection):
            pass

        class _HTTPS(_Hook, connection.HTTPSConnection):
            pass

        class _Pool(connectionpool.HTTPConnectionPool):
            ConnectionCls = _HTTP

        class _SPool(connectionpool.HTTPSConnectionPool):
            ConnectionCls = _HTTPS

        pools = {"http": _Pool, "https": _SPool}

        def _use(pm):
            # only plain and HTTP-proxy managers; a SOCKS manager keeps its own pools (the read
            # loop's own check still bounds its bodies)
            if pm.pool_classes_by_scheme is poolmanager.pool_classes_by_scheme:
                pm.pool_classes_by_scheme = pools
            return pm

        class WatchedAdapter(HTTPAdapter):
            def init_poolmanager(self, *a, **kw):
                super().init_poolmanager(*a, **kw)
                _use(self.poolmanager)

            def proxy_manager_for(self, proxy, **kw):
                return _use(super().proxy_manager_for(proxy, **kw))

        _ADAPTER_CLS = WatchedAdapter
    return _ADAPTER_CLS()


def _is_timeout(e: BaseException) -> bool:
    import requests
    from urllib3.exceptions import TimeoutError as U3Timeout

    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, (requests.Timeout, U3Timeout, TimeoutError, socket.timeout)):
            return True
        e = e.__cause__ or e.__context__ or (e.args[0] if e.args and isinstance(e.args[0], BaseException)
                                             else None)
        seen += 1
    return False


def _content_length(r) -> int | None:
    if r.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
        return None
    v = r.headers.get("Content-Length", "").strip()
    return int(v) if re.fullmatch(r"[0-9]{1,19}", v) else None


class _Body:
    """The streamed body of one response under its watch: every read bounded and counted."""

    def __init__(self, reg: Registry, r, w: _Watch, what: str):
        self.reg, self.r, self.w, self.what = reg, r, w, what
        raw = r.raw
        self._read1 = getattr(raw, "read1", None) or raw.read

    def read(self, n: int) -> bytes:
        try:
            data = self._read1(n, decode_content=True)
        except Exception as e:  # urllib3, http.client and socket errors: the transport broke
            raise self.reg._transport_error(e, self.w, f"connection to registry {self.reg.ref.registry} "
                                                       f"broke while reading {self.what}") from None
        if data:
            self.w.advance(len(data))
            self.w.check()
            return data
        if self.w.fired:
            raise self.w.error()
        return b""

    def read_doc(self, limit: int = MAX_DOC_BYTES) -> bytes:
        """The whole body, refused beyond ``limit`` bytes (announced or sent)."""
        n = _content_length(self.r)
        hint = "no real image metadata is that large; the registry is hostile or broken"
        if n is not None and n > limit:
            raise LimitExceeded(f"{self.what} is {human(n)}; banger reads at most {human(limit)} of a manifest, "
                                "index, image config or token answer", hint)
        buf = bytearray()
        while True:
            chunk = self.read(min(256 << 10, limit + 1 - len(buf)))
            if not chunk:
                return bytes(buf)
            buf += chunk
            if len(buf) > limit:
                raise LimitExceeded(f"{self.what} is larger than {human(limit)}, the most banger reads of a "
                                    "manifest, index, image config or token answer (it stopped reading there)",
                                    hint)

    def read_exact(self, size: int, sink) -> None:
        """Exactly ``size`` bytes into ``sink``; a registry announcing or sending more or less is refused."""
        n = _content_length(self.r)
        if n is not None and n != size:
            raise IntegrityError(f"registry announces {n} bytes for {self.what}, its descriptor says {size}",
                                 _TAMPERED)
        got = 0
        while got < size:
            chunk = self.read(min(1 << 20, size - got))
            if not chunk:
                raise IntegrityError(f"{self.what} ended after {got} bytes; its descriptor says {size}", _TAMPERED)
            sink(chunk)
            got += len(chunk)
        if self.read(1):
            raise IntegrityError(f"registry sent more than the {size} bytes the descriptor of {self.what} says "
                                 "(banger stopped reading there)", _TAMPERED)


class Registry:
    """One registry session. Counts what it downloads (``self.fetched``) for callers that report it.

    ``timeout`` bounds connecting and each socket read; ``stall_timeout`` bounds a transfer that
    makes no progress (see ``_Watch``).
    """

    def __init__(self, ref: Ref, *, insecure: bool | None = None, timeout: float = 60.0,
                 stall_timeout: float = 60.0, progress=None):
        import requests  # lazily: the CLI must start fast

        self.ref = ref
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "banger"
        self.session.headers["Accept-Encoding"] = "identity"  # sizes and digests are of the bytes as sent
        adapter = _watched_adapter()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.insecure = insecure is True
        plain = insecure if insecure is not None else ref.host in LOOPBACK
        self.base = f"{'http' if plain else 'https'}://{ref.registry}/v2/{ref.repository}"
        self.timeout = timeout
        if not (isinstance(stall_timeout, (int, float)) and math.isfinite(stall_timeout) and stall_timeout > 0):
            raise UsageError(f"stall timeout {stall_timeout!r} is not a positive number of seconds",
                             "set pull_stall_timeout_s in config.toml to a number like 60")
        self.stall_timeout = float(stall_timeout)
        self.token: str | None = None
        self.progress = progress
        self.fetched: list[str] = []

    # ---------- HTTP: the stall watch and the token dance ----------
    def _transport_error(self, e: BaseException, w: _Watch, context: str):
        if isinstance(e, (ExternalError, GuestTimeout)):
            return e
        if w.fired:
            return w.error()
        if _is_timeout(e):
            return TransferTimeout(f"{context}: no data for {self.timeout:g} s ({w.what})",
                                   "the registry or the network is too slow; try again later")
        return ExternalError(f"{context}: {e}", "check the registry address and your network (use --insecure "
                                                "for a plain-http registry)")

    def _send(self, url: str, w: _Watch, *, accept: str | None = None, params=None, bearer: bool = True,
              redirects: bool = True):
        import requests

        headers = {"Accept": accept} if accept else {}
        if bearer and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            return self.session.get(url, headers=headers, params=params, stream=True, timeout=self.timeout,
                                    allow_redirects=redirects)
        except requests.RequestException as e:
            raise self._transport_error(e, w, f"cannot reach registry {self.ref.registry}") from None

    @contextmanager
    def _open(self, url: str, what: str, *, accept: str | None = None):
        """GET ``url`` streamed under a stall watch (token dance on a 401); yields its ``_Body``."""
        challenge = None
        with _Watch(self.stall_timeout, what, self.ref.registry) as w:
            r = self._send(url, w, accept=accept)
            try:
                if r.status_code != 401:
                    yield _Body(self, r, w, what)
                    return
                challenge = r.headers.get("WWW-Authenticate", "")
            finally:
                r.close()
        self._authenticate(challenge)
        with _Watch(self.stall_timeout, what, self.ref.registry) as w:
            r = self._send(url, w, accept=accept)
            try:
                yield _Body(self, r, w, what)
            finally:
                r.close()

    def _authenticate(self, challenge: str) -> None:
        from urllib.parse import urljoin

        scheme, params = _parse_challenge(challenge)
        if scheme != "bearer" or "realm" not in params:
            raise ExternalError(f"registry {self.ref.registry} wants {scheme or 'unknown'} authentication",
                                "banger only does anonymous token auth; use a public image")
        realm = params["realm"]
        q = {k: params[k] for k in ("service", "scope") if k in params}
        if "scope" not in q:
            q["scope"] = f"repository:{self.ref.repository}:pull"
        url, query = realm, q
        for _hop in range(6):  # redirects by hand: every hop obeys the realm rule
            check_realm(url, registry=self.ref.registry, insecure=self.insecure,
                        registry_loopback=self.ref.host in LOOPBACK)
            with _Watch(self.stall_timeout, "the token answer", self.ref.registry) as w:
                r = self._send(url, w, params=query, bearer=False, redirects=False)
                try:
                    if r.is_redirect and r.headers.get("Location"):
                        url, query = urljoin(url, r.headers["Location"]), None
                        continue
                    if r.status_code != 200:
                        raise ExternalError(f"token service {_show(realm)} refused anonymous access "
                                            f"(HTTP {r.status_code})",
                                            "the repository may be private or the name misspelled")
                    raw = _Body(self, r, w, f"the token answer of {_show(realm)}").read_doc()
                finally:
                    r.close()
            doc = parse_document(raw, f"the token answer of {_show(realm)}")
            self.token = _check_token(doc.get("token") or doc.get("access_token"), realm)
            return
        raise ExternalError(f"token service {_show(realm)} redirects too often", "the token service is broken")

    def _check(self, r, what: str) -> None:
        if r.status_code == 200:
            return
        if r.status_code == 404:
            raise NotFound(f"{what} not found in {self.ref.registry}/{self.ref.repository} (HTTP 404)",
                           "check the repository name and tag (a missing tag is the usual cause)")
        if r.status_code in (401, 403):
            raise ExternalError(f"registry {self.ref.registry} denied access to {what} (HTTP {r.status_code})",
                                "the repository may be private or the name misspelled")
        raise ExternalError(f"registry {self.ref.registry} answered HTTP {r.status_code} for {what}",
                            "try again later; if it persists the registry is broken")

    # ---------- manifests ----------
    def manifest(self, reference: str) -> tuple[dict, str, str]:
        """Fetch a manifest or index. Returns (document, media type, verified digest)."""
        what = f"manifest {reference}"
        with self._open(f"{self.base}/manifests/{reference}", what, accept=ACCEPT) as body:
            self._check(body.r, what)
            raw = body.read_doc()
            header_type = body.r.headers.get("Content-Type", "").split(";")[0].strip()
            sent = body.r.headers.get("Docker-Content-Digest")
        digest = sha256_digest(raw)
        if reference.startswith("sha256:") and digest != reference:
            raise IntegrityError(f"manifest digest mismatch: asked for {reference}, content hashes to {digest}",
                                 _TAMPERED)
        if sent and sent.startswith("sha256:") and sent != digest:
            raise IntegrityError(f"manifest digest mismatch: registry says {_show(sent)}, content hashes to {digest}",
                                 _TAMPERED)
        doc = parse_document(raw, what)
        return doc, document_type(doc, header_type, what), digest

    def image_manifest(self, platform: tuple[str, str] = ("linux", "amd64")) -> dict:
        """Resolve the reference to one image manifest for ``platform``.

        Returns {"manifest", "digest", "index_digest", "config", "config_digest"}.
        """
        doc, mt, digest = self.manifest(self.ref.reference)
        index_digest = None
        if mt in INDEX_TYPES:
            index_digest = digest
            entries = check_index(doc, f"index {self.ref.reference}")
            pick = None
            for m in entries:
                p = m.get("platform") or {}
                if (p.get("os"), p.get("architecture")) == platform and m.get("mediaType", MT_OCI_MANIFEST) in MANIFEST_TYPES:
                    pick = m
                    break
            if pick is None:
                have = sorted({f"{(m.get('platform') or {}).get('os')}/{(m.get('platform') or {}).get('architecture')}"
                               for m in entries})
                raise NotFound(f"{self.ref} has no {platform[0]}/{platform[1]} image (it has: {', '.join(have) or 'none'})",
                               "pick an image built for linux/amd64")
            check_digest(pick["digest"], "the linux/amd64 entry", f"index {self.ref.reference}")
            doc, mt, digest = self.manifest(pick["digest"])
            if digest != pick["digest"]:
                raise IntegrityError(f"manifest digest mismatch for {pick['digest']}", "nothing was installed")
            if mt not in MANIFEST_TYPES:
                raise ExternalError(f"nested index in {self.ref} is not supported", "use a platform-specific tag")
        what = f"manifest {digest[:19]} of {self.ref}"
        if mt not in MANIFEST_TYPES:
            raise BadManifest(f"{what} is {mt}, not an image manifest", _MALFORMED)
        cfg_desc, _layers = check_manifest(doc, what)
        config = self._config(cfg_desc)
        return {"manifest": doc, "digest": digest, "index_digest": index_digest, "config": config,
                "config_digest": cfg_desc["digest"]}

    def _config(self, desc: dict) -> dict:
        buf = bytearray()
        what = f"config blob {desc['digest'][:19]}"
        with self._open(f"{self.base}/blobs/{desc['digest']}", what) as body:
            self._check(body.r, f"config blob {desc['digest']}")
            body.read_exact(desc["size"], buf.extend)
        got = sha256_digest(bytes(buf))
        if got != desc["digest"]:
            raise IntegrityError(f"config blob digest mismatch: expected {desc['digest']}, got {got}",
                                 "the registry served corrupt data; nothing was installed")
        return check_config(parse_document(bytes(buf), "image config"))

    # ---------- blobs ----------
    def fetch_blob(self, digest: str, cache_dir: Path | str, size: int | None = None) -> Path:
        """Download a blob into the digest cache (verified), unless it is there already.

        ``size`` is the descriptor's: the download stops there, and a registry announcing or sending
        more or less is refused (IntegrityError); the cache filesystem must have room for it.
        """
        if not _DIGEST.match(digest or ""):
            raise IntegrityError(f"invalid blob digest {_show(digest)}", "the image is malformed")
        if size is None:
            raise BadManifest(f"blob {digest} has no size in its descriptor", _MALFORMED)
        size = check_size(size, f"blob {digest[:19]}", "layer descriptor")
        d = Path(cache_dir) / "sha256"
        d.mkdir(parents=True, exist_ok=True)
        dest = d / digest.split(":", 1)[1]
        if dest.exists():
            return dest
        require_free(d, size + FREE_RESERVE, f"blob {digest[:19]} ({human(size)})")
        what = f"blob {digest[:19]}"
        with self._open(f"{self.base}/blobs/{digest}", what) as body:
            self._check(body.r, f"blob {digest}")
            self.fetched.append(digest)
            h = hashlib.sha256()
            from banger.state.staging import owner_tag  # the writer in the name: gc reaps it once we are gone

            fd, tmp = tempfile.mkstemp(prefix=f"{owner_tag()}{uuid.uuid4().hex[:8]}.", suffix=".part", dir=d)
            with publish_by_rename(tmp, dest):  # only verified blobs ever appear under their digest
                try:
                    with os.fdopen(fd, "wb") as f, _task(self.progress, f"blob {digest[7:19]}", size) as task:
                        def sink(chunk: bytes) -> None:
                            h.update(chunk)
                            f.write(chunk)
                            if task:
                                task.advance(len(chunk))

                        body.read_exact(size, sink)
                        f.flush()
                        os.fsync(f.fileno())
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise NoSpace(f"the disk holding {d} filled up while downloading {what} ({human(size)})",
                                      "free space there, or move BANGER_HOME to a bigger filesystem") from None
                    raise
                got = "sha256:" + h.hexdigest()
                if got != digest:
                    raise IntegrityError(f"blob digest mismatch: expected {digest}, got {got}", _TAMPERED)
        return dest


@contextmanager
def _task(progress, label: str, total: int | None):
    if progress is None:
        yield None
        return
    with progress.task(label, total) as t:
        yield t
