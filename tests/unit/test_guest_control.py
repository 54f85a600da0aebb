"""The `@banger set` control line: what banger composes (banger.guest.control) is exactly what the real
banger-init (run by dash, through its --check-set hook) accepts, and banger-init refuses anything else;
the answer parser; the template key and its parts."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from banger.guest import control

INIT = Path(__file__).resolve().parents[2] / "banger" / "data" / "guest" / "banger-init"


def check_set(line: str) -> str:
    cp = subprocess.run(["dash", str(INIT), "--check-set", line], capture_output=True, text=True, timeout=10)
    return cp.stdout.strip()


def test_composed_lines_round_trip_through_banger_init():
    ident = control.Identity.new("clone-7")
    line = control.set_line("0123456789abcdef", identity=ident, net=("172.30.0.9/24", "172.30.0.1",
                                                                    "06:00:ac:1e:00:09"),
                            clock=1796150000.123456, rng=bytes(range(32)))
    got = dict(w.split("=", 1) for w in check_set(line).split()[2:])
    assert check_set(line).split()[:2] == ["ok", "0123456789abcdef"]
    assert got["rng"] == bytes(range(32)).hex() and got["clock"] == "1796150000.123456"
    assert got["net"] == "172.30.0.9/24,172.30.0.1,06:00:ac:1e:00:09" and got["host"] == "clone-7"
    assert got["mid"] == ident.machine_id and got["pub"] == ident.pub_line.split()[1]
    # the key travels as the PEM's base64 body; banger-init writes the markers back around it
    body = control.pem_body(ident.key_pem)
    assert got["key"] == body and "\n" not in body
    pem = ident.key_pem.decode().splitlines()
    assert "".join(pem[1:-1]) == body
    assert got["standby"] == ""
    # every field at once (a template's builder could be asked for all of them), standby last
    full = control.set_line("0123456789abcdef", identity=ident, net=("172.30.0.9/24", "172.30.0.1",
                                                                    "06:00:ac:1e:00:09"),
                            clock=1.5, rng=bytes(32), standby=True)
    assert check_set(full).split()[:2] == ["ok", "0123456789abcdef"] and check_set(full).endswith(" standby=1")
    alone = control.set_line("00112233aabbccdd", standby=True)
    assert alone == "@banger set 00112233aabbccdd standby=1" and check_set(alone).endswith(" standby=1")
    claim = control.set_line("abcdef0123456789", host="renamed", clock=1.5, rng=b"\x01" * 32)
    assert check_set(claim).startswith("ok abcdef0123456789 rng=" + "01" * 32 + " clock=1.500000 net= host=renamed")


@pytest.mark.parametrize("bad", [
    "@banger set zz host=a",                                  # nonce not hex
    "@banger set 0123 host=a",                                # nonce too short
    "@banger set 0123456789abcdef host=Bad",                  # uppercase hostname
    "@banger set 0123456789abcdef host=-a",
    "@banger set 0123456789abcdef host=a host=b",             # repeated field
    "@banger set 0123456789abcdef host=$(reboot)",            # shell syntax is data, never run
    "@banger set 0123456789abcdef host=a;reboot",
    "@banger set 0123456789abcdef clock=1.2.3",
    "@banger set 0123456789abcdef clock=abc.1",
    "@banger set 0123456789abcdef rng=" + "ab" * 16,          # too little entropy (< 32 bytes)
    "@banger set 0123456789abcdef rng=" + "AB" * 32,          # uppercase hex
    "@banger set 0123456789abcdef mid=" + "0" * 31,
    "@banger set 0123456789abcdef key=abc$def",
    "@banger set 0123456789abcdef key=" + "A" * 4097,         # bounded
    "@banger set 0123456789abcdef net=172.30.0.9/24,172.30.0.1",
    "@banger set 0123456789abcdef net=172.30.0.9/33,172.30.0.1,06:00:ac:1e:00:09",
    "@banger set 0123456789abcdef net=172.30.0.9/24,172.30.0.1,07:00:ac:1e:00:09",  # multicast MAC
    "@banger set 0123456789abcdef net=172.30.0.9/24,172.30.0.1,06:00:ac:1e:00:09,x",
    "@banger set 0123456789abcdef unknown=1",
    "@banger set 0123456789abcdef standby=0",                 # only standby=1
    "@banger set 0123456789abcdef standby=1 standby=1",
    "@banger set 0123456789abcdef standby=$(reboot)",
    "@banger set 0123456789abcdef host",
    "@banger set 0123456789abcdef " + " ".join(f"host{i}=a" for i in range(9)),  # too many fields
])
def test_banger_init_refuses_bad_set_lines(bad):
    assert check_set(bad) == "invalid"


def test_pem_body_refuses_what_is_not_a_pem():
    with pytest.raises(ValueError):
        control.pem_body(b"ssh-ed25519 AAAA")


def _writer(path: Path, chunks: list[bytes], delay: float = 0.05):
    def go():
        for c in chunks:
            time.sleep(delay)
            with open(path, "ab") as f:
                f.write(c)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_wait_answer_reads_from_the_offset_and_across_partial_writes(tmp_path):
    log = tmp_path / "serial.log"
    log.write_bytes(b"banger-init: set 00112233 ok rng=reseeded\n")  # an older answer, before the offset
    off = control.log_size(log)
    t = _writer(log, [b"noise\r\nbanger-init: set 00112233 o", b"k rng=mixed\r\n"])
    ans = control.wait_answer(log, "00112233", offset=off, deadline=time.monotonic() + 5)
    t.join()
    assert ans == {"ok": True, "rng": "mixed"}


def test_wait_answer_standby_and_an_older_init_that_ignores_the_line(tmp_path):
    log = tmp_path / "serial.log"
    log.write_bytes(b"banger-init: set 00112233 ok rng=none standby=ready\r\n")
    assert control.wait_answer(log, "00112233", offset=0, deadline=time.monotonic() + 5) == \
        {"ok": True, "rng": "none", "standby": "ready"}
    # an older banger-init refuses the new field: with ignored_ok that is an answer, not a 30 s wait
    log.write_bytes(b"banger-init: ignored an invalid control line\r\n")
    t0 = time.monotonic()
    assert control.wait_answer(log, "00112233", offset=0, deadline=time.monotonic() + 30, ignored_ok=True) == \
        {"ok": False, "ignored": True}
    assert time.monotonic() - t0 < 5
    # without it, the refusal of someone else's line is no answer to ours
    from banger.errors import GuestTimeout

    with pytest.raises(GuestTimeout):
        control.wait_answer(log, "00112233", offset=0, deadline=time.monotonic() + 0.3)


def test_wait_answer_failure_and_timeout(tmp_path):
    from banger.errors import ExternalError, GuestTimeout

    log = tmp_path / "serial.log"
    log.write_bytes(b"banger-init: set 0a0b0c0d failed host key\n")
    with pytest.raises(ExternalError) as ei:
        control.wait_answer(log, "0a0b0c0d", offset=0, deadline=time.monotonic() + 5)
    assert "host key" in ei.value.message
    # a guest that prints a forged answer for another nonce does not satisfy this one
    log.write_bytes(b"banger-init: set ffffffff ok rng=reseeded\n")
    t0 = time.monotonic()
    with pytest.raises(GuestTimeout):
        control.wait_answer(log, "0a0b0c0d", offset=0, deadline=time.monotonic() + 0.3)
    assert time.monotonic() - t0 < 2

    def dead():
        raise ExternalError("the VMM exited", "x")

    with pytest.raises(ExternalError, match="VMM exited"):
        control.wait_answer(log, "0a0b0c0d", offset=0, deadline=time.monotonic() + 5, alive=dead)


def _img(tmp_path, name="img"):
    rootfs, seed = tmp_path / f"{name}.rootfs", tmp_path / f"{name}.seed"
    for p in (rootfs, seed):
        if not p.exists():
            p.write_bytes(b"x")
    return {"name": name, "rootfs": str(rootfs), "work_seed": str(seed), "key_fingerprint": "SHA256:k"}


KER = {"name": "k", "version": "6.1", "manifest": {"files": {"vmlinux": {"sha256": "aa"},
                                                              "initrd.img": {"sha256": "bb"}}}}


def test_template_key_changes_with_every_part(tmp_path, cfg):
    import os

    from banger.context import Ctx
    from banger.templates.service import key_of, key_parts

    ctx = Ctx(cfg.replace(firecracker_bin=str(tmp_path / "fc")))
    (tmp_path / "fc").write_bytes(b"fc")
    sizes = dict(vcpu=1, memory_mib=1024, overlay_size_mib=4096, work_disk_size_mib=2048)
    base = key_of(key_parts(ctx, _img(tmp_path), KER, "firecracker", **sizes))
    assert base == key_of(key_parts(ctx, _img(tmp_path), KER, "firecracker", **sizes))  # stable
    variants = [
        key_parts(ctx, _img(tmp_path), KER, "firecracker", **{**sizes, "vcpu": 2}),
        key_parts(ctx, _img(tmp_path), KER, "firecracker", **{**sizes, "memory_mib": 512}),
        key_parts(ctx, _img(tmp_path), KER, "firecracker", **{**sizes, "work_disk_size_mib": 4096}),
        key_parts(ctx, {**_img(tmp_path), "key_fingerprint": "SHA256:other"}, KER, "firecracker", **sizes),
        key_parts(ctx, _img(tmp_path), {**KER, "manifest": {"files": {"vmlinux": {"sha256": "cc"},
                                                                      "initrd.img": {"sha256": "bb"}}}},
                  "firecracker", **sizes),
        key_parts(ctx, _img(tmp_path), KER, "qemu", **sizes),
    ]
    keys = {key_of(p) for p in variants}
    assert base not in keys and len(keys) == len(variants)
    # a rebuilt image (a new rootfs file: new inode / mtime) and a new VMM binary change it too
    r = Path(_img(tmp_path)["rootfs"])
    tmp = r.with_suffix(".new")
    tmp.write_bytes(b"x")
    os.replace(tmp, r)
    assert key_of(key_parts(ctx, _img(tmp_path), KER, "firecracker", **sizes)) != base
    after_image = key_of(key_parts(ctx, _img(tmp_path), KER, "firecracker", **sizes))
    st = (tmp_path / "fc").stat()
    os.utime(tmp_path / "fc", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert key_of(key_parts(ctx, _img(tmp_path), KER, "firecracker", **sizes)) != after_image
    ctx.close()


def test_guest_init_version_covers_the_guest_files():
    from banger.templates import service

    service._GUEST_INIT = None
    v = service.guest_init_version()
    assert len(v) == 16 and v == service.guest_init_version()
