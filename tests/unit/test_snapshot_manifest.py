"""banger/snapshots/manifest.py: the sparse-aware checksum and the present/size/small-file checks."""

from __future__ import annotations

import os

import pytest

from banger.snapshots import manifest as m


def _file(p, size, writes=()):
    with open(p, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)
    return p


def test_checksum_ignores_how_zeros_are_stored(tmp_path):
    holes = _file(tmp_path / "a", 8 << 20, [(3 << 20, b"data")])
    zeros = tmp_path / "b"
    with open(zeros, "wb") as f:  # the same content with every zero written out
        f.write(bytes(3 << 20) + b"data" + bytes((8 << 20) - (3 << 20) - 4))
    assert os.stat(holes).st_blocks < os.stat(zeros).st_blocks
    assert m.checksum(holes) == m.checksum(zeros)


@pytest.mark.parametrize("off", [0, 1, (1 << 20) - 1, 5 << 20, (8 << 20) - 1])
def test_any_changed_byte_changes_it(tmp_path, off):
    base = _file(tmp_path / "a", 8 << 20, [(3 << 20, b"data")])
    ref = m.checksum(base)
    _file(tmp_path / "b", 8 << 20, [(3 << 20, b"data"), (off, b"\x01")])
    assert m.checksum(tmp_path / "b") != ref
    assert m.checksum(_file(tmp_path / "c", (8 << 20) + 1, [(3 << 20, b"data")])) != ref  # size counts


def test_check_present_and_verifier(tmp_path):
    d = tmp_path / "snap"
    d.mkdir()
    _file(d / "vm.state", 4096, [(0, b"state")])
    _file(d / "vm.mem", 16 << 20, [(9 << 20, b"mem")])
    files = m.build(d)
    assert set(files) == {"vm.state", "vm.mem"}
    assert m.check_present("s", d, files) == ["vm.mem"]  # big: left to the background verifier
    assert m.Verifier("s", d, files, ["vm.mem"]).result() >= 0
    _file(d / "vm.mem", 16 << 20, [(9 << 20, b"meM")])
    with pytest.raises(m.SnapshotDamaged, match="vm.mem does not match its checksum"):
        m.Verifier("s", d, files, ["vm.mem"]).result()
    _file(d / "vm.state", 4096, [(0, b"stat!")])
    with pytest.raises(m.SnapshotDamaged, match="vm.state") as ei:
        m.check_present("s", d, files)
    assert ei.value.exit_code == 8 and "snapshot rm s" in ei.value.hint
    os.unlink(d / "vm.state")
    with pytest.raises(m.SnapshotIncomplete, match="incomplete: vm.state is missing") as ei:
        m.check_present("s", d, files)
    assert ei.value.exit_code == 3


def test_verifier_reads_files_opened_before_an_rm(tmp_path):
    """The restore releases snapshot/<name> before it joins the verifier: a concurrent `snapshot rm` unlinks
    the names, but the verifier already holds the files open."""
    d = tmp_path / "snap"
    d.mkdir()
    _file(d / "vm.mem", 64 << 20, [(9 << 20, b"mem"), (40 << 20, os.urandom(4 << 20))])
    files = m.build(d)
    v = m.Verifier("s", d, files, ["vm.mem"])
    os.unlink(d / "vm.mem")
    assert v.result() >= 0
    with pytest.raises(m.SnapshotIncomplete, match="vm.mem is missing"):
        m.Verifier("s", d, files, ["vm.mem"])
