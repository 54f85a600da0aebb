"""Kernel pull over a real loopback HTTP server, real flock across real CLI processes,
real SQLite; synthetic (small) kernels so it runs in seconds."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from banger.guest import kernelfmt
from tests.support.cli import banger_json
from tests.support.kernels import (
    FakeApt,
    KernelServer,
    download_log,
    fake_bzimage,
    fake_elf_kernel,
    fake_module_tree,
    kernel_deb,
    newc_entries,
    sha256,
    write_catalog,
)

ELF_A = fake_elf_kernel(release="9.9.1-a", size=3 << 20, seed=11)
ELF_B = fake_elf_kernel(release="9.9.2-b", size=3 << 20, seed=22)
BZ_A = fake_bzimage(ELF_A, "lz4", version="9.9.1-a (t@b) #1")
BZ_B = fake_bzimage(ELF_B, "gzip", version="9.9.2-b (t@b) #1")


@pytest.fixture
def server():
    files = {"/a/bzImage": BZ_A, "/b/bzImage": BZ_B, "/elf/vmlinux": ELF_A}
    with KernelServer(files) as s:
        yield s


@pytest.fixture
def catalog(tmp_path, server, monkeypatch):
    p = write_catalog(tmp_path / "kernels.json", [
        {"name": "ka", "source": {"type": "url", "url": server.url("/a/bzImage"), "sha256": sha256(BZ_A)}},
        {"name": "kb", "source": {"type": "url", "url": server.url("/b/bzImage"), "sha256": sha256(BZ_B)}},
        {"name": "kelf", "source": {"type": "url", "url": server.url("/elf/vmlinux"), "sha256": sha256(ELF_A)}},
        {"name": "kbad", "source": {"type": "url", "url": server.url("/a/bzImage"), "sha256": "ab" * 32}},
        {"name": "knosha", "source": {"type": "url", "url": server.url("/a/bzImage"), "sha256": None}},
        {"name": "k404", "source": {"type": "url", "url": server.url("/nope"), "sha256": "cd" * 32}},
    ])
    monkeypatch.setenv("BANGER_KERNEL_CATALOG", str(p))
    return p


def _spawn_pull(name, *extra):
    return subprocess.Popen([sys.executable, "-m", "banger.cli.main", "kernel", "pull", name, *extra, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def _rows(cfg, sql="SELECT name FROM kernels"):
    if not cfg.db_path.exists():
        return []
    with sqlite3.connect(cfg.db_path) as c:
        return [r[0] for r in c.execute(sql)]


def _nothing_left(cfg, name):
    assert not (cfg.kernels_dir / name).exists()
    assert name not in _rows(cfg)
    assert not cfg.staging_dir.exists() or list(cfg.staging_dir.iterdir()) == []


def test_url_pull_produces_the_triple(cfg, catalog, server):
    d = banger_json("kernel", "pull", "ka")["data"]
    kdir = cfg.kernels_dir / "ka"
    assert d["downloaded"] is True and d["dir"] == str(kdir) and d["version"] == "9.9.1-a"
    assert (kdir / "vmlinux").read_bytes() == ELF_A          # extracted from the lz4 bzImage
    assert (kdir / "bzImage").read_bytes() == BZ_A
    assert kernelfmt.elf_info(kdir / "vmlinux").pvh_entry == 0x1000000
    ents = newc_entries(kdir / "initrd.img")
    assert "init" in ents and "bin/busybox" in ents
    m = json.loads((kdir / "manifest.json").read_text())
    assert m["source"] == {"type": "url", "url": server.url("/a/bzImage"), "sha256": sha256(BZ_A)}
    assert m["files"]["vmlinux"]["sha256"] == sha256(ELF_A)
    assert m["files"]["bzImage"]["sha256"] == sha256(BZ_A)
    assert m["files"]["initrd.img"]["sha256"] == sha256((kdir / "initrd.img").read_bytes())
    assert _rows(cfg) == ["ka"]
    assert [x["url"] for x in download_log(cfg)] == [server.url("/a/bzImage")]
    # pulling again is a no-op that returns the same kernel
    again = banger_json("kernel", "pull", "ka")["data"]
    assert again["downloaded"] is False and again["pull_id"] == d["pull_id"]
    assert len(server.gets("/a/bzImage")) == 1
    assert list(cfg.staging_dir.iterdir()) == []


def test_elf_only_source_has_no_bzimage(cfg, catalog):
    d = banger_json("kernel", "pull", "kelf")["data"]
    assert d["bzimage"] is None and d["modules_dir"] is None
    assert (cfg.kernels_dir / "kelf" / "vmlinux").read_bytes() == ELF_A
    assert not (cfg.kernels_dir / "kelf" / "bzImage").exists()


def test_eight_parallel_pulls_download_once_and_readers_never_see_a_torn_manifest(cfg, catalog, server):
    server.bytes_per_s = len(BZ_A) / 1.5  # ~1.5 s download: the other seven really wait on the flock
    manifest = cfg.kernels_dir / "ka" / "manifest.json"
    reads = {"parsed": 0, "absent": 0, "bad": []}
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                text = manifest.read_text()
            except FileNotFoundError:
                reads["absent"] += 1
                continue
            try:
                assert json.loads(text)["pull_id"]
                reads["parsed"] += 1
            except Exception as e:  # noqa: BLE001 - recorded, asserted below
                reads["bad"].append(repr(e))

    th = threading.Thread(target=reader)
    th.start()
    try:
        procs = [_spawn_pull("ka") for _ in range(8)]
        outs = [p.communicate(timeout=300) for p in procs]
        # keep reading a moment after the last one returned, to a deadline (no fixed sleep)
        deadline = time.monotonic() + 5
        while reads["parsed"] < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        th.join()
    docs = [json.loads(o) for o, _e in outs]
    assert all(p.returncode == 0 for p in procs), [e for _o, e in outs]
    assert all(d["ok"] for d in docs)
    assert len({d["data"]["pull_id"] for d in docs}) == 1
    assert sum(d["data"]["downloaded"] for d in docs) == 1
    assert len(server.gets("/a/bzImage")) == 1                       # the server saw one download
    assert len([x for x in download_log(cfg) if x["name"] == "ka"]) == 1   # and banger logged one
    assert reads["bad"] == [] and reads["parsed"] > 0 and reads["absent"] > 0
    assert list(cfg.staging_dir.iterdir()) == []


def test_different_names_pull_in_parallel(cfg, catalog, server):
    server.bytes_per_s = max(len(BZ_A), len(BZ_B)) / 1.5  # each download takes ~1.5 s
    t0 = time.time()
    pa, pb = _spawn_pull("ka"), _spawn_pull("kb")
    oa, ob = pa.communicate(timeout=300), pb.communicate(timeout=300)
    assert pa.returncode == 0 and pb.returncode == 0, (oa, ob)
    (ga,), (gb,) = server.gets("/a/bzImage"), server.gets("/b/bzImage")
    overlap = min(ga["end"], gb["end"]) - max(ga["start"], gb["start"])
    print(f"\ndownload a {ga['start'] - t0:.2f}-{ga['end'] - t0:.2f}s, b {gb['start'] - t0:.2f}-{gb['end'] - t0:.2f}s,"
          f" overlap {overlap:.2f}s")
    shorter = min(ga["end"] - ga["start"], gb["end"] - gb["start"])
    assert shorter > 1.0
    # serialised pulls would not overlap at all; parallel ones overlap for most of the shorter download
    assert overlap > 0.6 * shorter, "the two kernels' downloads did not run at the same time"
    assert sorted(_rows(cfg)) == ["ka", "kb"]


def test_force_repull_replaces_atomically(cfg, catalog, server):
    first = banger_json("kernel", "pull", "ka")["data"]
    manifest = cfg.kernels_dir / "ka" / "manifest.json"
    seen, bad = set(), []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.add(json.loads(manifest.read_text())["pull_id"])
            except Exception as e:  # noqa: BLE001
                bad.append(repr(e))

    th = threading.Thread(target=reader)
    th.start()
    try:
        second = banger_json("kernel", "pull", "ka", "--force")["data"]
    finally:
        stop.set()
        th.join()
    assert second["downloaded"] and second["pull_id"] != first["pull_id"]
    assert bad == []                       # never absent, never torn, during the swap
    assert first["pull_id"] in seen
    assert json.loads(manifest.read_text())["pull_id"] == second["pull_id"]
    assert len(server.gets("/a/bzImage")) == 2
    assert list(cfg.staging_dir.iterdir()) == []


def test_sha256_mismatch_leaves_nothing(cfg, catalog, server):
    doc = banger_json("kernel", "pull", "kbad", check=False)
    assert doc["ok"] is False and doc["error"]["code"] == "integrity"
    assert "sha256 mismatch" in doc["error"]["message"] and doc["error"]["hint"]
    assert len(server.gets("/a/bzImage")) == 1
    _nothing_left(cfg, "kbad")
    assert download_log(cfg) == []


def test_sha256_mismatch_exit_code(cfg, catalog):
    from tests.support.cli import banger

    cp = banger("kernel", "pull", "kbad", check=False)
    assert cp.returncode == 8 and "sha256 mismatch" in cp.stderr and "hint:" in cp.stderr


def test_http_error_leaves_nothing(cfg, catalog):
    doc = banger_json("kernel", "pull", "k404", check=False)
    assert doc["error"]["code"] == "external" and "HTTP 404" in doc["error"]["message"]
    _nothing_left(cfg, "k404")


def test_url_entry_without_pinned_digest_needs_sha256(cfg, catalog, server):
    doc = banger_json("kernel", "pull", "knosha", check=False)
    assert doc["error"]["code"] == "usage" and "--sha256" in doc["error"]["hint"]
    assert server.requests == []                       # refused before any download
    bad = banger_json("kernel", "pull", "knosha", "--sha256", "12" * 32, check=False)
    assert bad["error"]["code"] == "integrity"
    _nothing_left(cfg, "knosha")
    ok = banger_json("kernel", "pull", "knosha", "--sha256", sha256(BZ_A))["data"]
    assert ok["version"] == "9.9.1-a"


def test_unknown_name_lists_the_catalog(cfg, catalog):
    from tests.support.cli import banger

    doc = banger_json("kernel", "pull", "no-such-kernel", check=False)
    assert doc["error"]["code"] == "not_found"
    assert "ka" in doc["error"]["hint"] and "kb" in doc["error"]["hint"]
    assert doc["error"]["details"]["catalog"] == ["k404", "ka", "kb", "kbad", "kelf", "knosha"]
    cp = banger("kernel", "pull", "no-such-kernel", check=False)
    assert cp.returncode == 3
    _nothing_left(cfg, "no-such-kernel")
    doc = banger_json("kernel", "pull", "../etc", check=False)
    assert doc["error"]["code"] == "invalid_name"


def test_resolve_auto_pulls_and_honours_auto_pull_false(cfg, catalog, server):
    from banger.context import Ctx
    from banger.errors import NotFound
    from banger.kernels import service as kernels

    ctx = Ctx(cfg)
    try:
        with pytest.raises(NotFound, match="not pulled") as ei:
            kernels.resolve(ctx, "kb", auto_pull=False)
        assert "banger kernel pull kb" in ei.value.hint
        assert server.requests == []
        with pytest.raises(NotFound) as ei:
            kernels.resolve(ctx, "nope")
        assert "ka" in ei.value.hint
        r = kernels.resolve(ctx, "kb")
        assert set(r) >= {"name", "version", "dir", "vmlinux", "bzimage", "initrd", "modules_dir", "manifest"}
        assert r["version"] == "9.9.2-b" and open(r["vmlinux"], "rb").read() == ELF_B
        assert kernels.resolve(ctx, "kb", auto_pull=False)["pull_id"] == r["pull_id"]
    finally:
        ctx.close()


def test_import_bzimage_with_modules(cfg, tmp_path):
    rel = "9.9.1-a"
    fake_module_tree(tmp_path / "root", release=rel)
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(BZ_A)
    d = banger_json("kernel", "import", bz, "--name", "mine", "--modules", tmp_path / "root")["data"]
    kdir = cfg.kernels_dir / "mine"
    assert d["version"] == rel and (kdir / "vmlinux").read_bytes() == ELF_A
    assert d["modules"][:2] == ["virtio_ring", "virtio"] and "virtio_net" in d["modules"]
    assert d["modules_dir"] == str(kdir / "modules" / rel)
    ents = newc_entries(kdir / "initrd.img")
    assert f"lib/modules/{rel}/virtio_net.ko" in ents
    # the name is taken now
    doc = banger_json("kernel", "import", bz, "--name", "mine", check=False)
    assert doc["error"]["code"] == "conflict"
    # a module tree for another kernel is refused, nothing left behind
    other = tmp_path / "other"
    fake_module_tree(other, release="1.2.3-other")
    doc = banger_json("kernel", "import", bz, "--name", "mine2", "--modules", other / "lib/modules/1.2.3-other",
                      check=False)
    assert doc["error"]["code"] == "usage" and "built for 1.2.3-other" in doc["error"]["message"]
    _nothing_left(cfg, "mine2")


def test_import_not_a_kernel(cfg, tmp_path):
    from tests.support.cli import banger

    junk = tmp_path / "notes.txt"
    junk.write_text("definitely not a kernel\n" * 50)
    doc = banger_json("kernel", "import", junk, "--name", "junk", check=False)
    assert doc["error"]["code"] == "not_a_kernel" and "not a Linux kernel" in doc["error"]["message"]
    assert doc["error"]["hint"]
    assert banger("kernel", "import", junk, "--name", "junk", check=False).returncode == 2
    _nothing_left(cfg, "junk")
    # an ELF that is not a kernel, and a truncated bzImage, are refused the same way
    so = tmp_path / "lib.so"
    so.write_bytes(fake_elf_kernel(etype=3))
    assert banger_json("kernel", "import", so, "--name", "junk", check=False)["error"]["code"] == "not_a_kernel"
    cut = tmp_path / "cut"
    cut.write_bytes(BZ_A[: len(BZ_A) // 2])
    assert banger_json("kernel", "import", cut, "--name", "junk", check=False)["error"]["code"] == "not_a_kernel"
    _nothing_left(cfg, "junk")
    doc = banger_json("kernel", "import", tmp_path / "missing", "--name", "junk", check=False)
    assert doc["error"]["code"] == "not_found"
    bad_initrd = tmp_path / "initrd"
    bad_initrd.write_text("not a cpio")
    vm = tmp_path / "vmlinux"
    vm.write_bytes(ELF_A)
    doc = banger_json("kernel", "import", vm, "--name", "junk", "--initrd", bad_initrd, check=False)
    assert doc["error"]["code"] == "usage" and "not an initramfs" in doc["error"]["message"]
    _nothing_left(cfg, "junk")


def test_list_show_rm_and_rm_refused_while_in_use(cfg, catalog):
    from tests.support.cli import banger

    assert banger_json("kernel", "list")["data"] == []
    banger_json("kernel", "pull", "ka")
    rows = banger_json("kernel", "list")["data"]
    assert [r["name"] for r in rows] == ["ka"] and rows[0]["version"] == "9.9.1-a" and rows[0]["size_bytes"] > 0
    everything = {r["name"]: r for r in banger_json("kernel", "list", "--all")["data"]}
    assert everything["kb"]["pulled"] is False and "ka" in everything
    shown = banger_json("kernel", "show", "ka")["data"]
    assert shown["pulled"] and shown["manifest"]["files"]["vmlinux"]["sha256"] == sha256(ELF_A)
    assert banger_json("kernel", "show", "kb")["data"]["pulled"] is False
    assert banger_json("kernel", "show", "zzz", check=False)["error"]["code"] == "not_found"
    assert "ka" in banger("kernel", "list").stdout

    now = time.time()
    with sqlite3.connect(cfg.db_path) as c:
        c.execute("INSERT INTO images (name, kind, rootfs, kernel, created_at) VALUES ('img1','test','/x','ka',?)",
                  (now,))
        c.execute("INSERT INTO vms (id, name, state, kernel, vcpu, memory_mib, overlay_size_mib, work_disk_size_mib,"
                  " slot, ip, mac, created_at, updated_at) VALUES ('v1','vm1','stopped','ka',1,512,64,64,1,"
                  "'172.30.0.2','02:00:00:00:00:01',?,?)", (now, now))
    doc = banger_json("kernel", "rm", "ka", check=False)
    assert doc["error"]["code"] == "conflict"
    assert doc["error"]["details"] == {"vms": ["vm1"], "images": ["img1"], "snapshots": []}
    assert "vm vm1" in doc["error"]["message"] and "image img1" in doc["error"]["message"]
    assert (cfg.kernels_dir / "ka" / "vmlinux").exists() and _rows(cfg) == ["ka"]
    assert banger_json("kernel", "show", "ka")["data"]["used_by"] == {"vms": ["vm1"], "images": ["img1"], "snapshots": []}
    with sqlite3.connect(cfg.db_path) as c:
        c.execute("DELETE FROM vms")
    assert banger_json("kernel", "rm", "ka", check=False)["error"]["details"]["images"] == ["img1"]
    with sqlite3.connect(cfg.db_path) as c:
        c.execute("DELETE FROM images")
    assert banger_json("kernel", "rm", "ka")["data"]["removed"] is True
    _nothing_left(cfg, "ka")
    assert banger_json("kernel", "rm", "ka", check=False)["error"]["code"] == "not_found"
    assert banger_json("kernel", "list")["data"] == []


def test_resolve_imported_kernel_and_missing_files(cfg, tmp_path, monkeypatch):
    import shutil

    from banger.context import Ctx
    from banger.errors import NotFound
    from banger.kernels import service as kernels

    monkeypatch.delenv("BANGER_KERNEL_CATALOG", raising=False)
    vm = tmp_path / "vmlinux"
    vm.write_bytes(ELF_B)
    banger_json("kernel", "import", vm, "--name", "own")
    ctx = Ctx(cfg)
    try:
        r = kernels.resolve(ctx, "own", auto_pull=False)
        assert r["version"] == "9.9.2-b" and r["bzimage"] is None
        shutil.rmtree(cfg.kernels_dir / "own")
        with pytest.raises(NotFound, match="files are missing") as ei:
            kernels.resolve(ctx, "own")
        assert "--force" in ei.value.hint
    finally:
        ctx.close()
    # the directory form of import (used to share a pulled kernel between homes) verifies hashes
    banger_json("kernel", "import", vm, "--name", "own", "--force")
    src = cfg.kernels_dir / "own"
    copy = banger_json("kernel", "import", src, "--name", "own2")["data"]
    assert open(copy["vmlinux"], "rb").read() == ELF_B
    tampered = tmp_path / "tampered"
    shutil.copytree(src, tampered)
    (tampered / "initrd.img").write_bytes(b"\x1f\x8b" + b"\0" * 100)
    doc = banger_json("kernel", "import", tampered, "--name", "own3", check=False)
    assert doc["error"]["code"] == "integrity" and "initrd.img" in doc["error"]["message"]
    _nothing_left(cfg, "own3")


def test_show_and_rm_never_queue_behind_a_download_of_the_same_kernel(cfg, catalog, server):
    """The slow work of a pull holds only kernel/<name>..pull; kernel/<name> is for the short publish."""
    banger_json("kernel", "pull", "ka")
    server.hold_after = len(BZ_A) // 2      # the re-pull parks mid-download until released
    p = _spawn_pull("ka", "--force")
    try:
        assert server.held.wait(120), "the forced pull never started downloading"
        t0 = time.monotonic()
        shown = banger_json("kernel", "show", "ka", timeout=60)["data"]
        removed = banger_json("kernel", "rm", "ka", timeout=60)["data"]
        took = time.monotonic() - t0
        assert p.poll() is None, "the pull should still be parked in its download"
        print(f"\nshow + rm while the same kernel downloads: {took:.2f}s")
        assert shown["pulled"] is True and removed["removed"] is True
        assert banger_json("kernel", "show", "ka")["data"]["pulled"] is False
    finally:
        server.release.set()
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert json.loads(out)["data"]["downloaded"] is True
    assert _rows(cfg) == ["ka"] and (cfg.kernels_dir / "ka" / "vmlinux").read_bytes() == ELF_A
    assert list(cfg.staging_dir.iterdir()) == []


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    apt = FakeApt(tmp_path / "apt")
    monkeypatch.setenv("PATH", f"{apt.bindir}:{os.environ['PATH']}")
    rel = "9.9.4-apt"
    elf = fake_elf_kernel(release=rel, size=1 << 20, seed=44)
    fake_module_tree(tmp_path / "mods", release=rel)
    deb = kernel_deb(tmp_path / "k.deb", rel, fake_bzimage(elf, "gzip", version=f"{rel} (t@b) #1"), tmp_path / "mods")
    apt.add(f"linux-image-{rel}", deb)
    apt.add("linux-image-9.9.5-nosha", deb, sha256=False)
    cat = write_catalog(tmp_path / "apt-kernels.json", [
        {"name": "kapt", "source": {"type": "apt", "package": f"linux-image-{rel}"}},
        {"name": "knosha", "source": {"type": "apt", "package": "linux-image-9.9.5-nosha"}}])
    monkeypatch.setenv("BANGER_KERNEL_CATALOG", str(cat))
    apt.elf, apt.release = elf, rel
    return apt


def test_apt_downloads_into_a_dir_only_apt_and_root_can_write(cfg, fake_apt):
    import pwd

    d = banger_json("kernel", "pull", "kapt")["data"]
    assert d["version"] == fake_apt.release and d["source"]["downloaded"] is True
    assert (cfg.kernels_dir / "kapt" / "vmlinux").read_bytes() == fake_apt.elf
    [line] = fake_apt.download_dirs()
    mode, owner, group = line.split()
    try:
        apt_user = pwd.getpwnam("_apt").pw_name
    except KeyError:
        apt_user = "root"
    assert int(mode, 8) & 0o077 == 0, f"apt's download dir is mode {mode}"      # was 777
    assert (owner, group) == (apt_user, "root")
    assert list(cfg.staging_dir.iterdir()) == []


def test_apt_package_without_sha256_is_refused_before_any_download(cfg, fake_apt):
    doc = banger_json("kernel", "pull", "knosha", check=False)
    assert doc["ok"] is False and doc["error"]["code"] == "integrity"
    assert "SHA256" in doc["error"]["message"] and "apt-get update" in doc["error"]["hint"]
    assert fake_apt.download_dirs() == []
    _nothing_left(cfg, "knosha")
    assert download_log(cfg) == []
