"""bzImage / ELF handling on synthetic kernels (real lz4/gzip/xz/zstd payloads)."""

from __future__ import annotations

import struct

import pytest

from banger.errors import UsageError
from banger.guest import kernelfmt
from tests.support.kernels import fake_bzimage, fake_elf_kernel


@pytest.mark.parametrize("comp", ["lz4", "gzip", "xz", "zstd"])
def test_extract_vmlinux_round_trips_every_payload(tmp_path, comp):
    elf = fake_elf_kernel(size=300_000, seed=7)
    bz = tmp_path / "bzImage"
    bz.write_bytes(fake_bzimage(elf, comp))
    assert kernelfmt.kind(bz) == "bzImage"
    info = kernelfmt.bzimage_info(bz)
    assert info.compression == comp
    assert info.release == "9.9.9-banger-test"
    facts = kernelfmt.extract_vmlinux(bz, tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == elf
    assert facts["size"] == len(elf) and facts["compression"] == comp


def test_pvh_note_found_and_release_read(tmp_path):
    p = tmp_path / "vmlinux"
    p.write_bytes(fake_elf_kernel(release="6.6.6-x"))
    info = kernelfmt.elf_info(p)
    assert info.pvh_entry == 0x1000000
    assert [n[:2] for n in info.notes] == [("GNU", 1), ("Xen", 18)]
    assert kernelfmt.check_vmlinux(p, require_pvh=True) == {"pvh_entry": 0x1000000, "release": "6.6.6-x"}


def test_missing_pvh_note_is_refused_only_when_required(tmp_path):
    p = tmp_path / "vmlinux"
    p.write_bytes(fake_elf_kernel(pvh=False))
    assert kernelfmt.check_vmlinux(p)["pvh_entry"] is None
    with pytest.raises(kernelfmt.NotAKernel, match="no PVH entry note"):
        kernelfmt.check_vmlinux(p, require_pvh=True)


def test_elf_that_is_not_an_x86_64_executable_is_refused(tmp_path):
    p = tmp_path / "libfoo.so"
    p.write_bytes(fake_elf_kernel(etype=3))
    with pytest.raises(kernelfmt.NotAKernel, match="not an x86_64 kernel"):
        kernelfmt.check_vmlinux(p)
    p.write_bytes(fake_elf_kernel(machine=183))  # aarch64
    with pytest.raises(kernelfmt.NotAKernel):
        kernelfmt.check_vmlinux(p)


def test_not_a_kernel(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes(b"hello, I am not a kernel\n" * 100)
    assert kernelfmt.kind(p) == "unknown"
    with pytest.raises(kernelfmt.NotAKernel) as ei:
        kernelfmt.bzimage_info(p)
    assert ei.value.hint and isinstance(ei.value, UsageError)
    with pytest.raises(kernelfmt.NotAKernel):
        kernelfmt.elf_info(p)


def test_truncated_bzimage_is_refused_and_leaves_no_output(tmp_path):
    bz = tmp_path / "bzImage"
    bz.write_bytes(fake_bzimage(fake_elf_kernel(), "lz4", truncate=5000))
    with pytest.raises(kernelfmt.NotAKernel, match="outside the file"):
        kernelfmt.extract_vmlinux(bz, tmp_path / "vmlinux")
    assert not (tmp_path / "vmlinux").exists()


def test_corrupt_payload_fails_cleanly(tmp_path):
    elf = fake_elf_kernel()
    img = bytearray(fake_bzimage(elf, "gzip"))
    info_off = (img[0x1F1] + 1) * 512 + struct.unpack_from("<I", img, 0x248)[0]
    img[info_off + 40: info_off + 400] = b"\xff" * 360  # smash the deflate stream
    bz = tmp_path / "bzImage"
    bz.write_bytes(bytes(img))
    with pytest.raises(kernelfmt.NotAKernel, match="does not decompress"):
        kernelfmt.extract_vmlinux(bz, tmp_path / "vmlinux")
    assert not (tmp_path / "vmlinux").exists()


@pytest.mark.parametrize("comp", ["lz4", "xz", "zstd"])
def test_corrupt_payload_of_each_kind_raises_a_banger_error(tmp_path, comp):
    from banger.errors import BangerError

    img = bytearray(fake_bzimage(fake_elf_kernel(size=200_000), comp))
    start = (img[0x1F1] + 1) * 512 + struct.unpack_from("<I", img, 0x248)[0]
    img[start + 30: start + 2000] = bytes(range(256)) * 7 + bytes(1970 - 1792)
    bz = tmp_path / "bzImage"
    bz.write_bytes(bytes(img))
    with pytest.raises(BangerError):
        kernelfmt.extract_vmlinux(bz, tmp_path / "vmlinux")
    assert not (tmp_path / "vmlinux").exists()


def test_unsupported_compression_says_so(tmp_path):
    bz = tmp_path / "bzImage"
    bz.write_bytes(fake_bzimage(fake_elf_kernel(), "bzip2"))
    with pytest.raises(kernelfmt.NotAKernel, match="bzip2"):
        kernelfmt.extract_vmlinux(bz, tmp_path / "vmlinux")
    assert not (tmp_path / "vmlinux").exists()


def test_config_has():
    cfg = "# CONFIG_FOO is not set\nCONFIG_PVH=y\nCONFIG_VIRTIO=m\nCONFIG_X=n\n"
    assert kernelfmt.config_has(cfg, "CONFIG_PVH")
    assert kernelfmt.config_has(cfg, "CONFIG_VIRTIO")
    assert not kernelfmt.config_has(cfg, "CONFIG_FOO")
    assert not kernelfmt.config_has(cfg, "CONFIG_X")
    assert not kernelfmt.config_has(cfg, "CONFIG_PV")
