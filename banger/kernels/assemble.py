"""The triple a VM boots: vmlinux (extracted from a bzImage, or an ELF as given), the guest modules
and initrd.img (generated: busybox + modules + the boot-contract /init), checked and hashed.

``assemble`` is the one place a kernel is validated (x86_64 ELF executable, PVH note when the
config asks for it, a release banner, modules built for that release, an initramfs that is one),
whatever it came from: a catalog pull, local files or a kernel directory (banger.kernels.sources).
"""

from __future__ import annotations

import hashlib
import shutil
import time
import uuid
from pathlib import Path

from banger.errors import UsageError

MANIFEST_FORMAT = 1


def assemble(ctx, out: Path, stage: Path, fetched: dict, *, source: dict) -> dict:
    """Fill ``out`` with vmlinux (+bzImage), modules/, initrd.img; return the manifest (not yet written)."""
    from banger.guest import initramfs, kernelfmt

    kernel = Path(fetched["kernel"])
    k = kernelfmt.kind(kernel)
    files: dict[str, dict] = {}
    extraction = None
    if k == "bzImage":
        shutil.copyfile(kernel, out / "bzImage")
        with ctx.progress.task("extracting vmlinux from the bzImage", None):
            extraction = kernelfmt.extract_vmlinux(out / "bzImage", out / "vmlinux")
        release = extraction["release"]
    elif k == "elf":
        shutil.copyfile(kernel, out / "vmlinux")
        release = ""
    else:
        raise kernelfmt.NotAKernel(f"{kernel} is not a Linux kernel (neither a bzImage nor an ELF vmlinux)",
                                   "check the source: a bzImage (vmlinuz) or an uncompressed ELF vmlinux")
    config = fetched.get("config")
    pvh_required = bool(config) and kernelfmt.config_has(config, "CONFIG_PVH")
    ctx.progress.step("checking the vmlinux ELF (PVH entry note)")
    checked = kernelfmt.check_vmlinux(out / "vmlinux", require_pvh=pvh_required)
    release = release or checked["release"]
    if not release:
        raise kernelfmt.NotAKernel(f"{kernel}: cannot find the kernel release (no 'Linux version' banner)",
                                   "pass a Linux kernel image")
    if config:
        (out / "config").write_text(config)

    mods: list[dict] = []
    mroot = fetched.get("modules_root")
    if mroot is not None:
        mroot = Path(mroot)
        for cand in (mroot / "lib" / "modules" / release, mroot / "usr" / "lib" / "modules" / release,
                     mroot / release):
            if cand.is_dir():
                mroot = cand
                break
        ctx.progress.step(f"selecting guest modules from {mroot}")
        mods = initramfs.select_modules(mroot)
        for m in mods:
            check_vermagic(m, release)
        if mods:
            initramfs.write_module_tree(mods, out / "modules" / release)

    if fetched.get("initrd") is not None:
        src_initrd = Path(fetched["initrd"])
        check_initrd(src_initrd)
        shutil.copyfile(src_initrd, out / "initrd.img")
        initrd_facts = {"generated": False, "from": fetched.get("initrd_from") or str(src_initrd)}
    else:
        with ctx.progress.task("generating the initramfs (busybox + modules)", None):
            facts = initramfs.build(out / "initrd.img", release=release, modules=mods)
        initrd_facts = {"generated": True, **facts}

    with ctx.progress.task("hashing files", None):
        for f in ("vmlinux", "bzImage", "initrd.img", "config"):
            p = out / f
            if p.is_file():
                files[f] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted((out / "modules").rglob("*")) if (out / "modules").is_dir() else []:
            if p.is_file():
                files[str(p.relative_to(out))] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return {
        "format": MANIFEST_FORMAT,
        "version": release,
        "source": source,
        "files": files,
        "pvh_entry": checked["pvh_entry"],
        "config_pvh": pvh_required if config else None,
        "extraction": extraction and {"compression": extraction["compression"]},
        "modules": [m["name"] for m in mods],
        "initrd": initrd_facts,
        "pull_id": uuid.uuid4().hex,
        "created_at": time.time(),
    }


def check_vermagic(mod: dict, release: str) -> None:
    from banger.guest import initramfs

    vermagic = initramfs.modinfo(mod["data"]).get("vermagic", "")
    if vermagic and vermagic.split(" ", 1)[0] != release:
        raise UsageError(f"module {mod['name']} was built for {vermagic.split(' ', 1)[0]}, the kernel is {release}",
                         "pass the module tree that came with this kernel")


_INITRD_MAGICS = (b"070701", b"070702", b"\x1f\x8b", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd", b"\x02\x21\x4c\x18",
                  b"\x04\x22\x4d\x18", b"BZh", b"\x5d\x00\x00", b"\x89LZO")


def check_initrd(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith(_INITRD_MAGICS):
        raise UsageError(f"{path} is not an initramfs (not a cpio archive, compressed or not)",
                         "pass a cpio initramfs, or omit --initrd and banger generates one")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
