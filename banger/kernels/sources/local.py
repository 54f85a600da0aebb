"""Kernels from this host (`kernel import`): a bzImage or ELF vmlinux with optional initrd and
module tree, or a kernel directory banger produced (another home, another host).

A kernel directory is foreign input (another user, another host may have written it): only the
names a banger kernel directory holds are taken from its manifest (``vmlinux``, ``bzImage``,
``initrd.img``, ``config``, ``modules/<release>/<module>.ko|modules.dep|banger.order``); every
file is opened relative to a directory fd, component by component, never following a symlink,
must be a regular file, and is *copied* (never hard-linked) into the caller's staging dir while
its sha256 and size are checked against the manifest. The copies then go through
banger.kernels.assemble like a pull's files: the same kernel checks, a fresh manifest.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from banger.errors import IntegrityError, NotFound, UsageError

MANIFEST = "manifest.json"
MAX_MANIFEST = 4 << 20
MAX_FILE = 1 << 30
MAX_FILES = 4096
_TOP = ("vmlinux", "bzImage", "initrd.img", "config")
_COMP = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,127}$")  # a release: no leading dot, so never . or ..
_MOD_FILE = re.compile(r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}\.ko|modules\.dep|banger\.order)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ALLOWED = "vmlinux, bzImage, initrd.img, config and modules/<release>/<name>.ko|modules.dep|banger.order"


def is_kernel_dir(path: Path) -> bool:
    return path.is_dir() and os.path.lexists(path / MANIFEST)


def from_files(kernel_path, initrd=None, modules=None) -> dict:
    """Check the user's files; return what banger.kernels.assemble takes (with ``source``)."""
    from banger.guest import kernelfmt

    kp = Path(kernel_path)
    if kp.is_dir():
        raise UsageError(f"{kp} is a directory without a {MANIFEST}",
                         "pass a kernel directory made by banger (it has a manifest.json), or a kernel file")
    if not kp.is_file():
        raise NotFound(f"kernel file {kp} does not exist", "pass the path of a bzImage (vmlinuz) or vmlinux")
    if kernelfmt.kind(kp) == "unknown":
        raise kernelfmt.NotAKernel(f"{kp} is not a Linux kernel (neither a bzImage with a 'HdrS' header nor an ELF file)",
                                   "pass a bzImage (e.g. /boot/vmlinuz-*) or an uncompressed ELF vmlinux")
    if initrd is not None and not Path(initrd).is_file():
        raise NotFound(f"initrd {initrd} does not exist", "pass an existing initramfs file, or omit --initrd")
    if modules is not None and not Path(modules).is_dir():
        raise NotFound(f"module directory {modules} does not exist",
                       "pass a module tree (lib/modules/<release> or a root containing it), or omit --modules")
    return {"kernel": kp, "modules_root": Path(modules) if modules else None,
            "initrd": Path(initrd) if initrd else None, "config": None,
            "source": {"type": "import", "path": str(kp.resolve()),
                       "initrd": str(Path(initrd).resolve()) if initrd else None,
                       "modules": str(Path(modules).resolve()) if modules else None}}


# ---------------------------------------------------------------- kernel directories
def allowed_name(rel) -> bool:
    if not isinstance(rel, str):
        return False
    if rel in _TOP:
        return True
    parts = rel.split("/")
    return (len(parts) == 3 and parts[0] == "modules" and bool(_COMP.match(parts[1]))
            and bool(_MOD_FILE.match(parts[2])))


def _open_at(dirfd: int, rel: str, where: Path) -> tuple[int, os.stat_result]:
    """Open ``rel`` below ``dirfd`` read-only: each component checked without following links."""
    parts = rel.split("/")
    opened: list[int] = []
    cur = dirfd
    try:
        for i, comp in enumerate(parts):
            shown = where / "/".join(parts[: i + 1])
            try:
                st = os.stat(comp, dir_fd=cur, follow_symlinks=False)
            except FileNotFoundError:
                raise IntegrityError(f"{where / rel} is listed in the manifest but missing",
                                     "the kernel directory is incomplete; pull the kernel again") from None
            last = i == len(parts) - 1
            if stat.S_ISLNK(st.st_mode):
                raise UsageError(f"{shown} is a symbolic link; a kernel directory holds only regular files",
                                 "import a directory made by banger kernel pull/import (links are never followed)")
            if last and not stat.S_ISREG(st.st_mode) or not last and not stat.S_ISDIR(st.st_mode):
                raise UsageError(f"{shown} is not a {'regular file' if last else 'directory'}",
                                 "import a directory made by banger kernel pull/import")
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            fd = os.open(comp, flags, dir_fd=cur)
            opened.append(fd)
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise UsageError(f"{shown} changed while banger opened it", "import the directory again")
            cur = fd
        fd = opened.pop()
        return fd, os.fstat(fd)
    finally:
        for fd in opened:
            os.close(fd)


def _read_manifest(dirfd: int, src: Path) -> dict:
    try:
        fd, st = _open_at(dirfd, MANIFEST, src)
    except IntegrityError:
        raise UsageError(f"{src} has no {MANIFEST}", "pass a directory made by banger kernel pull/import") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_MANIFEST + 1)
    bad = UsageError(f"{src}/{MANIFEST} is not a banger kernel manifest",
                     "pass a directory made by banger kernel pull/import, or a kernel file")
    if len(data) > MAX_MANIFEST:
        raise bad
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise bad from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or "vmlinux" not in files or len(files) > MAX_FILES:
        raise bad
    for rel, meta in files.items():
        if not allowed_name(rel):
            raise UsageError(f"{src}/{MANIFEST} lists {rel!r}, which is not a file of a kernel directory",
                             f"a kernel directory holds only {_ALLOWED}")
        size = meta.get("size") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or \
                not _SHA256.match(meta["sha256"]) or \
                not (size is None or isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_FILE):
            raise UsageError(f"{src}/{MANIFEST}: the entry for {rel!r} needs a sha256 (64 hex) and a size",
                             "pass a directory made by banger kernel pull/import")
    return manifest


def _copy_verified(dirfd: int, rel: str, meta: dict, src: Path, dest: Path) -> None:
    fd, st = _open_at(dirfd, rel, src)
    want = meta.get("size")
    try:
        if st.st_size > MAX_FILE or (want is not None and st.st_size != want):
            raise IntegrityError(f"{src / rel} is {st.st_size} bytes, its manifest says {want}",
                                 "the kernel directory was modified or damaged; pull the kernel again")
        dest.parent.mkdir(parents=True, exist_ok=True)
        limit = (MAX_FILE if want is None else want) + 1  # a file growing meanwhile is read no further
        import hashlib

        h, n = hashlib.sha256(), 0
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(out, "wb") as f:
            while n < limit:
                chunk = os.read(fd, min(1 << 20, limit - n))
                if not chunk:
                    break
                h.update(chunk)
                n += len(chunk)
                f.write(chunk)
    finally:
        os.close(fd)
    if (want is not None and n != want) or h.hexdigest() != meta["sha256"]:
        raise IntegrityError(f"{src / rel} does not match its manifest sha256",
                             "the kernel directory was modified or damaged; pull the kernel again")


def _plain(source) -> dict | None:
    """The foreign manifest's ``source``, kept for display only when it is a flat dict of short scalars."""
    if not isinstance(source, dict) or len(source) > 16:
        return None
    ok = all(isinstance(k, str) and len(k) <= 64 and (v is None or isinstance(v, (bool, int, float))
             or isinstance(v, str) and len(v) <= 512) for k, v in source.items())
    return dict(source) if ok else None


def from_dir(ctx, src: Path, stage: Path) -> dict:
    """Copy a kernel directory's allow-listed files into ``stage/in`` (verified); return what
    banger.kernels.assemble takes, plus what ``check_assembled`` compares afterwards."""
    dirfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the user's own path: followed
    try:
        manifest = _read_manifest(dirfd, src)
        files = manifest["files"]
        inp = stage / "in"
        inp.mkdir()
        with ctx.progress.task(f"verifying and copying {src}", len(files)) as t:
            for rel in sorted(files):
                _copy_verified(dirfd, rel, files[rel], src, inp / rel)
                t.advance(1)
    finally:
        os.close(dirfd)
    config = (inp / "config").read_text(errors="replace") if "config" in files else None
    has_modules = any(rel.startswith("modules/") for rel in files)
    return {"kernel": inp / ("bzImage" if "bzImage" in files else "vmlinux"),
            "modules_root": inp / "modules" if has_modules else None,
            "initrd": inp / "initrd.img" if "initrd.img" in files else None,
            "initrd_from": str(src.resolve() / "initrd.img"),
            "config": config,
            "source": {"type": "import", "path": str(src.resolve()), "from": _plain(manifest.get("source"))},
            "manifest_extra": {"imported_from": str(src.resolve())},
            "expect": {"version": manifest.get("version"), "vmlinux": files["vmlinux"]["sha256"]}}


def check_assembled(fetched: dict, manifest: dict) -> None:
    """What the foreign manifest claimed must be what assembling its files produced."""
    expect = fetched.get("expect") or {}
    if expect.get("version") and expect["version"] != manifest["version"]:
        raise IntegrityError(f"the kernel directory's manifest says version {expect['version']!r}, its kernel is "
                             f"{manifest['version']!r}", "the kernel directory was modified; pull the kernel again")
    if expect.get("vmlinux") and manifest["files"]["vmlinux"]["sha256"] != expect["vmlinux"]:
        raise IntegrityError("the kernel directory's vmlinux is not the one its bzImage holds",
                             "the kernel directory was modified; pull the kernel again")
