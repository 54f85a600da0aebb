"""The default image (debootstrap bookworm minbase + sshd), built once into the test cache.

Slow on a cold cache (~1 min debootstrap); select with -m slow, deselect with -m "not slow".
It runs in CI: nothing here is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from banger.context import Ctx
from banger.images import service as images
from tests.support.images import default_image, ext4_cat, ext4_ls, ext4_stat, fsck_clean, install_image  # noqa: F401

pytestmark = pytest.mark.slow


def test_default_image_built_clean_and_lean(default_image):  # noqa: F811
    rootfs = default_image / "rootfs.ext4"
    ok, out = fsck_clean(rootfs)
    assert ok, out
    meta = json.loads((default_image / "meta.json").read_text())
    build = json.loads((default_image / "build.json").read_text())
    print(f"\ndefault image: build {build['build_wall_s']} s (debootstrap {meta['debootstrap_s']} s), "
          f"tree {meta['tree_bytes'] / 2**20:.0f} MiB, fs {meta['fs_size_mib']} MiB, "
          f"allocated {build['row']['size_bytes'] / 2**20:.0f} MiB")
    assert meta["has_sshd"] is True and meta["init"] == "/sbin/banger-init" and meta["os"]["id"] == "debian"
    assert meta["mirror"] and meta["suite"] == "bookworm"
    # no host keys baked in; banger's sshd settings present and included first
    assert not [n for n in ext4_ls(rootfs, "/etc/ssh") if n.startswith("ssh_host_")]
    snippet = ext4_cat(rootfs, "/etc/ssh/sshd_config.d/banger.conf").decode()
    for line in ("UsePAM no", "UseDNS no", "PrintMotd no", "PrintLastLog no", "PermitRootLogin prohibit-password",
                 "HostKey /etc/ssh/ssh_host_ed25519_key", "AuthorizedKeysFile .ssh/authorized_keys"):
        assert line in snippet.splitlines()
    assert b"Include /etc/ssh/sshd_config.d/*.conf" in ext4_cat(rootfs, "/etc/ssh/sshd_config")
    assert ext4_stat(rootfs, "/sbin")["type"] == "symlink"  # merged /usr: the init lives in /usr/sbin
    s = ext4_stat(rootfs, "/usr/sbin/banger-init")
    assert (s["mode"], s["uid"]) == (0o755, 0)
    assert b'SSHD_ARGS="-D -e -r"' in ext4_cat(rootfs, "/etc/banger/init.conf")
    # the tools a developer expects (and the init needs)
    for tool in ("/usr/sbin/sshd", "/usr/bin/ssh-keygen", "/usr/bin/ip", "/usr/bin/ping", "/usr/bin/ps",
                 "/usr/bin/less", "/usr/bin/curl", "/usr/bin/git", "/usr/bin/mount", "/usr/bin/dash"):
        assert ext4_stat(rootfs, tool) is not None, tool
    # trimmed
    assert ext4_ls(rootfs, "/usr/share/man") == [] and ext4_ls(rootfs, "/usr/share/doc") == []
    assert ext4_ls(rootfs, "/var/lib/apt/lists") == [] and ext4_ls(rootfs, "/usr/share/locale") == []
    assert ext4_stat(rootfs, "/etc/resolv.conf") is None  # no host resolver leaked into the image
    assert meta["tree_bytes"] < 260 * 2**20
    assert fsck_clean(default_image / "work-seed.ext4")[0]


def test_default_image_installs_and_rekeys(banger_env, cfg, default_image):  # noqa: F811
    row = install_image(cfg, default_image)
    assert row["name"] == "debian-bookworm" and row["has_sshd"]
    ctx = Ctx(cfg)
    r = images.resolve(ctx)  # name None -> cfg.default_image
    from banger.guest.sshkeys import client_key

    key = client_key(cfg)
    assert r["name"] == cfg.default_image and r["key_fingerprint"] == key.fingerprint
    assert ext4_cat(r["work_seed"], "/.ssh/authorized_keys").decode().split() == key.public_line.split()
    assert {".bashrc", ".profile", ".ssh"} <= set(ext4_ls(r["work_seed"], "/"))
    assert Path(r["rootfs"]).is_file() and fsck_clean(r["work_seed"])[0]
    ctx.close()
