# ruff: noqa: F811  (pytest fixtures imported from tests.support)
"""OCI pull against a real registry (docker-registry) on loopback, images pushed by our own client."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.support.cli import banger_json
from tests.support.images import assert_nothing_left, ext4_cat, ext4_ls, ext4_stat, fsck_clean
from tests.support.procs import spawn_py
from tests.support.registry import AuthFront, layer, registry  # noqa: F401  (fixture)

BASE = [
    ("dir", "bin", 0o755, 0, 0),
    ("file", "bin/sh", b"#!fake shell\n", 0o755, 0, 0),
    ("dir", "etc", 0o755, 0, 0),
    ("file", "etc/os-release", b'ID=testos\nVERSION_ID="1"\nPRETTY_NAME="Test OS 1"\n'),
    ("file", "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
    ("dir", "root", 0o700, 0, 0),
    ("file", "root/.profile", b"echo hi\n", 0o644, 0, 0),
]


def _pull(ref: str, *extra, check=True) -> dict:
    return banger_json("image", "pull", ref, *extra, check=check)


def test_multilayer_whiteouts_opaque_gzip_zstd(banger_env, cfg, registry):
    l1 = layer(BASE + [
        ("dir", "etc/app", 0o755, 0, 0),
        ("file", "etc/app/a.conf", b"a"),
        ("file", "etc/app/b.conf", b"b"),
        ("file", "etc/motd", b"old motd\n"),
        ("dir", "srv", 0o2750, 33, 33),
        ("file", "srv/data", b"data", 0o640, 33, 33),
        ("dir", "usr/sbin", 0o755, 0, 0),
        ("file", "usr/sbin/sshd", b"#!fake sshd\n", 0o755, 0, 0),
        ("dir", "etc/ssh", 0o755, 0, 0),
        ("file", "etc/ssh/sshd_config", b"Port 22\nUsePAM yes\n"),
        ("file", "etc/ssh/ssh_host_ed25519_key", b"BAKED SECRET", 0o600, 0, 0),
    ], "gzip")
    l2 = layer([
        ("whiteout", "etc/motd"),
        ("opaque", "etc/app"),
        ("file", "etc/app/c.conf", b"c", 0o600, 1000, 1000),
        ("file", "usr/bin/su", b"#!fake su\n", 0o4755, 0, 0),
        ("symlink", "usr/bin/sudo", "su"),
    ], "zstd")
    l3 = layer([("hardlink", "usr/bin/su2", "usr/bin/su"), ("file", "etc/layer3", b"3")], "none")
    img = registry.push_image("test/multi", "v1", [l1, l2, l3])
    doc = _pull(f"{registry.host}/test/multi:v1", "--name", "multi")
    d = doc["data"]
    assert d["name"] == "multi" and d["kind"] == "oci" and d["digest"] == img["digest"]
    assert d["has_sshd"] is True and d["init"] == "/sbin/banger-init"
    assert [ly["mediaType"].rsplit(".", 1)[-1] for ly in d["meta"]["layers"]] == ["tar+gzip", "tar+zstd", "tar"]
    assert d["meta"]["os"] == {"id": "testos", "version_id": "1", "pretty_name": "Test OS 1"}
    rootfs = Path(d["rootfs"])
    ok, out = fsck_clean(rootfs)
    assert ok, out
    # whiteout + opaque
    assert "motd" not in ext4_ls(rootfs, "/etc")
    assert ext4_ls(rootfs, "/etc/app") == ["c.conf"]
    assert ext4_stat(rootfs, "/etc/app/c.conf") | {} == {"type": "regular", "mode": 0o600, "uid": 1000, "gid": 1000,
                                                          "size": 1, "links": 1}
    # owners and modes, setuid and setgid kept
    s = ext4_stat(rootfs, "/srv")
    assert (s["mode"], s["uid"], s["gid"]) == (0o2750, 33, 33)
    s = ext4_stat(rootfs, "/usr/bin/su")
    assert (s["mode"], s["uid"], s["links"]) == (0o4755, 0, 2)
    assert ext4_stat(rootfs, "/usr/bin/sudo")["type"] == "symlink"
    assert ext4_cat(rootfs, "/etc/layer3") == b"3"
    # banger's guest files; baked host keys gone; the sshd snippet wins (included first)
    s = ext4_stat(rootfs, "/sbin/banger-init")
    assert (s["mode"], s["uid"]) == (0o755, 0)
    assert ext4_cat(rootfs, "/sbin/banger-init").startswith(b"#!/bin/sh")
    assert "ssh_host_ed25519_key" not in ext4_ls(rootfs, "/etc/ssh")
    cfgtext = ext4_cat(rootfs, "/etc/ssh/sshd_config").decode()
    assert cfgtext.startswith("Include /etc/ssh/sshd_config.d/*.conf\n") and "Port 22" in cfgtext
    assert b"UsePAM no" in ext4_cat(rootfs, "/etc/ssh/sshd_config.d/banger.conf")
    assert b'SSHD_ARGS="-D -e"' in ext4_cat(rootfs, "/etc/banger/init.conf")
    assert b"devpts" in ext4_cat(rootfs, "/etc/banger/fstab")
    # the work seed: the image's /root plus banger's key (0700/0600, root)
    seed = Path(d["work_seed"])
    assert fsck_clean(seed)[0]
    assert os.path.getsize(seed) == 64 << 20
    assert ext4_ls(seed, "/") == [".profile", ".ssh", "lost+found"]
    assert ext4_stat(seed, "/")["mode"] == 0o700
    assert ext4_stat(seed, "/.ssh")["mode"] == 0o700
    s = ext4_stat(seed, "/.ssh/authorized_keys")
    assert (s["mode"], s["uid"], s["gid"]) == (0o600, 0, 0)
    pub = (cfg.ssh_dir / "id_ed25519.pub").read_text().split()[:2]
    assert ext4_cat(seed, "/.ssh/authorized_keys").decode().split() == pub
    from banger.guest.sshkeys import fingerprint

    assert d["key_fingerprint"] == fingerprint(" ".join(pub))
    # blobs cached by digest (verified), metadata written, nothing left in staging
    for ly in img["layers"]:
        assert (cfg.cache_dir / "blobs/sha256" / ly["digest"][7:]).is_file()
    assert json.loads((cfg.images_dir / "multi/meta.json").read_text())["digest"] == img["digest"]
    assert list(cfg.staging_dir.iterdir()) == []
    # ls / show / rm through the CLI
    assert [r["name"] for r in banger_json("image", "ls")["data"]] == ["multi"]
    assert banger_json("image", "show", "multi")["data"]["source"] == f"{registry.host}/test/multi:v1"
    # pulling the same ref again is a no-op; a different ref under the same name is a conflict
    again = _pull(f"{registry.host}/test/multi:v1", "--name", "multi")["data"]
    assert again["existing"] is True and again["meta"]["pull_id"] == d["meta"]["pull_id"]
    registry.push_image("test/other", "v1", [layer(BASE, "gzip")])
    err = _pull(f"{registry.host}/test/other:v1", "--name", "multi", check=False)
    assert err["ok"] is False and err["error"]["code"] == "conflict"
    banger_json("image", "rm", "multi")
    assert not (cfg.images_dir / "multi").exists()
    assert banger_json("image", "ls")["data"] == []


def test_index_picks_linux_amd64(banger_env, cfg, registry):
    imgs = []
    for arch in ("arm64", "amd64", "s390x"):
        imgs.append((registry.push_image("test/multiarch", None, [layer(BASE + [("file", "arch", arch.encode())])],
                                         arch=arch), "linux", arch))
    idx = registry.push_index("test/multiarch", "latest", imgs)
    d = _pull(f"{registry.host}/test/multiarch")["data"]
    assert d["name"] == "multiarch"
    assert d["digest"] == imgs[1][0]["digest"] and d["meta"]["index_digest"] == idx
    assert ext4_cat(d["rootfs"], "/arch") == b"amd64"
    assert d["has_sshd"] is False  # still a valid image; vm run refuses it later
    # an index without linux/amd64 is a clear not-found
    registry.push_index("test/multiarch", "armonly", [imgs[0]])
    err = _pull(f"{registry.host}/test/multiarch:armonly", check=False)
    assert err["error"]["code"] == "not_found" and "linux/amd64" in err["error"]["message"]
    assert_nothing_left(cfg, "multiarch-armonly")


def test_missing_tag_leaves_nothing(banger_env, cfg, registry):
    registry.push_image("test/tagged", "v1", [layer(BASE)])
    err = _pull(f"{registry.host}/test/tagged:nope", "--name", "nope", check=False)
    assert err["ok"] is False and err["error"]["code"] == "not_found"
    assert "tag" in err["error"]["hint"]
    assert_nothing_left(cfg, "nope")


def test_bad_blob_digest_leaves_nothing(banger_env, cfg, registry, tmp_path):
    img = registry.push_image("test/corrupt", "v1", [layer(BASE + [("file", "big", os.urandom(20000))])])
    # corrupt the stored layer blob inside the real registry's storage
    hexd = img["layers"][0]["digest"][7:]
    storage = Path(registry.storage) / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    data = bytearray(storage.read_bytes())
    data[100] ^= 0xFF
    storage.write_bytes(bytes(data))
    err = _pull(f"{registry.host}/test/corrupt:v1", "--name", "corrupt", check=False)
    assert err["ok"] is False and err["error"]["code"] == "integrity"
    assert "digest mismatch" in err["error"]["message"]
    assert_nothing_left(cfg, "corrupt")
    assert not (cfg.cache_dir / "blobs/sha256" / hexd).exists()


def test_manifest_digest_mismatch(banger_env, cfg, registry):
    img = registry.push_image("test/mdig", "v1", [layer(BASE)])
    # ask for the manifest by a digest the registry stores under a different content: corrupt the stored manifest
    hexd = img["digest"][7:]
    storage = Path(registry.storage) / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    doc = json.loads(storage.read_bytes())
    doc["annotations"] = {"tampered": "yes"}
    storage.write_bytes(json.dumps(doc).encode())
    err = _pull(f"{registry.host}/test/mdig@{img['digest']}", "--name", "mdig", check=False)
    assert err["ok"] is False and err["error"]["code"] == "integrity", err
    assert_nothing_left(cfg, "mdig")


def test_hostile_layer_pull_refused(banger_env, cfg, registry, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("original\n")
    rel = os.path.relpath(outside, "/")
    hostile = layer(BASE + [("symlink", "escape", "../" * 40 + rel), ("file", "escape/victim", b"pwned")])
    registry.push_image("test/hostile", "v1", [hostile])
    err = _pull(f"{registry.host}/test/hostile:v1", "--name", "hostile", check=False)
    assert err["ok"] is False and err["error"]["code"] == "unsafe_layer"
    assert "refused" in err["error"]["message"]
    assert (outside / "victim").read_text() == "original\n" and os.listdir(outside) == ["victim"]
    assert_nothing_left(cfg, "hostile")


def test_token_auth_flow(banger_env, cfg, registry):
    img = registry.push_image("test/authd", "v1", [layer(BASE, "zstd")])
    with AuthFront(registry.url) as front:
        d = _pull(f"{front.host}/test/authd:v1", "--name", "authd")["data"]
    assert d["digest"] == img["digest"]
    assert front.token_requests and front.token_requests[0] == {"service": "banger-test",
                                                                "scope": "repository:test/authd:pull"}
    statuses = [(m, p.split("?")[0], st) for _, m, p, st in front.log]
    assert statuses[0][2] == 401 and statuses[1][1] == "/token"
    assert all(st == 200 for _, _, st in statuses[1:])


def test_four_processes_pull_once_and_two_names_overlap(banger_env, cfg, registry):
    layers = [layer(BASE + [("file", f"f{i}", os.urandom(30000))], "gzip") for i in range(3)]
    img = registry.push_image("test/shared", "v1", layers)
    other = registry.push_image("test/second", "v1", [layer(BASE + [("file", "g", os.urandom(30000))]) for _ in range(2)])
    code = """
import json, subprocess, sys
cp = subprocess.run([sys.executable, "-m", "banger.cli.main", "image", "pull", sys.argv[1], "--name", sys.argv[2],
                     "--json"], capture_output=True, text=True)
print(cp.stdout)
"""
    with AuthFront(registry.url, blob_delay=0.4) as front:
        procs = [spawn_py(code, f"{front.host}/test/shared:v1", "shared") for _ in range(4)]
        procs += [spawn_py(code, f"{front.host}/test/second:v1", "second")]
        outs = []
        for p in procs:
            out, errs = p.communicate(timeout=300)
            outs.append(json.loads(out.strip().splitlines()[-1]))
    for o in outs:
        assert o["ok"], o
    shared = [o["data"] for o in outs[:4]]
    # one process did the work: one pull id, one download of each layer, three found it existing
    assert len({s["meta"]["pull_id"] for s in shared}) == 1
    assert sorted(bool(s.get("existing")) for s in shared) == [False, True, True, True]
    digests = {ly["digest"] for ly in img["layers"]}
    assert sorted(front.blob_gets(digests)) == sorted(digests)
    # the two names did not wait for each other: their blob download windows overlap
    def window(repo):
        ts = [t for t, m, p, st in front.log if f"/v2/{repo}/blobs/" in p and st == 200]
        return min(ts), max(ts)
    a, b = window("test/shared"), window("test/second")
    assert a[0] < b[1] and b[0] < a[1], (a, b)
    assert sorted(r["name"] for r in banger_json("image", "ls")["data"]) == ["second", "shared"]
    assert outs[4]["data"]["digest"] == other["digest"]
