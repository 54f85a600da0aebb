# ruff: noqa: F811  (pytest fixtures imported from tests.support)
"""banger's own files are private (umask 077), but modes inside guest filesystems are the guest's: an image
pulled through the real CLI keeps 0755 implicit parent dirs and 0644 files; banger's own guest files
(/etc/banger/*, the overlay's /etc/hostname and host key .pub) keep their conventional modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.support.cli import banger_json
from tests.support.images import ext4_stat
from tests.support.registry import layer, registry  # noqa: F401  (fixture)


def test_pulled_image_keeps_guest_modes_under_banger_umask(banger_env, cfg, registry):
    registry.push_image("test/modes", "v1", [layer([
        ("dir", "etc", 0o755, 0, 0),
        ("file", "etc/os-release", b"ID=modes\n", 0o644, 0, 0),
        ("file", "opt/deep/tool", b"#!/bin/sh\n", 0o755, 0, 0),  # no entries for opt/ or opt/deep/
        ("dir", "root", 0o700, 0, 0),
    ])])
    d = banger_json("image", "pull", f"{registry.host}/test/modes:v1", "--name", "modes")["data"]
    rootfs = Path(d["rootfs"])
    for path, mode in (("/opt", 0o755), ("/opt/deep", 0o755), ("/opt/deep/tool", 0o755), ("/etc", 0o755),
                       ("/etc/os-release", 0o644), ("/root", 0o700), ("/etc/banger", 0o755),
                       ("/etc/banger/fstab", 0o644), ("/etc/banger/init.conf", 0o644),
                       ("/sbin/banger-init", 0o755)):
        st = ext4_stat(rootfs, path)
        assert st is not None and st["mode"] & 0o7777 == mode, (path, st)
    # while on the host the image's files are private
    for p in rootfs.parent.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, (p, oct(p.stat().st_mode))


def test_overlay_disk_guest_files_keep_their_modes(banger_env, cfg):
    from banger.context import Ctx
    from banger.vms.disks import make_overlay_disk

    old = os.umask(0o077)  # as every banger command
    try:
        ctx = Ctx(cfg)
        vm = {"id": "abcdef123456", "name": "modes-vm", "ip": "172.30.0.9"}
        d = cfg.vm_dir(vm["id"])
        d.mkdir(parents=True)
        make_overlay_disk(ctx, vm, 64)
    finally:
        os.umask(old)
    ov = d / "overlay.ext4"
    assert ext4_stat(ov, "/upper/etc/hostname")["mode"] & 0o7777 == 0o644
    assert ext4_stat(ov, "/upper/etc/ssh/ssh_host_ed25519_key.pub")["mode"] & 0o7777 == 0o644
    assert ext4_stat(ov, "/upper/etc/ssh/ssh_host_ed25519_key")["mode"] & 0o7777 == 0o600
    assert ext4_stat(ov, "/upper/etc")["mode"] & 0o7777 == 0o755
    for p in (ov, d / "known_hosts"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
