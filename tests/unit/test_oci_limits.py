"""Pure checks of the OCI bounds: metadata validation, the token-realm rule, the stall watch on a real
socket pair, tar header fields, and the two config keys."""

from __future__ import annotations

import math
import socket
import tarfile
import threading
import time

import pytest

from banger.config import load_config
from banger.errors import LimitExceeded, UsageError
from banger.images.sources.oci.layers import ID_MAX, MTIME_MAX, MTIME_MIN, BadLayer, check_member
from banger.images.sources.oci.registry import (
    DOCKER_HUB,
    MAX_DOC_BYTES,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    BadManifest,
    InsecureRealm,
    TransferTimeout,
    _Watch,
    check_config,
    check_index,
    check_manifest,
    check_realm,
    document_type,
    parse_document,
    parse_ref,
)

D = "sha256:" + "e" * 64
CFG = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D, "size": 10}
LAYER = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D, "size": 10}


def test_good_manifest_and_index_pass():
    cfg, layers = check_manifest({"schemaVersion": 2, "config": CFG, "layers": [LAYER, LAYER]}, "m")
    assert cfg is CFG and layers == [LAYER, LAYER]
    idx = {"schemaVersion": 2, "manifests": [{"mediaType": MT_OCI_MANIFEST, "digest": D, "size": 5,
                                              "platform": {"os": "linux", "architecture": "amd64"}},
                                             {"digest": "sha512:" + "a" * 128, "size": 5}]}
    assert len(check_index(idx, "i")) == 2  # another algorithm is fine in an entry nobody picks
    assert document_type({"schemaVersion": 2, "manifests": []}, "", "x") == MT_OCI_INDEX
    assert document_type({"schemaVersion": 2, "layers": []}, "", "x") == MT_OCI_MANIFEST
    assert check_config({"config": {"Env": ["A=1"], "Cmd": None, "User": "0"}})


@pytest.mark.parametrize("doc,exc,words", [
    ({"schemaVersion": 2, "layers": [LAYER]}, BadManifest, "has no config descriptor"),
    ({"schemaVersion": 2, "config": [CFG], "layers": []}, BadManifest, "config is an array"),
    ({"schemaVersion": 2, "config": {**CFG, "size": 2.5}, "layers": []}, BadManifest, "config.size is 2.5"),
    ({"schemaVersion": 2, "config": {**CFG, "size": MAX_DOC_BYTES + 1}, "layers": []}, LimitExceeded,
     "at most 4194304 bytes"),
    ({"schemaVersion": 2, "config": {**CFG, "size": float("nan")}, "layers": []}, BadManifest, "size is nan"),
    ({"schemaVersion": 2, "config": CFG, "layers": "all"}, BadManifest, "layers is a string"),
    ({"schemaVersion": 2, "config": CFG, "layers": [{**LAYER, "size": 2**41}]}, BadManifest,
     "layers[0].size is 2199023255552"),
    ({"schemaVersion": 2, "config": CFG, "layers": [{**LAYER, "digest": "sha256:" + "E" * 64}]}, BadManifest,
     "layers[0].digest is"),
    ({"schemaVersion": 2, "config": CFG, "layers": [LAYER] * 501}, LimitExceeded, "has 501 layers"),
])
def test_bad_manifests(doc, exc, words):
    with pytest.raises(exc) as ei:
        check_manifest(doc, "manifest X")
    assert words in ei.value.message and ei.value.message.startswith("manifest X")


@pytest.mark.parametrize("doc,words", [
    ({"schemaVersion": 2, "manifests": None}, "manifests is null"),
    ({"schemaVersion": 2, "manifests": [7]}, "manifests[0] is a number"),
    ({"schemaVersion": 2, "manifests": [{"digest": D, "size": 1, "platform": {"os": 1}}]}, "platform"),
    ({"schemaVersion": 2, "manifests": [{"digest": D, "size": 1, "mediaType": 3}]}, "mediaType is a number"),
])
def test_bad_indexes(doc, words):
    with pytest.raises(BadManifest, match=words.replace("[", r"\[").replace("]", r"\]")):
        check_index(doc, "index X")


@pytest.mark.parametrize("doc,words", [
    ({}, "schemaVersion is None"),
    ({"schemaVersion": True}, "schemaVersion is True"),
    ({"schemaVersion": 2.0}, "schemaVersion is 2.0"),
    ({"schemaVersion": 2, "mediaType": "text/html"}, "mediaType is 'text/html'"),
    ({"schemaVersion": 2, "mediaType": ["x"]}, "mediaType is ['x']"),
    ({"schemaVersion": 2}, "neither an index nor an image manifest"),
])
def test_document_types(doc, words):
    with pytest.raises(BadManifest) as ei:
        document_type(doc, "", "manifest X")
    assert words in ei.value.message


@pytest.mark.parametrize("body,words", [
    (b"null", "is null, not a JSON object"), (b'"x"', "is a string"), (b"{", "not valid JSON"),
    (b"[" * 100000, "not valid JSON"), (b'{"a": 1' + b"0" * 5000 + b"}", "not valid JSON"),
])
def test_parse_document(body, words):
    with pytest.raises(BadManifest, match=words):
        parse_document(body, "doc")


def test_long_values_are_shortened_in_messages():
    with pytest.raises(BadManifest) as ei:
        check_manifest({"schemaVersion": 2, "config": {**CFG, "digest": "x" * 100000}, "layers": []}, "m")
    assert len(ei.value.message) < 300


# ---------------------------------------------------------------- token realms
@pytest.mark.parametrize("realm,insecure,loopback,ok", [
    ("https://auth.example/token", False, False, True),
    ("https://auth.example/token", False, True, True),
    ("http://auth.example/token", False, False, False),
    ("http://auth.example/token", True, False, True),
    ("http://127.0.0.1:5001/token", False, True, True),       # loopback registry, loopback realm
    ("http://[::1]:5001/token", False, True, True),
    ("http://localhost/token", False, False, False),         # loopback realm for a remote registry
    ("http://127.0.0.2:5001/token", False, True, False),     # loopback registry, realm elsewhere
    ("HTTP://auth.example/token", False, False, False),
])
def test_realm_rule(realm, insecure, loopback, ok):
    if ok:
        assert check_realm(realm, registry="r", insecure=insecure, registry_loopback=loopback) == realm
    else:
        with pytest.raises(InsecureRealm) as ei:
            check_realm(realm, registry="r", insecure=insecure, registry_loopback=loopback)
        assert "plain http" in ei.value.message and "--insecure" in ei.value.hint


@pytest.mark.parametrize("ref,host", [("127.0.0.1:5000/a", "127.0.0.1"), ("[::1]:5000/a", "[::1]"),
                                      ("[::1]/a", "[::1]"), ("localhost/a", "localhost"), ("debian", DOCKER_HUB)])
def test_ref_host_for_the_loopback_rule(ref, host):
    assert parse_ref(ref).host == host


@pytest.mark.parametrize("realm", ["ftp://x/token", "file:///etc/passwd", "/token", "http://[::1/x",
                                   "https://h:99999999/x", ""])
def test_realm_must_be_a_url(realm):
    with pytest.raises(BadManifest, match="not an http"):
        check_realm(realm, registry="r", insecure=True, registry_loopback=True)


# ---------------------------------------------------------------- the stall watch
def _recv_until_closed(sock, out: list) -> None:
    try:
        while True:
            b = sock.recv(65536)
            if not b:
                break
            out.append(len(b))
    except OSError:
        pass
    out.append("done")


def test_watch_shuts_down_a_blocked_read():
    a, b = socket.socketpair()
    got: list = []
    with a, b, _Watch(0.5, "blob x", "reg") as w:
        w.attach(a)
        t = threading.Thread(target=_recv_until_closed, args=(a, got))
        t0 = time.monotonic()
        t.start()
        t.join(timeout=10)  # nothing is ever sent: only the watchdog can end the read
        assert not t.is_alive() and got[-1] == "done"
        assert w.fired and 0.4 < time.monotonic() - t0 < 5
        with pytest.raises(TransferTimeout, match="stalled: blob x received 0 bytes"):
            w.check()


def test_watch_trickle_is_a_stall_and_steady_flow_is_not():
    with _Watch(0.5, "t", "reg") as w:  # needs 512 bytes per 0.5 s
        deadline = time.monotonic() + 10
        with pytest.raises(TransferTimeout):
            while time.monotonic() < deadline:
                w.advance(1)  # a byte every 20 ms: always "some" data, never enough
                w.check()
                time.sleep(0.02)
        assert w.fired
    with _Watch(0.5, "s", "reg") as w:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            w.advance(100)  # 5 KB/s
            w.check()
            time.sleep(0.02)
        assert not w.fired


def test_watch_leaves_no_thread():
    before = {t.ident for t in threading.enumerate()}
    for _ in range(20):
        with _Watch(60, "x", "r"):
            pass
    assert {t.ident for t in threading.enumerate()} <= before


# ---------------------------------------------------------------- tar header fields
def _m(**kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo("etc/x")
    ti.mtime = 1_700_000_000
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


@pytest.mark.parametrize("kw,field", [
    ({"uid": -1}, "uid -1"), ({"uid": ID_MAX + 1}, "uid 4294967295"), ({"gid": 2**64}, "gid 18446744073709551616"),
    ({"mtime": math.inf}, "mtime inf"), ({"mtime": -math.inf}, "mtime -inf"), ({"mtime": math.nan}, "mtime nan"),
    ({"mtime": MTIME_MAX + 1}, "mtime 15032385536"), ({"mtime": MTIME_MIN - 1}, "mtime -2147483649"),
    ({"size": -3}, "size -3"), ({"mode": -1}, "mode -1"), ({"mode": 2**40}, "mode 1099511627776"),
    ({"type": tarfile.SYMTYPE, "linkname": "a\x00"}, "link target 'a\\x00'"),
    ({"type": tarfile.LNKTYPE, "linkname": ""}, "link target ''"),
    ({"type": tarfile.SYMTYPE, "linkname": "x" * 5000}, "a link target of length 5000"),
    ({"name": "d/" * 2100}, "a name of length 4200"),
])
def test_check_member_refuses(kw, field):
    with pytest.raises(BadLayer) as ei:
        check_member(_m(**kw), "L9")
    assert ei.value.message.startswith("layer L9: entry ") and field in ei.value.message, ei.value.message
    assert "allowed:" in ei.value.message


@pytest.mark.parametrize("kw", [{"uid": 0}, {"uid": ID_MAX, "gid": ID_MAX}, {"mtime": 0}, {"mtime": -1.5},
                                {"mtime": MTIME_MAX}, {"mode": 0o7777}, {"size": 2**40},
                                {"type": tarfile.SYMTYPE, "linkname": "../../x"}])
def test_check_member_accepts(kw):
    check_member(_m(**kw), "L")


# ---------------------------------------------------------------- config keys
@pytest.mark.parametrize("line,words", [
    ("max_image_size_mib = 0", "max_image_size_mib = 0"),
    ("max_image_size_mib = -5", "max_image_size_mib = -5"),
    ("max_image_size_mib = 1.5", "max_image_size_mib = 1.5"),
    ('max_image_size_mib = "big"', "max_image_size_mib = 'big'"),
    ("max_image_size_mib = true", "max_image_size_mib = True"),
    ("max_image_size_mib = 99999999999", "max_image_size_mib = 99999999999"),
    ("max_image_size_mib = inf", "max_image_size_mib = inf"),
    ("pull_stall_timeout_s = nan", "pull_stall_timeout_s = nan"),
    ("pull_stall_timeout_s = 0", "pull_stall_timeout_s = 0"),
    ('pull_stall_timeout_s = "60"', "pull_stall_timeout_s = '60'"),
    ("pull_stall_timeout_s = 1e9", "pull_stall_timeout_s = 1000000000.0"),
])
def test_config_keys_validated(tmp_path, line, words):
    (tmp_path / "config.toml").write_text(line + "\n")
    with pytest.raises(UsageError) as ei:
        load_config({"BANGER_HOME": str(tmp_path)})
    assert words in ei.value.message and "config.toml" in ei.value.message
    assert "from" in ei.value.hint


def test_config_keys_defaults_and_values(tmp_path):
    cfg = load_config({"BANGER_HOME": str(tmp_path)})
    assert cfg.max_image_size_mib == 16384 and cfg.pull_stall_timeout_s == 60.0
    (tmp_path / "config.toml").write_text("max_image_size_mib = 64\npull_stall_timeout_s = 2\n")
    cfg = load_config({"BANGER_HOME": str(tmp_path)})
    assert (cfg.max_image_size_mib, cfg.pull_stall_timeout_s) == (64, 2.0)
    assert type(cfg.max_image_size_mib) is int and type(cfg.pull_stall_timeout_s) is float
