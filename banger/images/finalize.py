"""What every image source does to a root tree before publishing: guest setup, work seed, pack.

A source (debootstrap, OCI, ...) produces a flattened root tree in its staging dir;
``finalize_tree`` installs banger-init, its config and the sshd snippet and drops baked host
keys; ``pack`` turns the tree into ``rootfs.ext4`` (e2fsck-clean) plus ``work-seed.ext4`` (the
image's /root with banger's client key). ``make_work_seed`` / ``reseed`` build seeds on their
own (publish of a staged rootfs without a seed; a new client key).

This module knows the files of an image dir; it knows nothing of rows, names or locks.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from banger.host import ext4
from banger.host.runner import require, run

INIT_PATH = "/sbin/banger-init"
SEED_NAME = "work-seed.ext4"
ROOTFS_NAME = "rootfs.ext4"
SEED_MIN_MIB = 64
_SSHD_INCLUDE = "Include /etc/ssh/sshd_config.d/*.conf"


def guest_file(name: str) -> bytes:
    from importlib import resources

    return resources.files("banger.data").joinpath("guest", name).read_bytes()


def rmtree(p: Path | None) -> None:
    import shutil

    from banger.interrupts import shielded

    if p is not None and os.path.lexists(p):
        with shielded():  # a second Ctrl-C / SIGTERM must not cut the clean-up short
            shutil.rmtree(p, ignore_errors=True)


def tree_usage(tree: Path) -> tuple[int, int]:
    """(bytes allocated, inode count) of a tree, never following links; hard links counted once."""
    total, inodes, seen = 0, 0, set()
    for dirpath, dirnames, filenames in os.walk(tree):
        for n in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            total += max(st.st_blocks * 512, 4096)
    return total, inodes


def fs_size_mib(used: int, inodes: int, minimum: int = 64) -> int:
    # data + 25% + room for metadata/journal; enough inodes at mkfs's default ratio (16 KiB/inode)
    by_data = used * 1.25 / ext4.MiB + 96
    by_inodes = inodes * 1.5 * 16384 / ext4.MiB
    size = max(minimum, by_data, by_inodes)
    return int(math.ceil(size / 64.0) * 64)


# ---------------------------------------------------------------- guest setup of a flattened tree
def finalize_tree(tree: Path, *, sshd_args: str = "-D -e") -> dict:
    """Install banger-init + its config + the sshd snippet; drop baked host keys. Returns meta facts.

    Every write goes through banger.images.sources.oci.layers' in-scope resolution, so a hostile image
    (e.g. /etc a symlink to the host's /etc) cannot make us write outside the tree.
    """
    from banger.images.sources.oci.layers import tree_is_file, tree_realpath, tree_remove, tree_write

    tree_write(tree, INIT_PATH, guest_file("banger-init"), 0o755)
    tree_write(tree, "/etc/banger/fstab", guest_file("fstab"), 0o644)
    tree_write(tree, "/etc/banger/init.conf",
               f"# read by banger-init at boot\nSSHD_ARGS=\"{sshd_args}\"\n".encode(), 0o644)
    removed = []
    sshdir = tree_realpath(tree, "/etc/ssh")
    if sshdir is not None and sshdir.is_dir() and not sshdir.is_symlink():
        for p in sorted(sshdir.glob("ssh_host_*")):
            tree_remove(tree, f"/etc/ssh/{p.name}")
            removed.append(p.name)
    has_sshd = tree_is_file(tree, "/usr/sbin/sshd", executable=True)
    if has_sshd:
        tree_write(tree, "/etc/ssh/sshd_config.d/banger.conf", guest_file("sshd_config.conf"), 0o644)
        cfgp = tree_realpath(tree, "/etc/ssh/sshd_config")
        text = ""
        if cfgp is not None and cfgp.is_file() and not cfgp.is_symlink():
            text = cfgp.read_text(errors="replace")
        if not any(line.strip().startswith("Include") and "sshd_config.d" in line for line in text.splitlines()):
            # sshd takes the first value it reads: our snippet must be included before the rest
            tree_write(tree, "/etc/ssh/sshd_config", (_SSHD_INCLUDE + "\n" + text).encode(), 0o644)
    os_release = {}
    for cand in ("/etc/os-release", "/usr/lib/os-release"):
        p = tree_realpath(tree, cand)
        if p is not None and p.is_file() and not p.is_symlink():
            for line in p.read_text(errors="replace").splitlines():
                k, _, v = line.partition("=")
                if k in ("ID", "VERSION_ID", "PRETTY_NAME"):
                    os_release[k.lower()] = v.strip().strip('"')
            break
    return {"init": INIT_PATH, "has_sshd": has_sshd, "removed_host_keys": removed, "os": os_release}


# ---------------------------------------------------------------- work seeds
def make_work_seed(dest: Path, key_line: str, root_home: Path | None = None) -> None:
    """Build ``dest`` (ext4): the image's /root plus .ssh/authorized_keys with ``key_line``."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix=".seed-", dir=dest.parent))
    try:
        top = work / "root"
        top.mkdir(mode=0o700)
        if root_home is not None and root_home.is_dir() and not root_home.is_symlink():
            # cp -a never follows symlinks in the source and keeps owners/modes
            run(["cp", "-a", "--no-preserve=links", f"{root_home}/.", f"{top}/"], timeout=600)
        os.chmod(top, 0o700)
        os.chown(top, 0, 0)
        sshd = top / ".ssh"
        if os.path.lexists(sshd) and (sshd.is_symlink() or not sshd.is_dir()):
            rmtree(sshd) if sshd.is_dir() and not sshd.is_symlink() else os.unlink(sshd)
        sshd.mkdir(mode=0o700, exist_ok=True)
        os.chown(sshd, 0, 0)
        os.chmod(sshd, 0o700)
        ak = sshd / "authorized_keys"
        if os.path.lexists(ak):
            os.unlink(ak)
        fd = os.open(ak, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key_line.strip() + "\n")
        os.chown(ak, 0, 0)
        used, inodes = tree_usage(top)
        size = max(SEED_MIN_MIB, int(math.ceil((used * 2 / ext4.MiB + 32) / 64.0) * 64),
                   int(math.ceil(inodes * 2 * 16384 / ext4.MiB / 64.0) * 64))
        ext4.mkfs(dest, size, src_dir=top, label="banger-work")
        # mkfs -d keeps owners but not the root directory's mode: /root is 0700
        run([require("debugfs", "e2fsprogs"), "-w", "-R", "sif / mode 040700", str(dest)], timeout=60)
    finally:
        rmtree(work)


def reseed(old_seed: Path, new_seed: Path, key_line: str) -> None:
    """Build ``new_seed`` from ``old_seed``'s files (debugfs rdump, no mount) with ``key_line``."""
    debugfs = require("debugfs", "e2fsprogs")
    import tempfile

    with tempfile.TemporaryDirectory(dir=new_seed.parent, prefix=".reseed-") as td:
        home = Path(td) / "home"
        home.mkdir(mode=0o700)
        run([debugfs, "-R", f"rdump / {home}", str(old_seed)], timeout=600)
        rmtree(home / "lost+found")
        make_work_seed(new_seed, key_line, home)


# ---------------------------------------------------------------- pack
def pack(ctx, staging: Path, tree: Path, key) -> dict:
    """mkfs the rootfs from ``tree`` (e2fsck-clean), build the work seed; drop the tree."""
    from banger.images.sources.oci.layers import tree_realpath

    ctx.progress.step("packing rootfs (mkfs.ext4 -d)")
    used, inodes = tree_usage(tree)
    size_mib = fs_size_mib(used, inodes, 256)
    rootfs = staging / ROOTFS_NAME
    ext4.mkfs(rootfs, size_mib, src_dir=tree, label="banger-root")
    ctx.progress.step("checking rootfs (e2fsck -fn)")
    ext4.fsck(rootfs)
    ctx.progress.step("building work seed")
    make_work_seed(staging / SEED_NAME, key.public_line, tree_realpath(tree, "/root"))
    ext4.fsck(staging / SEED_NAME)
    rmtree(tree)
    return {"tree_bytes": used, "inodes": inodes, "fs_size_mib": size_mib}
