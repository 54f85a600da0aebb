# ruff: noqa: F811  (pytest fixtures imported from tests.support)
"""Hostile registries and layers against the real pull: a real docker-registry on loopback behind
a front that trickles, stalls, oversends, undersends, serves oversized or malformed metadata or
names a plain-http token service; gzip bombs, entry floods and a full disk; hostile tar headers.

Every pull must end with a clear error and its documented exit code, and leave nothing: no
staging dir, no .part blob, no image row, and no socket held open to the registry.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from banger.errors import EXIT_EXTERNAL, EXIT_HOST, EXIT_TIMEOUT, LimitExceeded
from banger.images.sources.oci.layers import ENTRY_COST, BadLayer, LayerApplier, UnsafeLayer, apply_layer
from tests.support.cli import banger
from tests.support.images import assert_nothing_left
from tests.support.registry import (
    MT_CONFIG,
    MT_GZIP,
    MT_INDEX,
    MT_MANIFEST,
    HostileFront,
    TokenServer,
    bomb_layer,
    layer,
    registry,  # noqa: F401  (fixture)
)

BASE = [
    ("dir", "bin", 0o755, 0, 0),
    ("file", "bin/sh", b"#!fake shell\n", 0o755, 0, 0),
    ("dir", "etc", 0o755, 0, 0),
    ("file", "etc/os-release", b'ID=testos\nVERSION_ID="1"\n'),
    ("file", "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
    ("dir", "root", 0o700, 0, 0),
]
STALL_S = 3.0


def _config(cfg, **keys) -> None:
    cfg.home.mkdir(parents=True, exist_ok=True)
    (cfg.home / "config.toml").write_text("".join(f"{k} = {v!r}\n" for k, v in keys.items()))


def _pull(ref: str, *extra, timeout: float = 90) -> tuple[dict, int, float]:
    t0 = time.monotonic()
    cp = banger("image", "pull", ref, *extra, "--json", check=False, timeout=timeout)
    elapsed = time.monotonic() - t0
    try:
        doc = json.loads(cp.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"not JSON: {cp.stdout!r}\nstderr: {cp.stderr}") from e
    return doc, cp.returncode, elapsed


def _nothing_left(cfg, name: str) -> None:
    assert_nothing_left(cfg, name)
    parts = [str(p) for p in cfg.home.rglob("*.part")]
    assert parts == [], f".part files left: {parts}"
    blobs = cfg.cache_dir / "blobs" / "sha256"
    assert not blobs.exists() or all(not p.name.startswith(".") for p in blobs.iterdir())


def _until(pred, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _fail(doc: dict, rc: int, code: str, exit_code: int, *words: str) -> dict:
    assert doc["ok"] is False, doc
    err = doc["error"]
    assert err["code"] == code, err
    assert rc == exit_code, (rc, err)
    for w in words:
        assert w in err["message"], (w, err["message"])
    assert err["hint"], err
    return err


@pytest.fixture
def image(registry):
    """A small valid image with one 64 KiB (incompressible) layer: (pushed, layer digest)."""
    def push(repo: str):
        img = registry.push_image(repo, "v1", [layer(BASE + [("file", "noise", os.urandom(65536))])])
        return img, img["layers"][0]["digest"]
    return push


# ---------------------------------------------------------------- stalls: trickles and silence
@pytest.mark.parametrize("target,behaviour", [
    ("layer", {"do": "trickle", "every": 0.25}),          # the body, a byte every 0.25 s (a 64 KiB blob)
    ("manifest", {"do": "trickle_headers", "every": 0.25}),  # the response headers, a byte at a time
    ("config", {"do": "silent"}),                         # headers, then nothing at all
    ("manifest", {"do": "trickle", "every": 0.25}),
], ids=["layer-body", "manifest-headers", "config-silent", "manifest-body"])
def test_stalled_transfer_times_out(banger_env, cfg, registry, image, target, behaviour):
    img, layer_digest = image(f"hostile/stall-{target}-{behaviour['do'].replace('_', '-')}")
    match = {"layer": lambda p: f"/blobs/{layer_digest}" in p,
             "config": lambda p: f"/blobs/{img['config']['digest']}" in p,
             "manifest": lambda p: "/manifests/" in p}[target]
    _config(cfg, pull_stall_timeout_s=STALL_S)
    repo = f"hostile/stall-{target}-{behaviour['do'].replace('_', '-')}"
    with HostileFront(registry.url, [(match, behaviour)]) as front:
        doc, rc, elapsed = _pull(f"{front.host}/{repo}:v1", "--name", "stalled", timeout=60)
        _fail(doc, rc, "timeout", EXIT_TIMEOUT, "stalled")
        hostile = front.entries(behaviour["do"])
        assert hostile, front.log
        # the client let go of the socket: the front's next write (or read) found it closed
        _until(lambda: all(e["hung_up"] for e in hostile), what="the client to hang up")
    # ended by the stall window (STALL_S), not by the 60 s read timeout, nor by the trickle finishing
    assert elapsed < 30, elapsed
    assert all(e["sent"] < 2000 for e in hostile if behaviour["do"] != "silent"), hostile
    _nothing_left(cfg, "stalled")


# ---------------------------------------------------------------- blobs: exactly the descriptor's size
@pytest.mark.parametrize("behaviour,words", [
    ({"do": "oversend", "extra": 64 << 20, "length": "none"}, ["sent more than", "descriptor"]),
    ({"do": "oversend", "extra": 4096, "length": "claimed"}, ["announces", "descriptor says"]),
    ({"do": "undersend", "missing": 100, "length": "claimed"}, ["announces", "descriptor says"]),
    ({"do": "undersend", "missing": 100, "length": "none"}, ["ended after", "descriptor says"]),
], ids=["oversend-unannounced", "oversend-announced", "undersend-announced", "undersend-unannounced"])
def test_blob_must_be_descriptor_size(banger_env, cfg, registry, image, behaviour, words):
    repo = f"hostile/size-{behaviour['do']}-{behaviour['length']}"
    img, layer_digest = image(repo)
    with HostileFront(registry.url, [(lambda p: f"/blobs/{layer_digest}" in p, behaviour)]) as front:
        doc, rc, _ = _pull(f"{front.host}/{repo}:v1", "--name", "sized", timeout=60)
        _fail(doc, rc, "integrity", EXIT_EXTERNAL, *words)
        if behaviour["do"] == "oversend" and behaviour["length"] == "none":
            # banger stopped reading one byte past the descriptor: the front could not push 64 MiB
            e = front.entries("oversend")[0]
            _until(lambda: e["hung_up"], what="the client to hang up")
            assert e["sent"] < (64 << 20), e
    _nothing_left(cfg, "sized")
    assert not (cfg.cache_dir / "blobs/sha256" / layer_digest[7:]).exists()


# ---------------------------------------------------------------- metadata: capped at 4 MiB
def _padded_manifest(size: int) -> bytes:
    head = b'{"schemaVersion": 2, "mediaType": "' + MT_MANIFEST.encode() + b'", "pad": "'
    return head + b"a" * (size - len(head) - 2) + b'"}'


@pytest.mark.parametrize("body,chunked,words", [
    (_padded_manifest(5 << 20), False, ["5242880 bytes (5.0 MiB)", "at most 4194304 bytes (4.0 MiB)"]),
    (_padded_manifest(64 << 20), True, ["larger than 4194304 bytes (4.0 MiB)", "stopped reading"]),
], ids=["announced-5MiB", "chunked-64MiB"])
def test_oversize_manifest_refused(banger_env, cfg, registry, body, chunked, words):
    rule = {"do": "serve", "body": body, "chunked": chunked}
    with HostileFront(registry.url, [(lambda p: "/manifests/" in p, rule)]) as front:
        doc, rc, _ = _pull(f"{front.host}/hostile/bigmanifest:v1", "--name", "bigmanifest")
        _fail(doc, rc, "limit_exceeded", EXIT_EXTERNAL, "manifest v1", *words)
        if chunked:
            e = front.entries("serve")[0]
            _until(lambda: e["hung_up"], what="the client to hang up")
            assert e["sent"] < (32 << 20), e  # read streamed and dropped, never all 64 MiB
    _nothing_left(cfg, "bigmanifest")


def test_oversize_config_refused_before_download(banger_env, cfg, registry):
    lblob, mt, _ = layer(BASE)
    ld = registry.push_blob("hostile/bigconfig", lblob)
    cfg_digest = "sha256:" + "c" * 64
    manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
                "config": {"mediaType": MT_CONFIG, "digest": cfg_digest, "size": 5 << 20},
                "layers": [{"mediaType": mt, "digest": ld, "size": len(lblob)}]}
    rule = {"do": "serve", "body": json.dumps(manifest).encode()}
    with HostileFront(registry.url, [(lambda p: "/manifests/" in p, rule)]) as front:
        doc, rc, _ = _pull(f"{front.host}/hostile/bigconfig:v1", "--name", "bigconfig")
        _fail(doc, rc, "limit_exceeded", EXIT_EXTERNAL, "image config", "5242880 bytes (5.0 MiB)",
              "4194304 bytes (4.0 MiB)")
        assert not [e for e in front.log if "/blobs/" in e["path"]], front.log
    _nothing_left(cfg, "bigconfig")


# ---------------------------------------------------------------- metadata: malformed documents
_D = "sha256:" + "d" * 64
_GOOD_CFG = {"mediaType": MT_CONFIG, "digest": _D, "size": 100}
_GOOD_LAYER = {"mediaType": MT_GZIP, "digest": _D, "size": 100}


def _m(**over) -> dict:
    doc = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": _GOOD_CFG, "layers": [_GOOD_LAYER]}
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


@pytest.mark.parametrize("doc,code,words", [
    (_m(mediaType="application/vnd.oci.artifact.manifest.v1+json"), "bad_manifest",
     ["mediaType is 'application/vnd.oci.artifact.manifest.v1+json'"]),
    (_m(schemaVersion=1), "bad_manifest", ["schema 1"]),
    (_m(schemaVersion="2"), "bad_manifest", ["schemaVersion is '2'"]),
    (_m(config=None), "bad_manifest", ["no config descriptor"]),
    (_m(config={**_GOOD_CFG, "mediaType": "application/vnd.cncf.helm.config.v1+json"}), "bad_manifest",
     ["config.mediaType is 'application/vnd.cncf.helm.config.v1+json'"]),
    (_m(config={**_GOOD_CFG, "digest": "sha256:XYZ"}), "bad_manifest", ["config.digest is 'sha256:XYZ'"]),
    (_m(layers=[{**_GOOD_LAYER, "digest": "md5:abc"}]), "bad_manifest", ["layers[0].digest 'md5:abc'"]),
    (_m(layers=[{**_GOOD_LAYER, "digest": 7}]), "bad_manifest", ["layers[0].digest is 7"]),
    (_m(layers=[{**_GOOD_LAYER, "size": -1}]), "bad_manifest", ["layers[0].size is -1"]),
    (_m(layers=[{**_GOOD_LAYER, "size": "100"}]), "bad_manifest", ["layers[0].size is '100'"]),
    (_m(layers=[{**_GOOD_LAYER, "size": True}]), "bad_manifest", ["layers[0].size is True"]),
    (_m(layers=[{**_GOOD_LAYER, "size": None}]), "bad_manifest", ["layers[0].size is None"]),
    (_m(layers={"0": _GOOD_LAYER}), "bad_manifest", ["layers is an object"]),
    (_m(layers=None), "bad_manifest", ["layers is null"]),
    (_m(layers=["x"]), "bad_manifest", ["layers[0] is a string"]),
    (_m(layers=[{**_GOOD_LAYER, "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"}]),
     "bad_manifest", ["layers[0].mediaType is unsupported"]),
    (_m(layers=[_GOOD_LAYER] * 1000), "limit_exceeded", ["has 1000 layers", "at most 500"]),
    ([1, 2, 3], "bad_manifest", ["is an array, not a JSON object"]),
    (b"[" * 200_000 + b"]" * 200_000, "bad_manifest", ["not valid JSON"]),
    (b"\xff\xfe{}", "bad_manifest", ["not valid JSON"]),
    ({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": {"a": 1}}, "bad_manifest",
     ["manifests is an object"]),
    ({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [{"digest": _D, "size": 1, "platform": "linux"}]},
     "bad_manifest", ["manifests[0].platform is 'linux'"]),
    ({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [{"digest": "sha256:1", "size": 1}]},
     "bad_manifest", ["manifests[0].digest is 'sha256:1'"]),
    ({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [{"digest": _D, "size": 1}] * 5000},
     "limit_exceeded", ["5000 manifests", "at most 1024"]),
], ids=["wrong-mediatype", "schema1", "schema-string", "no-config", "artifact-config", "config-digest",
        "digest-algorithm", "digest-number", "size-negative", "size-string", "size-bool", "size-missing",
        "layers-object", "layers-missing", "layer-string", "foreign-layer", "layer-flood", "toplevel-array",
        "deep-nesting", "not-utf8", "index-manifests-object", "index-platform-string", "index-digest",
        "index-flood"])
def test_malformed_manifest_clear_error(banger_env, cfg, registry, doc, code, words):
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    ctype = MT_INDEX if isinstance(doc, dict) and doc.get("mediaType") == MT_INDEX else MT_MANIFEST
    rule = {"do": "serve", "body": body, "content_type": ctype}
    with HostileFront(registry.url, [(lambda p: "/manifests/" in p, rule)]) as front:
        doc_, rc, _ = _pull(f"{front.host}/hostile/malformed:v1", "--name", "malformed")
    _fail(doc_, rc, code, EXIT_EXTERNAL, *words)
    _nothing_left(cfg, "malformed")


@pytest.mark.parametrize("config,words", [
    (b"[1, 2]", ["image config is an array"]),
    (json.dumps({"config": "sh"}).encode(), ["config is a string"]),
    (json.dumps({"config": {"Env": "PATH=/bin"}}).encode(), ["config.Env is 'PATH=/bin'"]),
    (json.dumps({"config": {"Cmd": [1]}}).encode(), ["config.Cmd is [1]"]),
], ids=["array", "config-string", "env-string", "cmd-numbers"])
def test_malformed_config_clear_error(banger_env, cfg, registry, config, words):
    repo = "hostile/badconfig"
    lblob, mt, _ = layer(BASE)
    ld = registry.push_blob(repo, lblob)
    cd = registry.push_blob(repo, config)
    manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
                "config": {"mediaType": MT_CONFIG, "digest": cd, "size": len(config)},
                "layers": [{"mediaType": mt, "digest": ld, "size": len(lblob)}]}
    registry.push_manifest(repo, "v1", manifest)
    doc, rc, _ = _pull(f"{registry.host}/{repo}:v1", "--name", "badconfig")
    _fail(doc, rc, "bad_manifest", EXIT_EXTERNAL, *words)
    _nothing_left(cfg, "badconfig")


# ---------------------------------------------------------------- token realms: https unless --insecure
def test_plain_http_realm_refused_unless_insecure(banger_env, cfg, registry):
    img = registry.push_image("hostile/realm", "v1", [layer(BASE)])
    with TokenServer("tok-" + os.urandom(6).hex()) as ts, \
            HostileFront(registry.url, realm=f"{ts.url}/token", token=ts.token) as front:
        doc, rc, _ = _pull(f"{front.host}/hostile/realm:v1", "--name", "realm")
        _fail(doc, rc, "insecure_realm", EXIT_EXTERNAL, "plain http", ts.url)
        assert "--insecure" in doc["error"]["hint"]
        assert ts.requests == [], "the token service must not be contacted"
        _nothing_left(cfg, "realm")
        # the same registry with --insecure: the user vouched for the network, the pull works
        doc, rc, _ = _pull(f"{front.host}/hostile/realm:v1", "--name", "realm", "--insecure")
        assert doc["ok"] and rc == 0, doc
        assert doc["data"]["digest"] == img["digest"]
        assert len(ts.requests) == 1 and ts.requests[0].startswith("/token?")


# ---------------------------------------------------------------- the image budget: bombs and floods
def _push_layers(registry, repo: str, blobs: list[bytes]) -> dict:
    descs = [{"mediaType": MT_GZIP, "digest": registry.push_blob(repo, b), "size": len(b)} for b in blobs]
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
                         "config": {}}).encode()
    cdesc = {"mediaType": MT_CONFIG, "digest": registry.push_blob(repo, config), "size": len(config)}
    manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": cdesc, "layers": descs}
    d, _ = registry.push_manifest(repo, "v1", manifest)
    return {"digest": d, "layers": descs}


def _flood_layer(n: int) -> bytes:
    import gzip

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(n):
            ti = tarfile.TarInfo(f"f{i:06d}")
            ti.mtime = 1_700_000_000
            tf.addfile(ti)
    return gzip.compress(buf.getvalue(), compresslevel=1, mtime=0)


@pytest.mark.parametrize("files", [
    [("zero", 20 << 30)],                                # one 20 GiB file of zeros in a 19 MiB blob
    [(f"z{i:04d}", 8 << 20) for i in range(2560)],       # 20 GiB as 2560 files of 8 MiB
], ids=["one-20GiB-file", "2560-files-of-8MiB"])
def test_gzip_bomb_stops_at_budget(banger_env, cfg, registry, files, record_property):
    blob = bomb_layer(files)
    assert len(blob) < 24 << 20
    repo = f"hostile/bomb{len(files)}"
    _push_layers(registry, repo, [layer(BASE)[0], blob])
    _config(cfg, max_image_size_mib=64)
    doc, rc, elapsed = _pull(f"{registry.host}/{repo}:v1", "--name", "bomb", timeout=60)
    record_property("bomb_pull_failed_after_s", round(elapsed, 2))
    print(f"\ngzip bomb {len(files)} file(s): pull failed after {elapsed:.2f} s")
    err = _fail(doc, rc, "limit_exceeded", EXIT_EXTERNAL, "max_image_size_mib = 64",
                "more than 67108864 bytes (64.0 MiB)")
    assert "raise max_image_size_mib" in err["hint"]
    assert err["details"]["used_bytes"] <= 64 << 20
    assert elapsed < 45, elapsed  # stopped at the budget, not after writing 20 GiB
    _nothing_left(cfg, "bomb")


def test_entry_flood_counts_per_entry(banger_env, cfg, registry):
    # 40000 empty files: 20 MiB of tar, but 40000 inodes; at 4 KiB an entry, 64 MiB holds 16384
    repo = "hostile/flood"
    _push_layers(registry, repo, [layer(BASE)[0], _flood_layer(40_000)])
    _config(cfg, max_image_size_mib=64)
    doc, rc, _ = _pull(f"{registry.host}/{repo}:v1", "--name", "flood")
    _fail(doc, rc, "limit_exceeded", EXIT_EXTERNAL, "max_image_size_mib = 64")
    _nothing_left(cfg, "flood")


@pytest.fixture
def small_home(banger_env, cfg):
    """BANGER_HOME on its own 320 MiB tmpfs: a real small filesystem to fill."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320m,mode=0755", "tmpfs", str(cfg.home)], check=True)
    try:
        yield cfg
    finally:
        subprocess.run(["umount", "-l", str(cfg.home)], check=False)


@pytest.mark.parametrize("files", [
    [("zero", 20 << 30)],
    [(f"z{i:04d}", 8 << 20) for i in range(2560)],
], ids=["one-20GiB-file", "2560-files-of-8MiB"])
def test_bomb_on_small_disk_is_no_space_not_enospc(small_home, registry, files):
    cfg = small_home
    repo = f"hostile/diskbomb{len(files)}"
    _push_layers(registry, repo, [layer(BASE)[0], bomb_layer(files)])
    _config(cfg, max_image_size_mib=1 << 24)  # the budget allows it: only the disk can say no
    doc, rc, _ = _pull(f"{registry.host}/{repo}:v1", "--name", "diskbomb", timeout=60)
    _fail(doc, rc, "no_space", EXIT_HOST, "not enough free space", "free")
    _nothing_left(cfg, "diskbomb")
    st = os.statvfs(cfg.home)
    assert st.f_bavail * st.f_frsize > 200 << 20  # the staging tree is gone again


def test_budget_spans_layers(tmp_path):
    root = tmp_path / "root"
    blobs = [tmp_path / "l0", tmp_path / "l1"]
    blobs[0].write_bytes(bomb_layer([("a", 40 << 20)]))
    blobs[1].write_bytes(bomb_layer([("b", 40 << 20)]))
    a = LayerApplier(root, max_bytes=64 << 20)
    apply_layer(root, blobs[0], applier=a, layer="L0")
    assert a.used == ENTRY_COST + (40 << 20)
    with pytest.raises(LimitExceeded, match=r"layer L1: entry 'b' is 41943040 bytes \(40.0 MiB\)"):
        apply_layer(root, blobs[1], applier=a, layer="L1")
    assert not (root / "b").exists()  # refused on its header, before a byte was written


def test_budget_default_and_parameter(tmp_path):
    # apply_layer's own parameter, without an applier; and the 16 GiB default refuses 20 GiB at once
    blob = tmp_path / "bomb"
    blob.write_bytes(bomb_layer([("zero", 20 << 30)]))
    t0 = time.monotonic()
    with pytest.raises(LimitExceeded, match=r"17179869184 bytes \(16.0 GiB\)"):
        apply_layer(tmp_path / "r1", blob)
    with pytest.raises(LimitExceeded, match=r"\(max_image_size_mib = 1\)"):
        apply_layer(tmp_path / "r2", blob, max_bytes=1 << 20)
    assert time.monotonic() - t0 < 10
    assert list((tmp_path / "r1").iterdir()) == [] and list((tmp_path / "r2").iterdir()) == []


# ---------------------------------------------------------------- hostile tar headers
def _tar(*members: tuple[tarfile.TarInfo, bytes | None], fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    for ti, data in members:
        buf.write(ti.tobuf(fmt, "utf-8", "surrogateescape"))
        if data:
            buf.write(data + bytes(-len(data) % 512))
    buf.write(bytes(1024))
    return buf.getvalue()


def _ti(name: str, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mtime = 1_700_000_000
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _pax_chain(n: int) -> bytes:
    rec = b"20 comment=xxxxxxxx\n"
    out = io.BytesIO()
    for _ in range(n):
        h = _ti("././@PaxHeader", type=tarfile.XHDTYPE, size=len(rec))
        out.write(h.tobuf(tarfile.USTAR_FORMAT) + rec + bytes(512 - len(rec)))
    out.write(_ti("f").tobuf(tarfile.USTAR_FORMAT) + bytes(1024))
    return out.getvalue()


def _patched(ti: tarfile.TarInfo, offset: int, field: bytes) -> bytes:
    """A GNU header with one numeric field replaced by raw bytes (base-256 allows any value), checksummed."""
    h = bytearray(ti.tobuf(tarfile.GNU_FORMAT))
    h[offset:offset + len(field)] = field
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h[:512])
    return bytes(h) + bytes(1024)


def _raw_meta(type_: bytes, size: int) -> bytes:
    h = _ti("././@PaxHeader", type=type_, size=size).tobuf(tarfile.GNU_FORMAT)
    return h + bytes(min(size, 1 << 20))  # the declared size need not even be there


def _sparse10() -> bytes:
    data = b"1\n0\n4\n".ljust(512, b"\0") + b"abcd"
    ti = _ti("sp", size=len(data), pax_headers={"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                                "GNU.sparse.name": "sp", "GNU.sparse.realsize": "4"})
    return _tar((ti, data))


HOSTILE_HEADERS = [
    ("uid-huge", _tar((_ti("f", uid=2**40), None), fmt=tarfile.GNU_FORMAT), ["uid 1099511627776", "0 to 4294967294"]),
    ("uid-negative", _tar((_ti("f", pax_headers={"uid": "-5"}), None)), ["uid -5"]),
    ("gid-minus-one", _tar((_ti("f", pax_headers={"gid": str(2**32 - 1)}), None)), ["gid 4294967295"]),
    ("mtime-inf", _tar((_ti("f", pax_headers={"mtime": "inf"}), None)), ["mtime inf"]),
    ("mtime-nan", _tar((_ti("f", pax_headers={"mtime": "nan"}), None)), ["mtime nan"]),
    ("mtime-1e30", _tar((_ti("f", pax_headers={"mtime": "1e30"}), None)), ["mtime 1e+30"]),
    ("mtime-ancient", _tar((_ti("f", pax_headers={"mtime": "-99999999999"}), None)), ["mtime -99999999999"]),
    ("mode-huge", _patched(_ti("f"), 100, b"\x80" + (2**40).to_bytes(7, "big")), ["mode 1099511627776"]),
    ("size-negative-header", _tar((_ti("f", size=-1), None), fmt=tarfile.GNU_FORMAT), ["size -1"]),
    ("size-negative-pax", _tar((_ti("f", pax_headers={"size": "-7"}), None)), ["size -7"]),
    ("link-nul", _tar((_ti("l", type=tarfile.SYMTYPE, pax_headers={"linkpath": "a\x00b"}), None)),
     ["link target 'a\\x00b'"]),
    ("link-empty", _tar((_ti("l", type=tarfile.SYMTYPE, linkname=""), None)), ["link target ''"]),
    ("name-too-long", _tar((_ti("a/" * 2500 + "f"), None)), ["a name of length 5001"]),
    ("pax-huge", _raw_meta(tarfile.XHDTYPE, 64 << 20), ["PAX header", "size 67108864"]),
    ("longname-huge", _raw_meta(tarfile.GNUTYPE_LONGNAME, 2**33), ["GNU long name header", "size 8589934592"]),
    ("pax-chain", _pax_chain(2000), ["more than 8 extended headers in a row"]),
    ("gnu-sparse", _tar((_ti("sp", type=tarfile.GNUTYPE_SPARSE), None), fmt=tarfile.GNU_FORMAT),
     ["GNU sparse file"]),
    ("pax-sparse", _sparse10(), ["PAX sparse file"]),
]


@pytest.mark.parametrize("tar,words", [(t, w) for _, t, w in HOSTILE_HEADERS], ids=[i for i, _, _ in HOSTILE_HEADERS])
def test_hostile_header_is_bad_layer(tmp_path, tar, words):
    import gzip

    root = tmp_path / "root"
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(tar, mtime=0))
    with pytest.raises(BadLayer) as ei:
        apply_layer(root, blob, layer="L0")
    msg = ei.value.message
    assert msg.startswith("layer L0: ") and all(w in msg for w in words), msg
    assert ei.value.hint


def test_deep_tree_refused_and_cleaned(banger_env, cfg, registry, tmp_path):
    # 1500 directories deep is a legal tar name (3001 bytes) and a legal Linux path, but every
    # recursive walk over it (os.walk in 3.11, shutil.rmtree) dies with RecursionError: the old
    # pull failed with an internal error and left a staging dir nothing could remove
    import gzip

    repo = "hostile/deep"
    deep = gzip.compress(_tar((_ti("a/" * 1500 + "f", size=1), b"x")), mtime=0)
    _push_layers(registry, repo, [layer(BASE)[0], deep])
    doc, rc, _ = _pull(f"{registry.host}/{repo}:v1", "--name", "deep")
    _fail(doc, rc, "unsafe_layer", EXIT_EXTERNAL, "nested more than 256 directories deep")
    _nothing_left(cfg, "deep")
    # through symlinks too: each name is shallow, the real path is not
    links = [(_ti("s0", type=tarfile.DIRTYPE, mode=0o755), None)]
    for i in range(1, 40):
        links.append((_ti(f"s{i}", type=tarfile.SYMTYPE, linkname=f"s{i - 1}/" + "d/" * 10), None))
    links.append((_ti("s39/f", size=1), b"x"))
    (tmp_path / "links").write_bytes(gzip.compress(_tar(*links), mtime=0))
    with pytest.raises(UnsafeLayer, match="nested more than 256 directories deep"):
        apply_layer(tmp_path / "root", tmp_path / "links", layer="L0")


def test_hostile_header_pull_leaves_nothing(banger_env, cfg, registry):
    import gzip

    repo = "hostile/header"
    bad = gzip.compress(_tar((_ti("etc/owned", uid=2**40, size=1), b"x"), fmt=tarfile.GNU_FORMAT), mtime=0)
    _push_layers(registry, repo, [layer(BASE)[0], bad])
    doc, rc, _ = _pull(f"{registry.host}/{repo}:v1", "--name", "header")
    _fail(doc, rc, "bad_layer", EXIT_EXTERNAL, "entry 'etc/owned' has uid 1099511627776")
    _nothing_left(cfg, "header")


def test_repeated_opaque_markers_stay_linear(tmp_path):
    # a lower layer with 12000 files in d/; an upper layer writing 12000 files elsewhere and in d/,
    # then 20000 opaque markers for d/: one listing of d/, not 20000, and each lower child checked
    # against what the layer wrote in O(1), not by a scan of all 14000 (170 million comparisons)
    import gzip

    root = tmp_path / "root"
    low = [(_ti(f"d/old{i}", size=0), None) for i in range(12000)]
    up = [(_ti(f"e/x{i}", size=0), None) for i in range(12000)]
    up += [(_ti(f"d/new{i}", size=0), None) for i in range(2000)]
    up += [(_ti("d/.wh..wh..opq", size=0), None) for _ in range(20000)]
    (tmp_path / "l0").write_bytes(gzip.compress(_tar(*low), mtime=0))
    (tmp_path / "l1").write_bytes(gzip.compress(_tar(*up), mtime=0))
    a = LayerApplier(root)
    t0 = time.monotonic()
    apply_layer(root, tmp_path / "l0", applier=a, layer="L0")
    t1 = time.monotonic()
    apply_layer(root, tmp_path / "l1", applier=a, layer="L1")
    t2 = time.monotonic()
    names = os.listdir(root / "d")
    assert len(names) == 2000 and all(n.startswith("new") for n in names)
    assert len(os.listdir(root / "e")) == 12000
    # the upper layer writes about as many files as the lower; linear work takes about as long
    # (same machine, same load); the old quadratic scan took over ten times as long
    assert t2 - t1 < 4 * (t1 - t0) + 2, (t1 - t0, t2 - t1)


def test_files_are_what_the_budget_counted(tmp_path):
    # the charge is bytes written + ENTRY_COST per entry, over everything applied
    root = tmp_path / "root"
    blob, _, _ = layer([("dir", "d"), ("file", "d/a", b"x" * 1000), ("file", "d/b", b""), ("symlink", "d/c", "a")])
    p = tmp_path / "blob"
    p.write_bytes(blob)
    a = apply_layer(root, p, layer="L0")
    assert a.used == 4 * ENTRY_COST + 1000
    assert Path(root / "d/a").read_bytes() == b"x" * 1000
    assert a.streamed >= 512 * 4


# ---------------------------------------------------------------- the same watch over TLS
@pytest.fixture
def tls_cert(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    return key, cert


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_stall_over_tls(tls_cert, phase, monkeypatch):
    # real registries are https: the watchdog must cut an SSL socket blocked in a read as well
    import socket as so
    import ssl
    import threading

    from banger.images.sources.oci.registry import Registry, TransferTimeout, parse_ref

    key, cert = tls_cert
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    lsock = so.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    stop, sent = threading.Event(), []

    def serve():
        conn, _ = lsock.accept()
        with ctx.wrap_socket(conn, server_side=True) as s:
            s.recv(65536)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: " + MT_MANIFEST.encode() + b"\r\nContent-Length: 5000\r\n\r\n"
            data = head if phase == "headers" else b""
            if phase == "body":
                s.sendall(head)
                data = b"{" + b" " * 4999
            try:
                for i in range(len(data)):
                    if stop.wait(0.25):
                        return
                    s.sendall(data[i:i + 1])
                    sent.append(1)
            except OSError:
                sent.append("hung up")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    reg = Registry(parse_ref(f"localhost:{port}/x/y:v1"), insecure=False, stall_timeout=1.5)
    assert reg.base.startswith("https://")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))  # trust the test's own certificate, as a user would
    t0 = time.monotonic()
    try:
        with pytest.raises(TransferTimeout, match="stalled"):
            reg.manifest("v1")
        assert time.monotonic() - t0 < 15
        _until(lambda: "hung up" in sent, what="the TLS client to hang up")
    finally:
        stop.set()
        lsock.close()
        t.join(timeout=10)
