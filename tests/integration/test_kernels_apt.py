"""The real default kernel: Debian's linux-image-cloud-amd64 through the host's own apt."""

from __future__ import annotations

import json
import re
import struct
import time

from banger.guest import initramfs, kernelfmt
from tests.support.cli import banger_json
from tests.support.kernels import CACHE_ROOT, download_log, newc_entries, pulled_default_kernel  # noqa: F401


def test_default_kernel_triple_is_valid(pulled_default_kernel):  # noqa: F811
    k = pulled_default_kernel
    m = k["manifest"]
    assert k["name"] == "debian-6.1-cloud"
    assert m["source"]["type"] == "apt" and m["source"]["package"] == "linux-image-cloud-amd64"
    assert re.match(r"^linux-image-6\.1\.\d+-\d+-cloud-amd64$", m["source"]["resolved"])
    rel = k["version"]
    assert m["source"]["resolved"] == f"linux-image-{rel}"

    # vmlinux: an x86_64 ELF executable, the full size the bzImage recorded, the same release
    bz = kernelfmt.bzimage_info(k["bzimage"])
    assert bz.compression == "lz4" and bz.release == rel
    with open(k["bzimage"], "rb") as f:
        f.seek(bz.payload_start + bz.payload_length - 4)
        recorded = struct.unpack("<I", f.read(4))[0]
    with open(k["vmlinux"], "rb") as f:
        assert f.read(4) == b"\x7fELF"
    assert m["files"]["vmlinux"]["size"] == recorded
    assert kernelfmt.elf_release(k["vmlinux"]) == rel

    # the package's config says CONFIG_PVH=y, so the PVH note must be there
    config = open(f"{k['dir']}/config").read()
    assert kernelfmt.config_has(config, "CONFIG_PVH")
    info = kernelfmt.elf_info(k["vmlinux"])
    assert ("Xen", kernelfmt.XEN_ELFNOTE_PHYS32_ENTRY) in [(n, t) for n, t, _d in info.notes]
    assert info.pvh_entry and m["pvh_entry"] == info.pvh_entry and m["config_pvh"] is True

    # modules: every guest module (all are =m in this kernel), built for this release
    assert m["modules"] == initramfs.ALL_MODULES
    for name in m["modules"]:
        data = open(f"{k['modules_dir']}/{name}.ko", "rb").read()
        assert initramfs.modinfo(data)["vermagic"].split()[0] == rel
    # initrd: busybox, /init, the modules and a modules.dep naming only files that are there
    ents = newc_entries(k["initrd"])
    base = f"lib/modules/{rel}"
    for name in m["modules"]:
        assert f"{base}/{name}.ko" in ents
    for line in ents[f"{base}/modules.dep"]["data"].decode().splitlines():
        mod, deps = line.split(":", 1)
        for d in [mod, *deps.split()]:
            assert f"{base}/{d}" in ents
    assert ents["init"]["data"] == initramfs.init_script()
    print(f"\nkernel {rel}: vmlinux {m['files']['vmlinux']['size'] >> 20} MiB, "
          f"initrd {m['files']['initrd.img']['size'] / 1e6:.2f} MB, pull {m.get('timings')}")


def test_fresh_apt_pull_through_the_cli(cfg, pulled_default_kernel, monkeypatch):  # noqa: F811
    """A full pull in a fresh home: apt-cache resolution, apt-get download (or the verified
    .deb cache), dpkg-deb, extraction, module selection, initramfs. Deterministic output."""
    monkeypatch.delenv("BANGER_KERNEL_CATALOG", raising=False)
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    (cfg.cache_dir / "debs").symlink_to(CACHE_ROOT / "debs")
    t0 = time.monotonic()
    d = banger_json("kernel", "pull", "--force")["data"]
    took = time.monotonic() - t0
    src = d["source"]
    assert src["type"] == "apt" and src["resolved"].startswith("linux-image-")
    logged = download_log(cfg)
    assert len(logged) == (1 if src["downloaded"] else 0)
    m = json.loads(open(f"{d['dir']}/manifest.json").read())
    ref = pulled_default_kernel["manifest"]
    if ref["source"]["version"] == src["version"]:
        # same package -> byte-identical vmlinux, modules and (reproducible) initrd
        for f in ("vmlinux", "bzImage", "initrd.img", "config"):
            assert m["files"][f]["sha256"] == ref["files"][f]["sha256"], f
    assert list(cfg.staging_dir.iterdir()) == []
    print(f"\nfresh pull {took:.1f}s (downloaded: {src['downloaded']}), timings {m['timings']}")
