"""Image source ``promoted`` (`vm promote` / `image promote`): turn a stopped VM into a new image.

The image's rootfs and the VM's overlay disk are attached read-only through loop
devices; a read-only overlayfs with ``lowerdir=scrub:upper:lower`` is the merged
view of the VM's root (``scrub`` puts the per-VM host key and hostname back to
what the base image had, so no VM secret ends up in an image); ``mkfs.ext4 -d``
packs it into a staging dir; the VM's work disk becomes the new work seed; then
``images.publish``.  Every mount and loop device is undone in reverse on the way
out, failure or not (the step engine's undo list); ``banger gc`` detaches loops
left by a killed promote.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from banger.errors import InvalidState
from banger.host import ext4
from banger.host.fsutil import reflink_or_sparse_copy
from banger.host.runner import require, run
from banger.state import staging
from banger.vms import runtime as vms
from banger.vms.plan import Runner

KIND = "promoted"
PER_VM_FILES = ("etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_ed25519_key.pub", "etc/hostname")


def _losetup_ro(scratch: Path, path: Path) -> str:
    # on record in our staging dir before and after the attach: gc spares the loops of a live promote
    # (the image's rootfs is not under our vm/<id> lock) and detaches those a killed one left
    staging.record_loop(scratch, path)
    cp = run([require("losetup"), "--find", "--show", "--read-only", str(path)], timeout=30,
             hint="loop devices are needed to read the disks (modprobe loop)")
    dev = cp.stdout.strip()
    staging.record_loop(scratch, path, dev)
    return dev


def _mount(argv_opts: list[str], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    run([require("mount"), *argv_opts, str(target)], timeout=60)


def _umount(target: Path) -> None:
    if os.path.ismount(target):
        run([require("umount"), str(target)], timeout=60)


def _detach(dev: str) -> None:
    run([require("losetup"), "-d", dev], check=False, timeout=30)


def _scrub_layer(scrub: Path, lower: Path) -> None:
    """Shadow the per-VM files: the base image's own version, or a whiteout if it had none."""
    for rel in PER_VM_FILES:
        dst = scrub / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        src = lower / rel
        if os.path.lexists(src):
            shutil.copy2(src, dst, follow_symlinks=False)
        else:
            os.mknod(dst, stat.S_IFCHR | 0o000, os.makedev(0, 0))  # overlayfs whiteout


def promote(ctx, ref: str, name: str) -> dict:
    from banger.images import finalize
    from banger.images import service as images

    images.validate_name(name)
    vm = vms.get(ctx, ref)
    with ctx.locks.hold(f"vm/{vm['id']}", purpose=f"promote to image {name}"):
        vm = vms.get(ctx, vm["id"])
        st = vms.effective_state(ctx, vm)
        if st not in (vms.STOPPED, vms.CRASHED):
            raise InvalidState(f"VM {vm['name']} is {st}; only a stopped VM can be promoted",
                               f"banger vm stop {vm['name']}")
        d = vms.vm_dir(ctx, vm)
        rootfs = Path(vm["options"]["rootfs"])
        ctx.cfg.staging_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"promote-{name}-", dir=ctx.cfg.staging_dir))
        staging.write_owner(scratch)
        out = Path(tempfile.mkdtemp(prefix=f"image-{name}-", dir=ctx.cfg.staging_dir))
        staging.write_owner(out)
        steps = Runner(ctx, vm["id"], "promote")
        loops: dict[str, str] = {}
        try:
            # a crashed VM may have left journals to replay; we own the disks under vm/<id>
            steps.run("fsck", lambda: [ext4.fsck(d / f, fix=True) for f in (vms.OVERLAY, vms.WORK)])
            for key, path in (("lower", rootfs), ("overlay", d / vms.OVERLAY)):
                steps.run(f"loop.{key}", lambda p=path, k=key: loops.__setitem__(k, _losetup_ro(scratch, p)),
                          lambda k=key: loops.get(k) and _detach(loops[k]))
                mnt = scratch / key
                steps.run(f"mount.{key}", lambda k=key, m=mnt: _mount(["-t", "ext4", "-o", "ro,noload,nodev,nosuid,noexec", loops[k]], m),
                          lambda m=mnt: _umount(m))
            steps.run("scrub", lambda: _scrub_layer(scratch / "scrub", scratch / "lower"))
            merged = scratch / "merged"
            lowers = f"{scratch / 'scrub'}:{scratch / 'overlay' / 'upper'}:{scratch / 'lower'}"
            steps.run("mount.merged", lambda: _mount(["-t", "overlay", "overlay", "-o", f"ro,nodev,nosuid,noexec,lowerdir={lowers}"],
                                                     merged), lambda: _umount(merged))

            def pack():
                used, inodes = finalize.tree_usage(merged)
                size = max(finalize.fs_size_mib(used, inodes, 256), 256)
                ext4.mkfs(out / finalize.ROOTFS_NAME, size, src_dir=merged, label="banger-root")
                return {"tree_bytes": used, "fs_size_mib": size,
                        "has_sshd": os.path.exists(merged / "usr" / "sbin" / "sshd")}

            facts = steps.run("pack.rootfs", pack, message="packing the merged root (mkfs.ext4 -d)")
            steps.run("pack.seed", lambda: reflink_or_sparse_copy(d / vms.WORK, out / finalize.SEED_NAME))
            errs = steps.unwind()  # unmount + detach before publishing
            if errs:
                from banger.errors import ExternalError

                raise ExternalError("; ".join(errs), "run banger gc to detach leftover loop devices")
            meta = {**facts, "promoted_from": {"vm": vm["name"], "id": vm["id"], "image": vm["image"]}}
            row = steps.run("publish", lambda: images.publish(
                ctx, name, out, kind=KIND, source=f"vm:{vm['name']}", digest=None, kernel=vm["kernel"],
                init=vm["options"].get("init"), meta=meta))
        except BaseException:
            steps.unwind()
            shutil.rmtree(out, ignore_errors=True)
            raise
        finally:
            steps.flush()
            shutil.rmtree(scratch, ignore_errors=True)
    return row

