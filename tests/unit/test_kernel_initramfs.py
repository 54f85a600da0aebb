"""Module selection, the newc writer and the generated initramfs (read back independently)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from banger.errors import UsageError
from banger.guest import initramfs
from tests.support.kernels import fake_module, fake_module_tree, newc_entries


def test_modinfo_reads_depends_and_vermagic():
    info = initramfs.modinfo(fake_module("virtio_net", ["net_failover", "virtio"]))
    assert info["depends"] == "net_failover,virtio"
    assert info["vermagic"].startswith("9.9.9-banger-test ")


def test_select_modules_contract_order_with_dependencies_first(tmp_path):
    tree = fake_module_tree(tmp_path)
    mods = initramfs.select_modules(tree)
    names = [m["name"] for m in mods]
    # only the guest modules present (no vsock here, no unrelated_gpu), dependencies before users
    assert names == ["virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "failover", "net_failover",
                     "virtio_net", "overlay", "virtio_rng"]
    assert "unrelated_gpu" not in names
    pos = {n: i for i, n in enumerate(names)}
    for m in mods:
        for d in m["depends"]:
            assert pos[d] < pos[m["name"]], (d, m["name"])


def test_dependency_outside_the_list_is_pulled_in(tmp_path):
    tree = fake_module_tree(tmp_path, extra={"virtio_blk": ["virtio", "virtio_ring", "blk_helper"],
                                             "blk_helper": []})
    names = [m["name"] for m in initramfs.select_modules(tree)]
    assert names.index("blk_helper") < names.index("virtio_blk")


def test_missing_dependency_is_a_clear_error(tmp_path):
    tree = fake_module_tree(tmp_path, extra={"overlay": ["nowhere_to_be_found"]})
    with pytest.raises(UsageError, match="nowhere_to_be_found"):
        initramfs.select_modules(tree)


def test_write_and_load_module_tree(tmp_path):
    mods = initramfs.select_modules(fake_module_tree(tmp_path))
    initramfs.write_module_tree(mods, tmp_path / "out")
    dep = (tmp_path / "out" / "modules.dep").read_text().splitlines()
    assert "virtio_net.ko: net_failover.ko virtio.ko virtio_ring.ko failover.ko" in dep
    assert "virtio_ring.ko:" in dep
    back = initramfs.load_module_tree(tmp_path / "out")
    assert [m["name"] for m in back] == [m["name"] for m in mods]
    assert [m["data"] for m in back] == [m["data"] for m in mods]


def test_initramfs_contents(tmp_path):
    mods = initramfs.select_modules(fake_module_tree(tmp_path))
    facts = initramfs.build(tmp_path / "initrd.img", release="9.9.9-banger-test", modules=mods)
    ents = newc_entries(tmp_path / "initrd.img")
    assert ents["init"]["mode"] & 0o777 == 0o755 and ents["init"]["data"] == initramfs.init_script()
    assert ents["dev/console"]["mode"] & 0o170000 == 0o020000 and ents["dev/console"]["rdev"] == (5, 1)
    bb = ents["bin/busybox"]
    assert bb["data"][:4] == b"\x7fELF" and bb["mode"] & 0o111
    assert ents["bin/sh"]["mode"] & 0o170000 == 0o120000 and ents["bin/sh"]["data"] == b"busybox"
    base = "lib/modules/9.9.9-banger-test"
    for m in mods:
        assert ents[f"{base}/{m['name']}.ko"]["data"] == m["data"]
    assert b"virtio_net.ko: net_failover.ko" in ents[f"{base}/modules.dep"]["data"]
    for d in ("proc", "sys", "newroot", "mnt/lower", "mnt/overlay"):
        assert ents[d]["mode"] & 0o170000 == 0o040000
    assert facts["modules"] == [m["name"] for m in mods]


def test_initramfs_is_reproducible_and_cpio_tool_agrees(tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    initramfs.build(a, release="9.9.9", modules=[])
    initramfs.build(b, release="9.9.9", modules=[])
    assert a.read_bytes() == b.read_bytes()
    if shutil.which("cpio"):
        listing = subprocess.run(["sh", "-c", f"zcat {a} | cpio -t --quiet"], capture_output=True, text=True,
                                 check=True).stdout.split()
        assert {"init", "bin/busybox", "dev/console", "newroot"} <= set(listing)


def test_init_script_is_valid_shell_and_keeps_the_contract():
    text = initramfs.init_script().decode()
    subprocess.run(["/bin/busybox", "sh", "-n", "-c", text], check=True)
    for key in ("banger.root=", "banger.overlay=", "banger.work=", "banger.ip=", "banger.gw=", "banger.dns=",
                "banger.hostname=", "banger.init="):
        assert key in text
    assert 'echo "banger-initramfs: switching root"' in text
    order = ("virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mmio "
             "virtio_blk failover net_failover virtio_net overlay virtio_rng vsock "
             "vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport")
    assert " ".join(text.split("for m in ", 1)[1].split("; do", 1)[0].replace("\\", " ").split()) == order
    assert order.split() == initramfs.ALL_MODULES


def test_modname_rule():
    assert initramfs.modname("virtio-rng.ko") == "virtio_rng"
    assert initramfs.modname("overlay.ko.xz") == "overlay"
