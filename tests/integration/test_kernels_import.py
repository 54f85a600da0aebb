"""`kernel import DIR` of a foreign (hostile) kernel directory: only the names a banger kernel
directory holds, never through a link, copied (not hard-linked), and checked as a kernel exactly
as a pull checks it. Real CLI processes, real files; synthetic kernels so it runs in seconds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.support.cli import banger_json
from tests.support.kernels import fake_bzimage, fake_elf_kernel, fake_module_tree

REL = "9.9.3-imp"
ELF = fake_elf_kernel(release=REL, size=1 << 20, seed=33)
BZ = fake_bzimage(ELF, "gzip", version=f"{REL} (t@b) #1")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _snapshot(*paths: Path) -> dict:
    """Content, mode, owner and mtime of host files that must stay untouched."""
    out = {}
    for p in paths:
        st = os.lstat(p)
        out[str(p)] = (p.read_bytes() if p.is_file() else None, st.st_mode, st.st_uid, st.st_mtime_ns, st.st_nlink)
    return out


def _state(cfg) -> tuple:
    rows = []
    if cfg.db_path.exists():
        with sqlite3.connect(cfg.db_path) as c:
            rows = [r[0] for r in c.execute("SELECT name FROM kernels ORDER BY name")]
    staging = sorted(p.name for p in cfg.staging_dir.iterdir()) if cfg.staging_dir.exists() else []
    kernels = sorted(p.name for p in cfg.kernels_dir.iterdir()) if cfg.kernels_dir.exists() else []
    return rows, staging, kernels


@pytest.fixture
def good_dir(cfg, tmp_path) -> Path:
    """A real kernel directory (bzImage + vmlinux + modules + initrd + manifest) made by banger."""
    fake_module_tree(tmp_path / "mods", release=REL)
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(BZ)
    banger_json("kernel", "import", bz, "--name", "origin", "--modules", tmp_path / "mods")
    src = tmp_path / "shared" / "origin"
    shutil.copytree(cfg.kernels_dir / "origin", src)
    return src


def _edit_manifest(d: Path, fn) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def test_a_foreign_kernel_dir_is_copied_and_checked_like_a_pull(cfg, good_dir):
    d = banger_json("kernel", "import", good_dir, "--name", "copy")["data"]
    kdir = cfg.kernels_dir / "copy"
    assert (kdir / "vmlinux").read_bytes() == ELF and (kdir / "bzImage").read_bytes() == BZ
    for rel in ("vmlinux", "bzImage", "initrd.img", f"modules/{REL}/virtio_net.ko"):
        mine, theirs = os.stat(kdir / rel), os.stat(good_dir / rel)
        assert mine.st_ino != theirs.st_ino and mine.st_nlink == 1, rel       # a copy, never a hard link
    assert d["version"] == REL and "virtio_net" in d["modules"]
    m = json.loads((kdir / "manifest.json").read_text())
    assert m["source"]["type"] == "import" and m["source"]["from"]["type"] == "import"
    assert m["imported_from"] == str(good_dir)
    # changing the source afterwards cannot reach the published kernel
    (good_dir / "initrd.img").write_bytes(b"\x1f\x8b" + b"\0" * 64)
    assert (kdir / "initrd.img").read_bytes() != (good_dir / "initrd.img").read_bytes()
    assert _state(cfg)[1] == []


def test_hostile_kernel_directories_are_refused_and_touch_nothing(cfg, good_dir, tmp_path):
    before_rows = _state(cfg)[0]
    secret = tmp_path / "secret"                      # stands in for /etc/shadow: root-only, not a kernel
    secret.write_bytes(b"root:$6$hash:19000:0:99999:7:::\n")
    os.chmod(secret, 0o600)
    victim = tmp_path / "victim.ko"                    # a host file a hostile manifest names by traversal
    victim.write_bytes(b"host data\n")
    outside = tmp_path / "abs-target"
    outside.write_bytes(b"absolute\n")
    watched = _snapshot(secret, victim, outside)

    def hostile(name: str) -> Path:
        d = tmp_path / "hostile" / name
        shutil.copytree(good_dir, d)
        return d

    cases = []
    # 1. names that climb out of the directory (and would land outside staging), absolute names
    d = hostile("traversal")
    rel_up = os.path.relpath(victim, d)                # ../../victim.ko
    _edit_manifest(d, lambda m: m["files"].update({rel_up: {"sha256": _sha(victim.read_bytes()), "size": 10}}))
    cases.append((d, "usage", rel_up))
    d = hostile("modules-traversal")
    _edit_manifest(d, lambda m: m["files"].update({"modules/../../../x.ko": {"sha256": "0" * 64, "size": 1}}))
    cases.append((d, "usage", "modules/../../../x.ko"))
    d = hostile("absolute")
    _edit_manifest(d, lambda m: m["files"].update({str(outside): {"sha256": _sha(outside.read_bytes()), "size": 9}}))
    cases.append((d, "usage", str(outside)))
    # 2. a symlink to a secret, with the secret's real digest in the manifest (the old import followed it)
    d = hostile("symlink-file")
    os.unlink(d / "initrd.img")
    os.symlink(secret, d / "initrd.img")
    _edit_manifest(d, lambda m: m["files"].update({"initrd.img": {"sha256": _sha(secret.read_bytes()),
                                                                  "size": secret.stat().st_size}}))
    cases.append((d, "usage", "symbolic link"))
    d = hostile("symlink-dir")
    shutil.rmtree(d / "modules")
    (tmp_path / "elsewhere" / REL).mkdir(parents=True)
    shutil.copytree(good_dir / "modules" / REL, tmp_path / "elsewhere" / REL, dirs_exist_ok=True)
    os.symlink(tmp_path / "elsewhere", d / "modules")
    cases.append((d, "usage", "symbolic link"))
    d = hostile("symlink-manifest")
    (d / "manifest.json").rename(tmp_path / "manifest-elsewhere.json")
    os.symlink(tmp_path / "manifest-elsewhere.json", d / "manifest.json")
    cases.append((d, "usage", "symbolic link"))
    # 3. a tiny fake vmlinux whose digest matches its manifest: not a kernel, as a pull would say
    d = hostile("tiny")
    for f in ("bzImage",):
        os.unlink(d / f)
    (d / "vmlinux").write_bytes(b"0123456789")
    _edit_manifest(d, lambda m: (m["files"].pop("bzImage"),
                                 m["files"].update({"vmlinux": {"sha256": _sha(b"0123456789"), "size": 10}})))
    cases.append((d, "not_a_kernel", "ELF"))
    # 4. a FIFO where a file should be (reading it would hang forever)
    d = hostile("fifo")
    os.unlink(d / "initrd.img")
    os.mkfifo(d / "initrd.img")
    cases.append((d, "usage", "not a regular file"))

    for i, (d, code, words) in enumerate(cases):
        doc = banger_json("kernel", "import", d, "--name", f"bad{i}", check=False)
        assert doc["ok"] is False, d.name
        err = doc["error"]
        assert err["code"] == code and words in err["message"] and err["hint"], (d.name, err)
        rows, staging, kernels = _state(cfg)
        assert rows == before_rows and staging == [] and f"bad{i}" not in kernels, d.name
    assert _snapshot(secret, victim, outside) == watched          # host files untouched, never linked
    assert not (cfg.staging_dir / "victim.ko").exists() and not (cfg.home / "victim.ko").exists()


def test_a_hard_link_in_a_foreign_dir_never_becomes_part_of_the_kernel(cfg, good_dir, tmp_path):
    """The foreign vmlinux is a hard link to a file its writer keeps: the import copies, so a later
    write through that link does not change the published kernel."""
    theirs = tmp_path / "writer-keeps-this"
    os.link(good_dir / "vmlinux", theirs)
    banger_json("kernel", "import", good_dir, "--name", "linked")
    mine = cfg.kernels_dir / "linked" / "vmlinux"
    assert os.stat(mine).st_ino != os.stat(theirs).st_ino and os.stat(mine).st_nlink == 1
    with open(theirs, "r+b") as f:
        f.write(b"\0" * 64)
    assert mine.read_bytes() == ELF


def test_manifest_claims_must_match_what_assembling_produces(cfg, good_dir):
    _edit_manifest(good_dir, lambda m: m.update({"version": "6.6.6-other"}))
    doc = banger_json("kernel", "import", good_dir, "--name", "liar", check=False)
    assert doc["error"]["code"] == "integrity" and "6.6.6-other" in doc["error"]["message"]
    assert _state(cfg)[1] == [] and "liar" not in _state(cfg)[0]
