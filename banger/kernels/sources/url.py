"""Kernel source ``url``: a bzImage, an ELF vmlinux or a linux-image .deb at a URL, verified by sha256
(pinned in the catalog, or given with --sha256)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from banger.errors import ExternalError, IntegrityError, UsageError
from banger.kernels.sources import deb, log_download

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def expected_digest(name: str, src: dict, sha256: str | None) -> str:
    pinned = (src.get("sha256") or "").lower() or None
    given = sha256.lower() if sha256 else None
    if given and not _SHA256.match(given):
        raise UsageError(f"--sha256 {sha256!r} is not a sha256 hex digest", "pass 64 hex characters")
    if pinned and given and pinned != given:
        raise UsageError(f"--sha256 {given} differs from the catalog's pinned digest {pinned} for {name}",
                         "drop --sha256 to use the catalog's digest")
    if not (pinned or given):
        raise UsageError(f"catalog kernel {name!r} has no pinned sha256, so banger cannot verify the download",
                         f"check the digest from a trusted source and run: banger kernel pull {name} --sha256 HEX")
    return pinned or given


def fetch(ctx, name: str, src: dict, stage: Path, digest: str) -> dict:
    """Stream the URL into the staging dir, verifying its sha256; the file is gone on any failure."""
    import urllib.error
    import urllib.request

    from banger import __version__

    url, sha256 = src["url"], digest
    dest = stage / "download"
    h = hashlib.sha256()
    n = 0
    req = urllib.request.Request(url, headers={"User-Agent": f"banger/{__version__}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r, open(dest, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with ctx.progress.task(f"downloading kernel {name}", total) as t:
                while True:
                    chunk = r.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
                    t.advance(len(chunk))
            if total is not None and n != total:
                raise ExternalError(f"download of {url} ended after {n} of {total} bytes",
                                    "the connection dropped; try again")
    except urllib.error.HTTPError as e:
        dest.unlink(missing_ok=True)
        raise ExternalError(f"download of {url} failed: HTTP {e.code} {e.reason}",
                            "check the URL in the kernel catalog and that the host can reach it") from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        dest.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise ExternalError(f"download of {url} failed: {reason}",
                            "check the host's network / proxy settings and the URL") from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    got = h.hexdigest()
    if got != sha256:
        dest.unlink(missing_ok=True)
        raise IntegrityError(f"sha256 mismatch for {url}: got {got}, expected {sha256}",
                             "the file changed upstream or was corrupted in transit; nothing was kept. "
                             "Verify the digest before trusting a new one",
                             details={"got": got, "expected": sha256})
    log_download(ctx, {"name": name, "type": "url", "url": url, "bytes": n, "sha256": got})
    source = {"type": "url", "url": url, "sha256": got}
    if deb.is_deb(dest):
        return {**deb.unpack(ctx, dest, stage), "source": source}
    return {"kernel": dest, "modules_root": None, "initrd": None, "config": None, "source": source}
