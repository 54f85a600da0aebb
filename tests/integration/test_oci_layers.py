"""Layer application on a real filesystem (root: ownership): whiteouts, opaque dirs, hostile entries."""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from pathlib import Path

import pytest

from banger.images.sources.oci.layers import BadLayer, LayerApplier, UnsafeLayer, apply_layer
from tests.support.registry import layer


def _apply(root: Path, tmp: Path, *layers_entries, compression="gzip") -> LayerApplier:
    a = LayerApplier(root)
    for i, entries in enumerate(layers_entries):
        blob, _, _ = layer(entries, compression)
        p = tmp / f"blob{i}-{hashlib.sha256(blob).hexdigest()[:8]}"
        p.write_bytes(blob)
        apply_layer(root, p, applier=a, layer=f"L{i}")
    return a


def _snapshot(d: Path) -> dict:
    out = {}
    for dp, dns, fns in os.walk(d):
        for n in dns + fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            out[os.path.relpath(p, d)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
    return out


@pytest.fixture
def area(tmp_path):
    root = tmp_path / "stage" / "root"
    root.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("original\n")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    return root, outside, blobs


def test_whiteouts_opaque_owners_modes(area):
    root, _, blobs = area
    a = _apply(root, blobs, [
        ("dir", "etc", 0o755, 0, 0),
        ("file", "etc/keep", b"keep\n"),
        ("file", "etc/gone", b"gone\n"),
        ("dir", "opt", 0o755, 0, 0),
        ("dir", "opt/app", 0o750, 1000, 1001),
        ("file", "opt/app/old1", b"1"),
        ("dir", "opt/app/sub", 0o755, 0, 0),
        ("file", "opt/app/sub/old2", b"2"),
        ("file", "usr/bin/tool", b"#!/bin/sh\n", 0o4755, 0, 0),
        ("symlink", "usr/bin/alias", "tool"),
        ("hardlink", "usr/bin/tool2", "usr/bin/tool"),
        ("fifo", "run-fifo"),
    ], [
        ("whiteout", "etc/gone"),
        ("opaque", "opt/app"),
        ("file", "opt/app/new", b"new\n", 0o600, 1234, 5678),
        ("file", "etc/ctl", b"x", 0o640, 0, 42),
        ("whiteout", "etc/ctl"),  # same-layer whiteout: must not hide this layer's own file
    ])
    assert (root / "etc/keep").read_text() == "keep\n"
    assert not (root / "etc/gone").exists()
    assert sorted(os.listdir(root / "opt/app")) == ["new"]
    st = os.lstat(root / "opt/app")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1001, 0o750)
    st = os.lstat(root / "opt/app/new")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o600)
    st = os.lstat(root / "usr/bin/tool")
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_nlink == 2
    assert os.readlink(root / "usr/bin/alias") == "tool"
    assert os.lstat(root / "usr/bin/tool2").st_ino == st.st_ino
    assert stat.S_ISFIFO(os.lstat(root / "run-fifo").st_mode)
    assert (root / "etc/ctl").exists() and os.lstat(root / "etc/ctl").st_gid == 42
    assert a.stats.opaque == 1 and a.stats.whiteouts == 2


def test_later_layer_replaces_types_without_following(area):
    root, outside, blobs = area
    # layer 0: etc/x is a symlink pointing outside; layer 1 writes a regular file at etc/x
    _apply(root, blobs, [("symlink", "x", str(outside / "victim"))], [("file", "x", b"mine")])
    assert (outside / "victim").read_text() == "original\n"
    assert not os.path.islink(root / "x") and (root / "x").read_bytes() == b"mine"
    # a directory replaced by a file and back
    _apply(root, blobs, [("dir", "d"), ("file", "d/a", b"a")], [("file", "d", b"now a file")],
           [("dir", "d", 0o700, 0, 0), ("file", "d/b", b"b")])
    assert sorted(os.listdir(root / "d")) == ["b"]


@pytest.mark.parametrize("entries,match", [
    ([("file", "../outside/victim", b"pwned")], "'..'"),
    ([("raw", tarfile.TarInfo("/tmp/banger-abs-test"), b"")], "absolute"),
    ([("symlink", "esc", "../../outside"), ("file", "esc/victim", b"pwned")], "outside the image root"),
    ([("symlink", "up", ".."), ("symlink", "up2", "up/.."), ("file", "up2/outside/new", b"x")], "outside the image root"),
    ([("hardlink", "hl", "../outside/victim")], "'..'"),
    ([("symlink", "esc", "../../outside"), ("hardlink", "hl", "esc/victim")], "outside the image root"),
    ([("file", "ok", b"ok"), ("whiteout", "../outside/victim")], "'..'"),
    ([("opaque", "../outside")], "'..'"),
])
def test_hostile_layers_refused(area, entries, match):
    root, outside, blobs = area
    before = _snapshot(outside.parent / "outside")
    parent_before = sorted(os.listdir(outside.parent))
    with pytest.raises(UnsafeLayer, match=match) as ei:
        _apply(root, blobs, entries)
    assert "refused" in ei.value.message and ei.value.hint
    assert _snapshot(outside) == before
    assert (outside / "victim").read_text() == "original\n"
    assert sorted(os.listdir(outside.parent)) == parent_before
    assert not os.path.exists("/tmp/banger-abs-test")


def test_absolute_symlink_resolves_inside_root(area):
    """An absolute symlink means what it means in the guest: written through, it lands inside the root."""
    root, outside, blobs = area
    host_marker = Path("/etc/banger-layer-test-marker")
    assert not host_marker.exists()
    _apply(root, blobs, [("dir", "etc"), ("symlink", "etclink", "/etc"),
                         ("file", "etclink/banger-layer-test-marker", b"inside")])
    assert not host_marker.exists()
    assert (root / "etc/banger-layer-test-marker").read_bytes() == b"inside"
    # ... and an absolute symlink to a host file is kept as a link, never followed
    _apply(root, blobs, [("symlink", "pw", str(outside / "victim")), ("whiteout", "pw")])
    assert (outside / "victim").read_text() == "original\n"


def test_device_nodes_skipped(area):
    root, _, blobs = area
    a = _apply(root, blobs, [("dir", "dev"), ("chr", "dev/null", 1, 3), ("chr", "dev/mem", 1, 1),
                             ("file", "after", b"x")])
    assert os.listdir(root / "dev") == []
    assert a.stats.skipped_devices == ["dev/null", "dev/mem"]
    assert (root / "after").read_bytes() == b"x"


def test_hardlink_to_missing_or_directory(area):
    root, _, blobs = area
    with pytest.raises(BadLayer, match="does not exist"):
        _apply(root, blobs, [("hardlink", "h", "nothing")])
    with pytest.raises(UnsafeLayer, match="directory"):
        _apply(root, blobs, [("dir", "d"), ("hardlink", "h", "d")])


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_compressions_and_corrupt_blob(area, compression):
    root, _, blobs = area
    _apply(root, blobs, [("file", "hello", b"hi " * 1000)], compression=compression)
    assert (root / "hello").read_bytes() == b"hi " * 1000
    blob, _, _ = layer([("file", "x", os.urandom(50000))], compression)
    bad = blobs / "corrupt"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(BadLayer):
        apply_layer(root, bad, layer="corrupt")
