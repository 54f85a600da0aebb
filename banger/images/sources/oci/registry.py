"""A small OCI distribution (registry API v2) client: manifests, indexes, blobs.

* anonymous Bearer token auth: a 401 with ``WWW-Authenticate: Bearer realm=..,service=..,scope=..``
  -> GET the realm -> retry with ``Authorization: Bearer <token>``;
* every manifest and blob is verified against its sha256 digest;
* blobs are cached by digest (``<cache>/sha256/<hex>``); a file there has been verified
  (it is only renamed into place after its digest matched);
* plain http for loopback registries (127.0.0.1, localhost, ::1) or when ``insecure``.

``requests`` is imported lazily. HTTP failures become banger errors at this edge.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from banger.errors import ExternalError, IntegrityError, NotFound, UsageError
from banger.host.fsutil import publish_by_rename

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

DOCKER_HUB = "registry-1.docker.io"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
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
        return self.registry.rsplit(":", 1)[0] if not self.registry.startswith("[") else self.registry

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


class Registry:
    """One registry session. Counts what it downloads (``self.fetched``) for callers that report it."""

    def __init__(self, ref: Ref, *, insecure: bool | None = None, timeout: float = 60.0, progress=None):
        import requests  # lazily: the CLI must start fast

        self.ref = ref
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "banger"
        plain = insecure if insecure is not None else ref.host in LOOPBACK
        self.base = f"{'http' if plain else 'https'}://{ref.registry}/v2/{ref.repository}"
        self.timeout = timeout
        self.token: str | None = None
        self.progress = progress
        self.fetched: list[str] = []

    # ---------- HTTP with the token dance ----------
    def _get(self, url: str, *, accept: str | None = None, stream: bool = False):
        import requests

        headers = {"Accept": accept} if accept else {}
        for attempt in range(2):
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            try:
                r = self.session.get(url, headers=headers, stream=stream, timeout=self.timeout)
            except requests.RequestException as e:
                raise ExternalError(f"cannot reach registry {self.ref.registry}: {e}",
                                    "check the registry address and your network (use --insecure for a "
                                    "plain-http registry)") from e
            if r.status_code == 401 and attempt == 0:
                self._authenticate(r)
                r.close()
                continue
            return r
        return r

    def _authenticate(self, resp) -> None:
        import requests

        scheme, params = _parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        if scheme != "bearer" or "realm" not in params:
            raise ExternalError(f"registry {self.ref.registry} wants {scheme or 'unknown'} authentication",
                                "banger only does anonymous token auth; use a public image")
        q = {k: params[k] for k in ("service", "scope") if k in params}
        if "scope" not in q:
            q["scope"] = f"repository:{self.ref.repository}:pull"
        try:
            r = self.session.get(params["realm"], params=q, timeout=self.timeout)
        except requests.RequestException as e:
            raise ExternalError(f"cannot reach the token service {params['realm']}: {e}",
                                "check your network") from e
        if r.status_code != 200:
            raise ExternalError(f"token service {params['realm']} refused anonymous access (HTTP {r.status_code})",
                                "the repository may be private or the name misspelled")
        try:
            doc = r.json()
            self.token = doc.get("token") or doc["access_token"]
        except (ValueError, KeyError):
            raise ExternalError(f"token service {params['realm']} sent no token", "try again later") from None

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
        r = self._get(f"{self.base}/manifests/{reference}", accept=ACCEPT)
        self._check(r, f"manifest {reference}")
        body = r.content
        digest = sha256_digest(body)
        if reference.startswith("sha256:") and digest != reference:
            raise IntegrityError(f"manifest digest mismatch: asked for {reference}, content hashes to {digest}",
                                 "the registry served corrupt or tampered data; nothing was installed")
        sent = r.headers.get("Docker-Content-Digest")
        if sent and sent.startswith("sha256:") and sent != digest:
            raise IntegrityError(f"manifest digest mismatch: registry says {sent}, content hashes to {digest}",
                                 "the registry served corrupt or tampered data; nothing was installed")
        try:
            doc = json.loads(body)
        except ValueError:
            raise ExternalError(f"manifest {reference} is not JSON", "the registry is broken") from None
        mt = doc.get("mediaType") or r.headers.get("Content-Type", "").split(";")[0]
        if mt not in INDEX_TYPES + MANIFEST_TYPES:
            if "manifests" in doc:
                mt = MT_OCI_INDEX
            elif "layers" in doc:
                mt = MT_OCI_MANIFEST
            else:
                raise ExternalError(f"unsupported manifest type {mt!r}", "banger pulls OCI and Docker v2 images")
        return doc, mt, digest

    def image_manifest(self, platform: tuple[str, str] = ("linux", "amd64")) -> dict:
        """Resolve the reference to one image manifest for ``platform``.

        Returns {"manifest", "digest", "index_digest", "config", "config_digest"}.
        """
        doc, mt, digest = self.manifest(self.ref.reference)
        index_digest = None
        if mt in INDEX_TYPES:
            index_digest = digest
            pick = None
            for m in doc.get("manifests", []):
                p = m.get("platform") or {}
                if (p.get("os"), p.get("architecture")) == platform and m.get("mediaType", MT_OCI_MANIFEST) in MANIFEST_TYPES:
                    pick = m
                    break
            if pick is None:
                have = sorted({f"{(m.get('platform') or {}).get('os')}/{(m.get('platform') or {}).get('architecture')}"
                               for m in doc.get("manifests", [])})
                raise NotFound(f"{self.ref} has no {platform[0]}/{platform[1]} image (it has: {', '.join(have) or 'none'})",
                               "pick an image built for linux/amd64")
            doc, mt, digest = self.manifest(pick["digest"])
            if digest != pick["digest"]:
                raise IntegrityError(f"manifest digest mismatch for {pick['digest']}", "nothing was installed")
            if mt not in MANIFEST_TYPES:
                raise ExternalError(f"nested index in {self.ref} is not supported", "use a platform-specific tag")
        cfg_desc = doc.get("config") or {}
        if not _DIGEST.match(cfg_desc.get("digest", "")):
            raise ExternalError(f"manifest of {self.ref} has no valid config descriptor", "the image is malformed")
        r = self._get(f"{self.base}/blobs/{cfg_desc['digest']}")
        self._check(r, f"config blob {cfg_desc['digest']}")
        if sha256_digest(r.content) != cfg_desc["digest"]:
            raise IntegrityError(f"config blob digest mismatch: expected {cfg_desc['digest']}, "
                                 f"got {sha256_digest(r.content)}", "the registry served corrupt data; nothing was installed")
        try:
            config = json.loads(r.content)
        except ValueError:
            raise ExternalError("image config is not JSON", "the image is malformed") from None
        for layer in doc.get("layers", []):
            if layer.get("mediaType") not in LAYER_TYPES:
                raise ExternalError(f"unsupported layer type {layer.get('mediaType')!r}",
                                    "banger handles tar, tar+gzip and tar+zstd layers")
            if not _DIGEST.match(layer.get("digest", "")):
                raise ExternalError(f"layer has an invalid digest {layer.get('digest')!r}", "the image is malformed")
        return {"manifest": doc, "digest": digest, "index_digest": index_digest, "config": config,
                "config_digest": cfg_desc["digest"]}

    # ---------- blobs ----------
    def fetch_blob(self, digest: str, cache_dir: Path | str, size: int | None = None) -> Path:
        """Download a blob into the digest cache (verified), unless it is there already."""
        if not _DIGEST.match(digest):
            raise IntegrityError(f"invalid blob digest {digest!r}", "the image is malformed")
        d = Path(cache_dir) / "sha256"
        d.mkdir(parents=True, exist_ok=True)
        dest = d / digest.split(":", 1)[1]
        if dest.exists():
            return dest
        r = self._get(f"{self.base}/blobs/{digest}", stream=True)
        self._check(r, f"blob {digest}")
        self.fetched.append(digest)
        h = hashlib.sha256()
        from banger.state.staging import owner_tag  # the writer in the name: gc reaps it once we are gone

        fd, tmp = tempfile.mkstemp(prefix=f"{owner_tag()}{uuid.uuid4().hex[:8]}.", suffix=".part", dir=d)
        try:
            with publish_by_rename(tmp, dest):  # only verified blobs ever appear under their digest
                total = size or int(r.headers.get("Content-Length") or 0) or None
                ctx = self.progress.task(f"blob {digest[7:19]}", total) if self.progress else None
                task = ctx.__enter__() if ctx else None
                try:
                    with os.fdopen(fd, "wb") as f:
                        for chunk in r.iter_content(1 << 20):
                            h.update(chunk)
                            f.write(chunk)
                            if task:
                                task.advance(len(chunk))
                        f.flush()
                        os.fsync(f.fileno())
                finally:
                    if ctx:
                        ctx.__exit__(None, None, None)
                got = "sha256:" + h.hexdigest()
                if got != digest:
                    raise IntegrityError(f"blob digest mismatch: expected {digest}, got {got}",
                                         "the registry served corrupt or tampered data; nothing was installed")
        finally:
            r.close()
        return dest
