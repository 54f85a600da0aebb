"""The QEMU command line builder and small pure helpers of the vm service/CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from banger.errors import UsageError
from banger.vmm.base import Drive, VmSpec
from banger.vmm.qemu.driver import build_argv


def _spec(tmp_path, **kw):
    (tmp_path / "vmlinux").write_bytes(b"x")
    d = dict(vm_id="abc123", name="dev-1", vcpu=2, memory_mib=768, vmlinux=tmp_path / "vmlinux",
             bzimage=tmp_path / "bzImage", initrd=tmp_path / "initrd.img", cmdline="console=ttyS0 banger.ip=x",
             drives=[Drive("rootfs", Path("/img/rootfs.ext4"), True), Drive("overlay", tmp_path / "overlay.ext4"),
                     Drive("work", tmp_path / "work.ext4")],
             tap="tap-pool-3", mac="06:00:ac:1e:00:05", run_dir=Path("/run/b/vms/abc123"), vm_dir=tmp_path,
             serial_log=tmp_path / "serial.log")
    d.update(kw)
    return VmSpec(**d)


def _opt(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_microvm_tcg_argv(tmp_path):
    argv = build_argv(_spec(tmp_path), qemu_bin="qemu-system-x86_64", accel="tcg", serial_fd=7)
    assert argv[0] == "qemu-system-x86_64"
    assert _opt(argv, "-M") == ["microvm,acpi=on,pit=on,pic=on,rtc=on"]
    assert _opt(argv, "-accel") == ["tcg"] and "host" not in _opt(argv, "-cpu")
    for flag in ("-no-reboot", "-nodefaults", "-nographic"):
        assert flag in argv
    assert _opt(argv, "-smp") == ["2"] and _opt(argv, "-m") == ["768M"]
    assert _opt(argv, "-kernel") == [str(tmp_path / "vmlinux")]  # the ELF (PVH) when present
    assert _opt(argv, "-append") == ["console=ttyS0 banger.ip=x"]
    drives = _opt(argv, "-drive")
    assert [d.split(",")[0] for d in drives] == ["file=/img/rootfs.ext4", f"file={tmp_path}/overlay.ext4",
                                                f"file={tmp_path}/work.ext4"]
    assert "readonly=on" in drives[0] and "readonly" not in drives[1]
    devs = _opt(argv, "-device")
    assert devs[0].startswith("virtio-rng-device")
    assert [d for d in devs if d.startswith("virtio-blk-device")] == [
        "virtio-blk-device,drive=rootfs", "virtio-blk-device,drive=overlay", "virtio-blk-device,drive=work"]
    assert "virtio-net-device,netdev=net0,mac=06:00:ac:1e:00:05" in devs
    assert _opt(argv, "-netdev") == ["tap,id=net0,ifname=tap-pool-3,script=no,downscript=no"]
    assert _opt(argv, "-qmp") == ["unix:/run/b/vms/abc123/qmp.sock,server=on,wait=off"]
    # the serial console is the inherited end of the console pump's socketpair; QEMU itself writes no
    # (unbounded) logfile
    assert _opt(argv, "-chardev") == ["socket,id=ser0,fd=7"] and _opt(argv, "-serial") == ["chardev:ser0"]
    assert not [a for a in argv if "logfile" in a or "serial.log" in a]
    assert "-incoming" not in argv
    assert all(isinstance(a, str) for a in argv)


def test_kvm_and_incoming_and_bzimage_fallback(tmp_path):
    spec = _spec(tmp_path, vmlinux=tmp_path / "missing")
    argv = build_argv(spec, qemu_bin="q", accel="kvm", serial_fd=7, incoming=True)
    assert _opt(argv, "-accel") == ["kvm"] and _opt(argv, "-cpu") == ["host"]
    assert _opt(argv, "-kernel") == [str(tmp_path / "bzImage")]
    assert argv[-2:] == ["-incoming", "defer"]


def test_parse_cp_arg():
    from banger.vms.access import parse_cp_arg

    assert parse_cp_arg("dev-1:/root/x") == ("dev-1", "/root/x")
    assert parse_cp_arg("dev-1:") == ("dev-1", ".")
    assert parse_cp_arg("./a:b") == (None, "./a:b")
    assert parse_cp_arg("/tmp/x") == (None, "/tmp/x")


def test_parse_mib():
    from banger.cli.vm import parse_mib

    assert parse_mib("1024", "--memory") == 1024
    assert parse_mib("2G", "--memory") == 2048
    assert parse_mib("512MiB", "--memory") == 512
    assert parse_mib("1.5g", "--memory") == 1536
    assert parse_mib(None, "--memory") is None
    for bad in ("lots", "-1", "0", "1.3M"):
        with pytest.raises(UsageError):
            parse_mib(bad, "--memory")


def test_summarize_stages_separates_vmm_and_ssh_ready():
    from banger.vms.lifecycle import summarize_stages

    st = [{"op": "create", "stage": s, "started_at": t, "duration_ms": d, "ok": True, "error": None}
          for s, t, d in [("prepare", 100.0, 1), ("disk.work", 100.001, 60), ("disk.overlay", 100.061, 80),
                          ("net.tap", 100.141, 9), ("vmm.launch", 100.15, 150), ("guest.ssh", 100.3, 4700)]]
    s = summarize_stages(st)
    assert s["op"] == "create" and s["vmm_ready_s"] == pytest.approx(0.3, abs=1e-3)
    assert s["ssh_ready_s"] == pytest.approx(5.0, abs=1e-3) and s["host_side_ms"] == 300


def test_summarize_stages_takes_the_latest_boot_only():
    from banger.vms.lifecycle import summarize_stages

    def ev(op, stage, t, d, ok=True):
        return {"op": op, "stage": stage, "started_at": t, "duration_ms": d, "ok": ok, "error": None}

    st = [ev("create", "prepare", 1.0, 1), ev("create", "net.tap", 1.1, 5), ev("create", "vmm.launch", 1.2, 100),
          ev("create", "guest.ssh", 1.3, 5000), ev("stop", "guest.shutdown", 50.0, 900), ev("stop", "teardown", 51, 5),
          ev("start", "net.tap", 60.0, 10), ev("start", "vmm.launch", 60.01, 90),
          ev("start", "guest.ssh", 60.1, 900, ok=False), ev("start", "undo:vmm.launch", 61.0, 5),
          ev("start", "net.tap", 70.0, 10), ev("start", "vmm.launch", 70.01, 190), ev("start", "guest.ssh", 70.2, 4800)]
    s = summarize_stages(st)
    assert s == {"op": "start", "vmm_ready_s": 0.2, "ssh_ready_s": 5.0, "host_side_ms": 200.0}
    assert summarize_stages(st[4:6]) == {}
