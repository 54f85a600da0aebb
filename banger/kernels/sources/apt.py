"""Kernel source ``apt``: a Debian linux-image package through the host's own apt (apt verifies the
archive; banger checks the .deb against the index's SHA256), unpacked with dpkg-deb."""

from __future__ import annotations

import os
import re
import shutil
import stat
import threading
from pathlib import Path

from banger.errors import ExternalError, HostError, IntegrityError, UsageError
from banger.kernels.assemble import sha256_file
from banger.kernels.sources import deb, log_download

_REAL_IMAGE = re.compile(r"^linux-image-\d[\w.+-]*$")
_PKG = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+~:-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DEB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~%-]*\.deb$")
APT_USER = "_apt"


def expected_digest(name: str, src: dict, sha256: str | None) -> None:
    if sha256:
        raise UsageError(f"--sha256 applies to URL kernels only; {name!r} comes from apt (apt verifies it)",
                         f"run: banger kernel pull {name}")
    return None


def _apt_show(pkg: str) -> dict:
    from banger.host.runner import require, run

    apt_cache = require("apt-cache", "apt")
    cp = run([apt_cache, "show", "--no-all-versions", pkg], check=False, timeout=120)
    if cp.returncode != 0 or not cp.stdout.strip():
        raise HostError(f"apt does not know the package {pkg}",
                        "run apt-get update; banger needs a Debian (bookworm) main archive in the host's apt sources",
                        details={"stderr": (cp.stderr or "")[-500:]})
    fields: dict[str, str] = {}
    key = None
    for line in cp.stdout.splitlines():
        if not line.strip():
            break  # first stanza only
        if line[0] in " \t" and key:
            fields[key] += "\n" + line.strip()
            continue
        key, _, val = line.partition(":")
        fields[key] = val.strip()
    return fields




def _apt_resolve(pkg: str) -> dict:
    """Follow a meta-package (linux-image-cloud-amd64) to the real image package; return its apt fields."""
    seen = []
    for _ in range(4):
        fields = _apt_show(pkg)
        seen.append(pkg)
        if _REAL_IMAGE.match(pkg):
            return fields
        deps = [alt.strip().split(" ", 1)[0] for d in fields.get("Depends", "").split(",") for alt in d.split("|")]
        nxt = next((d for d in deps if _REAL_IMAGE.match(d)), None) or next(
            (d for d in deps if d.startswith("linux-image-")), None)
        if nxt is None:
            raise HostError(f"apt package {pkg} does not depend on a linux-image package",
                            "the catalog entry names the wrong package; use linux-image-cloud-amd64")
        pkg = nxt
    raise HostError(f"apt meta-package chain too deep: {' -> '.join(seen)}", "fix the catalog entry")


def fetch(ctx, name: str, src: dict, stage: Path, digest: None = None) -> dict:
    """apt-get download the real image package (host's own apt), verify, unpack with dpkg-deb.

    The package must carry a SHA256 in the apt index (refused otherwise, before any download).
    apt-get downloads as its unprivileged user ``_apt`` into ``stage/apt``, a directory only
    ``_apt`` and root can write; banger then copies the .deb into its own root-owned file while
    hashing it (never trusting, renaming or following what ``_apt`` left there)."""
    from banger.host.runner import require, run

    meta = src["package"]
    ctx.progress.step(f"resolving {meta} with apt-cache")
    fields = _apt_resolve(meta)
    pkg, version = fields.get("Package", ""), fields.get("Version", "")
    if not _PKG.match(pkg) or not _VERSION.match(version):
        raise ExternalError(f"apt-cache answered an unusable package/version {pkg!r} {version!r} for {meta}",
                            "run apt-get update; check the host's apt sources")
    sha = (fields.get("SHA256") or "").strip().lower()
    if not _SHA256.match(sha):
        raise IntegrityError(f"the apt index has no SHA256 for {pkg} {version}, so banger cannot verify the .deb",
                             "run apt-get update (a current Debian index lists SHA256 for every package); banger "
                             "does not use a kernel package it cannot verify",
                             details={"package": pkg, "version": version, "sha256": fields.get("SHA256")})
    size = int(fields.get("Size") or 0) if (fields.get("Size") or "").isdigit() else None
    fname = os.path.basename(fields.get("Filename") or "")
    if not _DEB_NAME.match(fname):
        fname = f"{pkg}_{version.replace(':', '%3a')}_amd64.deb"
    cache = ctx.cfg.cache_dir / "debs" / fname
    debf = stage / fname
    downloaded = False
    if cache.is_file() and sha256_file(cache) == sha:
        ctx.progress.step(f"using cached {fname}")
        if same_fs(cache.parent, stage):
            os.link(cache, debf)
        else:
            shutil.copyfile(cache, debf)
    else:
        apt_get = require("apt-get", "apt")
        dl = download_dir(stage)
        result: dict = {}

        def go():
            try:
                result["cp"] = run([apt_get, "download", "-q", f"{pkg}={version}"], cwd=str(dl), timeout=1800,
                                   hint="check the host's apt sources and network (apt-get update)")
            except BaseException as e:  # surfaced in the caller's thread
                result["error"] = e

        th = threading.Thread(target=go, daemon=True)
        with ctx.progress.task(f"downloading {pkg} {version} via apt", size) as t:
            th.start()
            done = 0
            while th.is_alive():
                th.join(0.2)
                now = sum(f.lstat().st_size for f in dl.iterdir()) if dl.exists() else 0
                if now > done:
                    t.advance(now - done)
                    done = now
        if "error" in result:
            raise result["error"]
        names = [fname] if os.path.lexists(dl / fname) else [n for n in os.listdir(dl) if n.endswith(".deb")]
        if len(names) != 1:
            raise ExternalError(f"apt-get download {pkg}={version} produced no .deb",
                                "run it by hand to see why (apt sources, disk space)")
        _copy_regular(dl / names[0], debf)
        downloaded = True
    got_sha = sha256_file(debf)
    if got_sha != sha:
        raise IntegrityError(f"sha256 mismatch for {fname}: got {got_sha}, apt says {sha}",
                             "run apt-get update and try again")
    if downloaded:
        log_download(ctx, {"name": name, "type": "apt", "package": pkg, "version": version,
                           "bytes": debf.stat().st_size, "sha256": got_sha})
        try:  # keep it for the next pull (any BANGER_HOME on this state dir)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{fname}.{os.getpid()}.tmp")
            shutil.copyfile(debf, tmp)
            os.replace(tmp, cache)
        except OSError:
            pass
    unpacked = deb.unpack(ctx, debf, stage)
    unpacked["source"] = {"type": "apt", "package": meta, "resolved": pkg, "version": version,
                          "sha256": got_sha, "downloaded": downloaded}
    return unpacked


def download_dir(stage: Path) -> Path:
    """``stage/apt``: writable by apt's download user ``_apt`` (when it exists) and root, nobody else.

    ``stage`` becomes 0711 so ``_apt`` can reach the directory without listing the stage."""
    import pwd

    dl = stage / "apt"
    dl.mkdir(mode=0o700)
    try:
        apt_uid = pwd.getpwnam(APT_USER).pw_uid
    except KeyError:
        apt_uid = None  # no sandbox user: apt downloads as root into a root-only directory
    if apt_uid is not None:
        os.chown(dl, apt_uid, 0)
        os.chmod(stage, 0o711)
    os.chmod(dl, 0o700)
    return dl


def _copy_regular(src: Path, dest: Path) -> None:
    """Copy what apt left in its directory into a root-owned file: a regular file only, no link followed."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ExternalError(f"cannot read the downloaded {src.name}: {e}", "run the pull again") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ExternalError(f"the downloaded {src.name} is not a regular file", "run the pull again")
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(out, "wb") as f:
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                f.write(chunk)
    finally:
        os.close(fd)


def same_fs(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False
