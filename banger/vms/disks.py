"""A VM's two private disks: the work disk (/root, cloned from the image's work seed) and the
copy-on-write overlay disk (upper/ + work/, carrying the VM's own SSH host key and hostname)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from banger.vms.runtime import HOST_KEY, KNOWN_HOSTS, OVERLAY, vm_dir


def make_work_disk(ctx, path: Path, image, size_mib: int, use_seed: bool) -> str:
    """Clone the image's work seed (reflink or sparse copy) and grow it; or mkfs a fresh /root holding
    only banger's authorized key. Returns how ("reflink", "sparse", "mkfs")."""
    from banger.host import ext4
    from banger.host.fsutil import reflink_or_sparse_copy

    seed = image.get("work_seed")
    if use_seed and seed and Path(seed).exists():
        how = reflink_or_sparse_copy(seed, path)
        ext4.grow(path, size_mib)
        return how
    from banger.guest.sshkeys import client_key

    src = path.parent / ".work-src"
    shutil.rmtree(src, ignore_errors=True)
    try:
        (src / ".ssh").mkdir(parents=True)
        os.chmod(src, 0o700)
        os.chmod(src / ".ssh", 0o700)
        ak = src / ".ssh" / "authorized_keys"
        ak.write_text(client_key(ctx.cfg).public_line + " banger\n")
        os.chmod(ak, 0o600)
        ext4.mkfs(path, size_mib, src_dir=src, label="banger-work")
    finally:
        shutil.rmtree(src, ignore_errors=True)
    return "mkfs"


def make_overlay_files(path: Path, size_mib: int, *, hostname: str) -> str:
    """An overlay disk at ``path``: upper/ (a fresh SSH host key, /etc/hostname) + work/.
    Returns the host key's public line (to pin)."""
    from banger.guest.sshkeys import new_host_key
    from banger.host import ext4

    src = path.parent / f".overlay-src-{path.name}"
    shutil.rmtree(src, ignore_errors=True)
    try:
        priv, pub = new_host_key()
        (src / "upper" / "etc" / "ssh").mkdir(parents=True)
        (src / "work").mkdir()
        for p in (src / "upper", src / "upper" / "etc", src / "upper" / "etc" / "ssh"):
            os.chmod(p, 0o755)
        key = src / "upper" / HOST_KEY
        key.write_bytes(priv)
        os.chmod(key, 0o600)
        (src / "upper" / (HOST_KEY + ".pub")).write_text(pub + "\n")
        (src / "upper" / "etc" / "hostname").write_text(hostname + "\n")
        for p in (src / "upper" / (HOST_KEY + ".pub"), src / "upper" / "etc" / "hostname"):
            os.chmod(p, 0o644)  # guest-visible modes: conventional, whatever banger's own umask (077)
        import secrets

        (src / "upper" / "etc" / "machine-id").write_text(secrets.token_hex(16) + "\n")  # its own, like its key
        os.chmod(src / "upper" / "etc" / "machine-id", 0o444)
        ext4.mkfs(path, size_mib, src_dir=src, label="banger-overlay")
    finally:
        shutil.rmtree(src, ignore_errors=True)
    return pub


def make_overlay_disk(ctx, vm, size_mib: int) -> None:
    """The VM's copy-on-write disk; its host key's public half is pinned in the VM's known_hosts
    before the first boot."""
    d = vm_dir(ctx, vm)
    pub = make_overlay_files(d / OVERLAY, size_mib, hostname=vm["name"])
    (d / KNOWN_HOSTS).write_text(f"{vm['ip']} {pub}\n")
