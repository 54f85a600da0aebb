"""Image fixtures and ext4 inspection helpers (debugfs, read-only, no mount).

``default_image`` (session scope) builds the default image (debootstrap) ONCE into a
cache dir reused across tests and test runs (``BANGER_TEST_CACHE``, default
/var/tmp/banger-test-cache); the cache key hashes the guest files and the package
list, so a change to banger-init rebuilds it.  ``install_image(cfg, src, name)`` then
publishes a copy into a test's own isolated BANGER_HOME (the work seed gets that
home's client key on the first resolve()).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BANGER_TEST_CACHE", "/var/tmp/banger-test-cache"))


# ---------------------------------------------------------------- ext4 inspection
def debugfs(img: Path | str, request: str) -> str:
    cp = subprocess.run(["debugfs", "-R", request, str(img)], capture_output=True, text=True, timeout=60)
    return cp.stdout


def ext4_stat(img, path: str) -> dict | None:
    """{"type", "mode", "uid", "gid", "size", "links"} of ``path`` (not following it) or None."""
    out = debugfs(img, f"stat {path}")
    if "Inode:" not in out:
        return None
    m = re.search(r"Type:\s+(\w+)\s+Mode:\s+(\d+)", out)
    u = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out)
    s = re.search(r"Size:\s+(\d+)", out)
    ln = re.search(r"Links:\s+(\d+)", out)
    return {"type": m.group(1), "mode": int(m.group(2), 8), "uid": int(u.group(1)), "gid": int(u.group(2)),
            "size": int(s.group(1)), "links": int(ln.group(1)) if ln else None}


def ext4_ls(img, path: str) -> list[str]:
    out = debugfs(img, f"ls -p {path}")
    names = []
    for line in out.splitlines():
        parts = line.strip().strip("/").split("/")
        if len(parts) >= 5 and parts[4] not in (".", ".."):
            names.append(parts[4])
    return sorted(names)


def ext4_cat(img, path: str) -> bytes:
    cp = subprocess.run(["debugfs", "-R", f"cat {path}", str(img)], capture_output=True, timeout=60)
    return cp.stdout


def fsck_clean(img) -> tuple[bool, str]:
    cp = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True, timeout=300)
    return cp.returncode == 0, cp.stdout + cp.stderr


# ---------------------------------------------------------------- state assertions
def assert_nothing_left(cfg, name: str) -> None:
    """No staging dir, no image dir, no row, no partial blob for a failed build/pull of ``name``."""
    import sqlite3

    staging = list(cfg.staging_dir.iterdir()) if cfg.staging_dir.exists() else []
    assert staging == [], f"staging not cleaned: {staging}"
    assert not (cfg.images_dir / name).exists(), "image dir left behind"
    if cfg.db_path.exists():
        with sqlite3.connect(cfg.db_path) as c:
            assert c.execute("SELECT count(*) FROM images WHERE name = ?", (name,)).fetchone()[0] == 0
    blobs = cfg.cache_dir / "blobs" / "sha256"
    if blobs.exists():
        assert [p.name for p in blobs.iterdir() if p.name.startswith(".")] == [], "partial blob left"


# ---------------------------------------------------------------- the default image, built once
def _cache_key() -> str:
    from banger.images.service import DEFAULT_PACKAGES

    h = hashlib.sha256()
    for p in sorted((ROOT / "banger/data/guest").iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    h.update(json.dumps(DEFAULT_PACKAGES).encode())
    h.update((ROOT / "banger/images/service.py").read_bytes())
    return h.hexdigest()[:12]


def build_default_image_cached() -> Path:
    """The directory of a built default image (rootfs.ext4, work-seed.ext4, meta.json, build.json)."""
    from filelock import FileLock

    CACHE.mkdir(parents=True, exist_ok=True)
    key = _cache_key()
    out = CACHE / f"debian-bookworm-{key}"
    with FileLock(str(CACHE / ".build.lock")):
        if (out / "build.json").is_file():
            return out
        home = Path(tempfile.mkdtemp(prefix="home-", dir=CACHE))
        try:
            env = {**os.environ, "BANGER_HOME": str(home), "BANGER_RUN": str(home / "run")}
            # debootstrap's own package cache survives across keys
            (home / "cache").mkdir()
            shared = CACHE / "debootstrap-cache"
            shared.mkdir(exist_ok=True)
            os.symlink(shared, home / "cache" / "debootstrap")
            t0 = time.monotonic()
            cp = subprocess.run([sys.executable, "-m", "banger.cli.main", "image", "build", "debian-bookworm", "--json"],
                                env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
            took = time.monotonic() - t0
            doc = json.loads(cp.stdout or "{}")
            if not doc.get("ok"):
                raise RuntimeError(f"default image build failed: {cp.stdout}\n{cp.stderr[-3000:]}")
            tmp = CACHE / f".{out.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.rename(home / "images" / "debian-bookworm", tmp)
            (tmp / "build.json").write_text(json.dumps({"build_wall_s": round(took, 1), "row": doc["data"]},
                                                       indent=2, default=str))
            os.rename(tmp, out)
        finally:
            shutil.rmtree(home, ignore_errors=True)
    return out


def install_image(cfg, src_dir: Path, name: str = "debian-bookworm", kind: str = "debootstrap") -> dict:
    """Publish a copy of a cached image dir into ``cfg``'s home (its seed is re-keyed on resolve)."""
    from banger.context import Ctx
    from banger.host import fsutil
    from banger.images import service as images

    ctx = Ctx(cfg)
    try:
        cfg.staging_dir.mkdir(parents=True, exist_ok=True)
        st = Path(tempfile.mkdtemp(prefix="image-install-", dir=cfg.staging_dir))
        for f in ("rootfs.ext4", "work-seed.ext4"):
            fsutil.reflink_or_sparse_copy(src_dir / f, st / f)
        meta = json.loads((src_dir / "meta.json").read_text())
        keep = {k: v for k, v in meta.items() if k not in ("name", "kind", "source", "digest", "kernel")}
        keep["key_fingerprint"] = "SHA256:stale-from-cache"  # forces a re-key on first resolve()
        return images.publish(ctx, name, st, kind=kind, source=meta.get("source"), digest=meta.get("digest"),
                              kernel=meta.get("kernel"), init=meta.get("init"), meta=keep)
    finally:
        ctx.close()


@pytest.fixture(scope="session")
def default_image() -> Path:
    """Path of the cached default image dir (built once per cache key, reused across runs)."""
    return build_default_image_cached()
