# ruff: noqa: F811  (pytest fixtures imported from tests.support)
"""Image service on real ext4 / SQLite / flock: register, delete, resolve + auto-pull, work-seed re-keying."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from banger.context import Ctx
from banger.errors import Conflict, NotFound
from banger.images import service as images
from banger.images.sources.register import register
from tests.support.cli import banger_json
from tests.support.images import ext4_cat, ext4_ls, ext4_stat, fsck_clean
from tests.support.procs import spawn_py
from tests.support.registry import AuthFront, layer, registry  # noqa: F401


def _tiny_rootfs(tmp: Path) -> Path:
    tree = tmp / "tree"
    for d in ("usr/sbin", "etc/ssh", "root", "bin"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "usr/sbin/sshd").write_text("#!/bin/sh\n")
    os.chmod(tree / "usr/sbin/sshd", 0o755)
    (tree / "etc/ssh/sshd_config").write_text("Include /etc/ssh/sshd_config.d/*.conf\nUsePAM yes\n")
    (tree / "etc/ssh/ssh_host_rsa_key").write_text("BAKED")
    (tree / "root/.bashrc").write_text("PS1=x\n")
    os.chmod(tree / "root", 0o700)
    img = tmp / "mine.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(img), "64M"], check=True)
    return img


def _new_client_key(cfg):
    from banger.guest.sshkeys import client_key

    for f in ("id_ed25519", "id_ed25519.pub"):
        (cfg.ssh_dir / f).unlink(missing_ok=True)
    return client_key(cfg)


def test_register_delete_conflict(banger_env, cfg, tmp_path):
    src = _tiny_rootfs(tmp_path)
    before = src.read_bytes()
    d = banger_json("image", "register", "mine", str(src))["data"]
    assert src.read_bytes() == before  # the user's file is never modified
    assert d["kind"] == "registered" and d["has_sshd"] is True and d["init"] == "/sbin/banger-init"
    rootfs = Path(d["rootfs"])
    assert fsck_clean(rootfs)[0]
    assert ext4_stat(rootfs, "/sbin/banger-init")["mode"] == 0o755
    assert "ssh_host_rsa_key" not in ext4_ls(rootfs, "/etc/ssh")
    assert b"UsePAM no" in ext4_cat(rootfs, "/etc/ssh/sshd_config.d/banger.conf")
    seed = Path(d["work_seed"])
    assert ".bashrc" in ext4_ls(seed, "/") and ext4_stat(seed, "/.ssh/authorized_keys")["mode"] == 0o600
    # a VM row referencing the image blocks deletion (exit 4), with the VM named
    ctx = Ctx(cfg)
    now = time.time()
    ctx.store.execute("INSERT INTO vms (id, name, state, image, vcpu, memory_mib, overlay_size_mib, work_disk_size_mib,"
                      " slot, ip, mac, created_at, updated_at) VALUES ('v1','devbox','stopped','mine',1,512,64,64,"
                      "2,'172.30.0.2','02:00:00:00:00:02',?,?)", (now, now))
    with pytest.raises(Conflict, match="devbox"):
        images.delete(ctx, "mine")
    err = banger_json("image", "rm", "mine", check=False)
    assert err["error"]["code"] == "conflict"
    assert (cfg.images_dir / "mine/rootfs.ext4").is_file()
    ctx.store.execute("DELETE FROM vms WHERE id = 'v1'")
    assert banger_json("image", "rm", "mine")["data"]["deleted"] is True
    assert not (cfg.images_dir / "mine").exists() and images.get(ctx, "mine") is None
    assert list(cfg.staging_dir.iterdir()) == []
    with pytest.raises(NotFound):
        images.delete(ctx, "mine")
    ctx.close()


def test_resolve_missing_and_rekey(banger_env, cfg, tmp_path):
    ctx = Ctx(cfg)
    with pytest.raises(NotFound) as ei:
        images.resolve(ctx, "nosuch")
    assert ei.value.hint
    with pytest.raises(NotFound, match="debian-bookworm") as ei:
        images.resolve(ctx, auto_pull=False)  # the default image, not auto-built
    assert "banger image build debian-bookworm" in ei.value.hint
    register(ctx, "mine", _tiny_rootfs(tmp_path))
    r = images.resolve(ctx, "mine")
    assert set(r) == {"name", "rootfs", "work_seed", "kernel", "init", "key_fingerprint", "has_sshd", "meta"}
    assert r["init"] == "/sbin/banger-init" and r["kernel"] == cfg.default_kernel
    old_inode = os.stat(r["work_seed"]).st_ino
    key = _new_client_key(cfg)
    r2 = images.resolve(ctx, "mine")
    assert r2["key_fingerprint"] == key.fingerprint != r["key_fingerprint"]
    assert os.stat(r2["work_seed"]).st_ino != old_inode  # replaced by rename, never rewritten in place
    assert ext4_cat(r2["work_seed"], "/.ssh/authorized_keys").decode().split() == key.public_line.split()
    s = ext4_stat(r2["work_seed"], "/.ssh/authorized_keys")
    assert (s["mode"], s["uid"], s["gid"]) == (0o600, 0, 0)
    assert ".bashrc" in ext4_ls(r2["work_seed"], "/")
    assert fsck_clean(r2["work_seed"])[0]
    assert [p.name for p in (cfg.images_dir / "mine").iterdir() if p.name.startswith(".")] == []
    ctx.close()


def test_seed_refresh_races_with_cloners(banger_env, cfg, tmp_path):
    ctx = Ctx(cfg)
    seed = Path(register(ctx, "mine", _tiny_rootfs(tmp_path))["work_seed"])
    stop = tmp_path / "stop"
    code = """
import os, subprocess, sys
from banger.host.fsutil import reflink_or_sparse_copy
seed, out, stop = sys.argv[1], sys.argv[2], sys.argv[3]
n = bad = 0
while not os.path.exists(stop) or n < 3:
    dst = f"{out}.{n % 2}"
    reflink_or_sparse_copy(seed, dst)
    cp = subprocess.run(["e2fsck", "-fn", dst], capture_output=True, text=True)
    if cp.returncode != 0:
        bad += 1
        print("CORRUPT", cp.stdout[-500:], flush=True)
    n += 1
print(f"clones={n} bad={bad}", flush=True)
"""
    procs = [spawn_py(code, str(seed), str(tmp_path / f"clone{i}"), str(stop)) for i in range(4)]
    fps = set()
    try:
        for _ in range(6):
            key = _new_client_key(cfg)
            fps.add(images.resolve(ctx, "mine")["key_fingerprint"])
            assert fps and key.fingerprint in fps
    finally:
        stop.touch()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "bad=0" in out and "CORRUPT" not in out, out
        assert int(out.split("clones=")[1].split()[0]) >= 3
    assert len(fps) == 6
    assert ext4_cat(seed, "/.ssh/authorized_keys").decode().split() == key.public_line.split()
    ctx.close()


def test_resolve_auto_pulls_catalog_entry_once(banger_env, cfg, registry, tmp_path):
    registry.push_image("cat/tool", "v2", [layer([("dir", "root", 0o700, 0, 0), ("file", "etc/hostname", b"x\n")])])
    with AuthFront(registry.url, require_token=False, blob_delay=0.3) as front:
        catfile = tmp_path / "catalog.json"
        catfile.write_text(json.dumps({"loop-tool": {"kind": "oci", "ref": f"{front.host}/cat/tool:v2",
                                                     "kernel": "k-test"}}))
        (cfg.home / "config.toml").write_text(f'image_catalog = "{catfile}"\n')
        code = """
import json
from banger.context import Ctx
from banger.images import service as images
r = images.resolve(Ctx(), "loop-tool")
print(json.dumps({"pull_id": r["meta"]["pull_id"], "kernel": r["kernel"], "seed": r["work_seed"]}))
"""
        procs = [spawn_py(code) for _ in range(4)]
        results = []
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        manifest_gets = [p for _, m, p, st in front.log if "/manifests/" in p and st == 200]
    assert len({r["pull_id"] for r in results}) == 1 and results[0]["kernel"] == "k-test"
    assert len(manifest_gets) == 1  # the three losers re-checked after the lock and never asked the registry
    assert (cfg.images_dir / "loop-tool/rootfs.ext4").is_file()


def test_failed_publish_leaves_nothing(banger_env, cfg, tmp_path):
    ctx = Ctx(cfg)
    cfg.staging_dir.mkdir(parents=True)
    st = cfg.staging_dir / "image-broken"
    st.mkdir()
    (st / "rootfs.ext4").write_bytes(b"\0" * 4096 * 16)  # not a filesystem: e2fsck fails at publication
    from banger.errors import CommandFailed

    with pytest.raises(CommandFailed):  # e2fsck's verdict, with argv and stderr tail
        images.publish(ctx, "broken", st, kind="promoted", source="vm:x", digest=None, kernel=None,
                       init="/sbin/banger-init", meta={})
    assert not st.exists() and images.get(ctx, "broken") is None and not (cfg.images_dir / "broken").exists()
    # and a taken name is a conflict at publication, the staging dir is removed
    register(ctx, "taken", _tiny_rootfs(tmp_path))
    st2 = cfg.staging_dir / "image-taken2"
    st2.mkdir()
    shutil.copy(cfg.images_dir / "taken/rootfs.ext4", st2 / "rootfs.ext4")
    with pytest.raises(Conflict):
        images.publish(ctx, "taken", st2, kind="promoted", source="vm:x", digest=None, kernel=None,
                       init="/sbin/banger-init", meta={})
    assert not st2.exists()
    ctx.close()


def test_register_an_image_whose_names_are_not_utf8(banger_env, cfg, tmp_path):
    """A non-UTF-8 baked host key is found and removed (the old `ls -l` parse left it in the image),
    and non-UTF-8 names in /root reach the work seed."""
    tree = tmp_path / "tree"
    for d in ("usr/sbin", "etc/ssh", "root", "bin"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "usr/sbin/sshd").write_text("#!/bin/sh\n")
    os.chmod(tree / "usr/sbin/sshd", 0o755)
    odd = b"ssh_host_caf\xe9_key"
    with open(os.path.join(os.fsencode(tree / "etc/ssh"), odd), "wb") as f:
        f.write(b"BAKED")
    with open(os.path.join(os.fsencode(tree / "root"), b"notes-\xff.txt"), "wb") as f:
        f.write(b"mine\n")
    img = tmp_path / "odd.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(img), "64M"], check=True)
    d = banger_json("image", "register", "odd", str(img))["data"]
    listing = subprocess.run(["debugfs", "-R", "ls -p /etc/ssh", d["rootfs"]], capture_output=True).stdout
    assert b"ssh_host_" not in listing
    seed = subprocess.run(["debugfs", "-R", "ls -p /", d["work_seed"]], capture_output=True).stdout
    assert b"notes-\xff.txt" in seed
