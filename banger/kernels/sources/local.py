"""Kernels from this host (`kernel import`): a bzImage or ELF vmlinux with optional initrd and
module tree, or a kernel directory banger produced (another home, another host)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from banger.errors import IntegrityError, NotFound, UsageError
from banger.host import fsutil
from banger.kernels.assemble import sha256_file

MANIFEST = "manifest.json"


def is_kernel_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def from_files(kernel_path, initrd=None, modules=None) -> dict:
    """Check the user's files; return what banger.kernels.assemble takes (with ``source``)."""
    from banger.guest import kernelfmt

    kp = Path(kernel_path)
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


def read_manifest(src: Path) -> dict:
    manifest = fsutil.read_json(src / MANIFEST)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "vmlinux" not in manifest["files"]:
        raise UsageError(f"{src}/{MANIFEST} is not a banger kernel manifest",
                         "pass a directory made by banger kernel pull/import, or a kernel file")
    return manifest


def copy_dir(ctx, src: Path, manifest: dict, out: Path, stage: Path) -> dict:
    """Copy a kernel directory's files into ``out``, each verified against its manifest sha256.

    Files are hard-linked (copied across filesystems). Returns the manifest to publish."""
    link = _same_fs(src, stage)
    with ctx.progress.task(f"verifying and copying {src}", len(manifest["files"])) as t:
        for rel, meta in sorted(manifest["files"].items()):
            s_, d_ = src / rel, out / rel
            if not s_.is_file():
                raise IntegrityError(f"{s_} is listed in the manifest but missing",
                                     "the kernel directory is incomplete; pull the kernel again")
            d_.parent.mkdir(parents=True, exist_ok=True)
            if link:
                os.link(s_, d_)
            else:
                shutil.copyfile(s_, d_)
            if sha256_file(d_) != meta.get("sha256"):
                raise IntegrityError(f"{s_} does not match its manifest sha256",
                                     "the kernel directory was modified or damaged; pull the kernel again")
            t.advance(1)
    return {**manifest, "imported_from": str(src.resolve())}


def _same_fs(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False
