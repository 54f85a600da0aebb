"""Image source ``registered``: an existing ext4 root filesystem, copied (never modified in place),
set up for banger with debugfs (no mount) and published."""

from __future__ import annotations

from pathlib import Path

from banger.errors import BangerError, Conflict, NotFound, UsageError
from banger.host import ext4, fsutil
from banger.host.runner import require, run
from banger.images import finalize
from banger.images import service as images

KIND = "registered"


def register(ctx, name: str, rootfs_path: str | Path, kernel: str | None = None) -> dict:
    """Register an existing ext4 root filesystem (copied, never modified in place).

    The copy gets banger-init, its config and the sshd snippet (via debugfs, no mount),
    loses any baked SSH host keys, and its /root becomes the work seed.
    """
    from banger.guest.sshkeys import client_key

    images.validate_name(name)
    src = Path(rootfs_path)
    if not src.is_file():
        raise NotFound(f"no such file: {src}", "pass the path of an ext4 image file")
    debugfs = require("debugfs", "e2fsprogs")
    kernel = kernel or ctx.cfg.default_kernel
    with images.single_flight(ctx, name):
        if images.get(ctx, name) is not None:
            raise Conflict(f"image {name!r} already exists", f"delete it first: banger image delete {name}")
        key = client_key(ctx.cfg)
        staging = images.new_staging(ctx, name)
        try:
            rootfs = staging / finalize.ROOTFS_NAME
            ctx.progress.step(f"copying {src}")
            fsutil.reflink_or_sparse_copy(src, rootfs)
            try:
                ext4.fsck(rootfs)
            except BangerError as e:
                raise UsageError(f"{src} is not a clean ext4 filesystem", "run e2fsck -f on it (unmounted) first"
                                 ) from e
            # what does the image have?
            def exists(path: str) -> bool:
                cp = run([debugfs, "-R", f"stat {path}", str(rootfs)], check=False, timeout=60)
                return cp.returncode == 0 and "Inode:" in (cp.stdout or "")

            has_sshd = exists("/usr/sbin/sshd")
            home = staging / "home"
            home.mkdir()
            if exists("/root"):
                run([debugfs, "-R", f"rdump /root {home}", str(rootfs)], timeout=600)
            gfiles = staging / "guest"
            gfiles.mkdir()
            for n in ("banger-init", "fstab", "sshd_config.conf"):
                (gfiles / n).write_bytes(finalize.guest_file(n))
            (gfiles / "init.conf").write_text('SSHD_ARGS="-D -e"\n')
            cmds = ["mkdir /etc", "mkdir /etc/banger", "mkdir /sbin", "cd /sbin", "rm banger-init",
                    f"write {gfiles}/banger-init banger-init", "sif banger-init mode 0100755",
                    "sif banger-init uid 0", "sif banger-init gid 0", "cd /etc/banger"]
            for n in ("fstab", "init.conf"):
                cmds += [f"rm {n}", f"write {gfiles}/{n} {n}", f"sif {n} mode 0100644", f"sif {n} uid 0",
                         f"sif {n} gid 0"]
            for baked in _baked_host_keys(debugfs, rootfs, src):
                cmds.append(f"rm /etc/ssh/{baked}")
            if has_sshd:
                cmds += ["mkdir /etc/ssh/sshd_config.d", "cd /etc/ssh/sshd_config.d", "rm banger.conf",
                         f"write {gfiles}/sshd_config.conf banger.conf", "sif banger.conf mode 0100644",
                         "sif banger.conf uid 0", "sif banger.conf gid 0"]
            # names read from the image are bytes (surrogateescape): they go back to debugfs unchanged
            (staging / "cmds").write_bytes(("\n".join(cmds) + "\n").encode("utf-8", "surrogateescape"))
            run([debugfs, "-w", "-f", str(staging / "cmds"), str(rootfs)], timeout=600)
            ext4.fsck(rootfs)
            root_home = home / "root"
            finalize.make_work_seed(staging / finalize.SEED_NAME, key.public_line,
                                    root_home if root_home.is_dir() else None)
            finalize.rmtree(home)
            finalize.rmtree(gfiles)
            (staging / "cmds").unlink()
            meta = {"init": finalize.INIT_PATH, "has_sshd": has_sshd, "registered_from": str(src.resolve()),
                    "key_fingerprint": key.fingerprint}
            return images.publish(ctx, name, staging, kind=KIND, source=str(src.resolve()), digest=None,
                                  kernel=kernel, init=finalize.INIT_PATH, meta=meta)
        finally:
            finalize.rmtree(staging)


def _baked_host_keys(debugfs: str, rootfs: Path, src: Path) -> list[str]:
    """The ssh_host_* entries of the image's /etc/ssh (``ls -p``: /inode/mode/uid/gid/name/size/)."""
    cp = run([debugfs, "-R", "ls -p /etc/ssh", str(rootfs)], check=False, timeout=60)
    keys = []
    for line in (cp.stdout or "").splitlines():
        parts = line.split("/")
        if len(parts) < 7 or not parts[5].startswith("ssh_host_"):
            continue
        name = parts[5]
        if any(c.isspace() or c == '"' or ord(c) < 0x20 for c in name):
            raise UsageError(f"{src} has a baked SSH host key with an unusual name: "
                             f"{name.encode('utf-8', 'surrogateescape')!r} in /etc/ssh",
                             "remove the image's /etc/ssh/ssh_host_* files first (banger gives each VM its own key)")
        keys.append(name)
    return keys
