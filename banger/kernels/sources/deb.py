"""Debian kernel packages (linux-image-*.deb): recognise one and unpack it with dpkg-deb."""

from __future__ import annotations

from pathlib import Path

from banger.errors import UsageError


def is_deb(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(21) == b"!<arch>\ndebian-binary"


def unpack(ctx, deb: Path, stage: Path) -> dict:
    """``dpkg-deb -x`` into ``stage/deb``; return the kernel, its module tree and its config."""
    from banger.host.runner import require, run

    root = stage / "deb"
    root.mkdir()
    with ctx.progress.task(f"extracting {deb.name}", None):
        run([require("dpkg-deb", "dpkg"), "-x", str(deb), str(root)], timeout=600, contain=True)
    kernels = sorted((root / "boot").glob("vmlinuz-*")) if (root / "boot").is_dir() else []
    if not kernels:
        raise UsageError(f"{deb.name} contains no /boot/vmlinuz-*: it is not a kernel image package",
                         "point the catalog at a linux-image-* package")
    kernel = kernels[-1]
    rel = kernel.name[len("vmlinuz-"):]
    config = root / "boot" / f"config-{rel}"
    mods = None
    for base in (root / "lib" / "modules" / rel, root / "usr" / "lib" / "modules" / rel):
        if base.is_dir():
            mods = base
    return {"kernel": kernel, "modules_root": mods, "initrd": None,
            "config": config.read_text(errors="replace") if config.is_file() else None}
