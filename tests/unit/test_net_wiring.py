"""The pieces that wire the network layer into VMs, without a VM: --ttl parsing, the plans --net none and
-p make, the kernel command line, the flags of a new VM, and the guest's side of the names protocol
(banger-init run under dash, exactly the script the images carry)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from banger.config import Config
from banger.context import Ctx
from banger.errors import UsageError
from banger.net import hosts

INIT = Path(__file__).resolve().parents[2] / "banger/data/guest/banger-init"


# ---------------------------------------------------------------- --ttl
@pytest.mark.parametrize("text,secs", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400),
                                       ("1h30m", 5400), (" 5S ", 5), ("366d", 366 * 86400), (45, 45)])
def test_ttl_parses_durations(text, secs):
    from banger.vms.expiry import parse_ttl

    assert parse_ttl(text) == secs


@pytest.mark.parametrize("text,why", [("30", "give a unit: 30s"), ("", "needs a duration"), ("0s", "zero"),
                                      ("5x", "not a duration"), ("1h1h", "twice"), ("m", "not a duration"),
                                      ("-5m", "not a duration"), ("367d", "longer than a year"),
                                      ("1.5h", "not a duration"), ("5m junk", "not a duration")])
def test_ttl_refuses_anything_else_naming_the_flag(text, why):
    from banger.vms.expiry import parse_ttl

    with pytest.raises(UsageError) as ei:
        parse_ttl(text)
    assert "--ttl" in ei.value.message and why in (ei.value.message + " " + (ei.value.hint or ""))


def test_ttl_left_and_its_column():
    from banger.vms import expiry

    vm = {"options": {"expires_at": 1000.0}}
    assert expiry.seconds_left(vm, now=400) == 600 and not expiry.is_expired(vm, now=999.9)
    assert expiry.is_expired(vm, now=1000) and expiry.seconds_left({"options": {}}) is None
    assert [expiry.human(x) for x in (None, -1, 0, 5, 59.2, 61, 599, 601, 3600, 3661, 86400 * 2 + 3600 * 3)] == \
        ["", "expired", "expired", "5s", "1m00s", "1m01s", "9m59s", "10m", "1h00m", "1h01m", "2d03h"]


# ---------------------------------------------------------------- plans
def test_net_none_drops_the_tap_and_ssh_and_ports_come_first():
    from banger.snapshots.service import restore_plan
    from banger.vms import plans

    assert plans.create_plan(net=False).names() == ["prepare", "disk.work", "disk.overlay", "vmm.launch"]
    assert plans.start_plan(net=False).names() == ["vmm.launch"]
    assert plans.create_plan(ports=True).names()[:2] == ["net.ports", "prepare"]
    assert plans.create_plan(ports=True, start=False).names() == ["net.ports", "prepare", "disk.work",
                                                                  "disk.overlay"]
    assert restore_plan(net=False).names() == ["snapshot.check", "snapshot.verify", "prepare", "disk.copy",
                                               "vmm.restore", "snapshot.release", "snapshot.verified"]
    assert restore_plan(ports=True).names()[:3] == ["snapshot.check", "net.ports", "snapshot.verify"]


def test_cmdline_without_a_nic_has_no_address_and_lists_every_resolver():
    from banger.guest.bootargs import guest_cmdline

    line = guest_cmdline(ip="172.30.0.2", prefixlen=24, gateway="172.30.0.1", hostname="h",
                         dns=["192.0.2.53", "198.51.100.1"])
    assert "banger.ip=172.30.0.2/24 banger.gw=172.30.0.1" in line and "banger.dns=192.0.2.53,198.51.100.1" in line
    none = guest_cmdline(ip=None, prefixlen=24, gateway="172.30.0.1", hostname="h", dns=["192.0.2.53"])
    assert "banger.ip" not in none and "banger.gw" not in none and "banger.dns" not in none
    assert "banger.hostname=h" in none
    with pytest.raises(ValueError):
        guest_cmdline(ip="172.30.0.2", prefixlen=24, gateway="172.30.0.1", hostname="h", dns=["1.2.3.4 x=y"])


def test_initramfs_writes_each_resolver():
    """The initramfs's DNS fragment, run by busybox sh against a scratch root: one line per server."""
    import tempfile

    from banger.guest import initramfs

    text = initramfs.init_script().decode()
    frag = text[text.index('if [ -n "$dns" ]; then'):]
    frag = frag[:frag.index("\nfi\n") + 4]
    with tempfile.TemporaryDirectory() as d:
        Path(d, "etc").mkdir()
        Path(d, "etc/resolv.conf").symlink_to("/run/elsewhere")
        script = "set -f\nfail() { echo FAIL; exit 1; }\ndns=192.0.2.53,198.51.100.1\n" + frag.replace("/newroot", d)
        subprocess.run(["/bin/busybox", "sh", "-c", script], check=True, timeout=10)
        assert Path(d, "etc/resolv.conf").read_text() == "nameserver 192.0.2.53\nnameserver 198.51.100.1\n"
        assert not Path(d, "etc/resolv.conf").is_symlink()


# ---------------------------------------------------------------- flags of a new VM
def _ctx(tmp_path, **settings):
    return Ctx(Config(home=tmp_path / "h", run=tmp_path / "r", **settings))


def test_net_options_default_follows_nat_and_flags_are_checked(tmp_path):
    from banger.vms.lifecycle import net_options

    assert net_options(_ctx(tmp_path))[0] == {"net": "isolated", "allow": []}
    assert net_options(_ctx(tmp_path, nat=True))[0]["net"] == "nat"
    assert net_options(_ctx(tmp_path), nat=True)[0]["net"] == "nat"
    o, specs = net_options(_ctx(tmp_path), net="isolated", allow=["10.0.0.0/8", "172.30.0.1:5432"],
                           publish=["8080:80", "5353:53/udp"], ttl="30m")
    assert o["allow"] == ["10.0.0.0/8", "172.30.0.1:5432"] and [str(p) for p in specs] == ["8080:80/tcp",
                                                                                           "5353:53/udp"]
    assert o["ttl_s"] == 1800 and o["expires_at"] > 0
    for kw, why in ((dict(net="isolated", nat=True), "--nat contradicts --net isolated"),
                    (dict(net="bridge"), "--net 'bridge'"),
                    (dict(net="none", allow=["10.0.0.0/8"]), "--allow"),
                    (dict(net="none", publish=["80:80"]), "-p"),
                    (dict(allow=["172.30.0.128/25"]), "other guests"),
                    (dict(publish=["80:80", "80:81"]), "given twice"),
                    (dict(publish=["99999:80"]), "out of range"),
                    (dict(publish=["192.0.2.77:80:80"]), "not an address of this host"),
                    (dict(ttl="soon"), "--ttl")):
        with pytest.raises(UsageError) as ei:
            net_options(_ctx(tmp_path), **kw)
        assert why in ei.value.message, (kw, ei.value.message)


# ---------------------------------------------------------------- names: host side and guest side agree
def _init(*args, env=None):
    return subprocess.run(["dash", str(INIT), *args], capture_output=True, text=True, timeout=20, env=env)


def test_long_name_lists_are_split_and_the_guest_rebuilds_the_same_block(tmp_path):
    pairs = [(f"vm-{i:03d}-{'x' * 20}", f"172.30.{i // 250}.{i % 250 + 2}") for i in range(120)]
    lines = hosts.control_lines(pairs, "dev.test")
    assert len(lines) > 3 and all(len(ln) <= hosts.MAX_CONTROL_LINE for ln in lines)
    assert lines[0].startswith("@banger hosts dev.test ") and all(ln.startswith("@banger hosts+ dev.test ")
                                                                  for ln in lines[1:])
    assert hosts.control_lines([], "banger") == ["@banger hosts banger"]
    etc = tmp_path / "hosts"
    etc.write_bytes(b"127.0.0.1\tlocalhost\n# mine\n")
    env = {"PATH": "/usr/bin:/bin", "BANGER_INIT_HOSTS": str(etc), "BANGER_INIT_HOSTS_STATE": str(tmp_path / "st")}
    cp = _init("--apply-hosts", *lines, env=env)
    assert cp.returncode == 0, cp.stderr
    assert etc.read_bytes() == b"127.0.0.1\tlocalhost\n# mine\n" + hosts.render(pairs, "dev.test")
    # a shorter list replaces the block; an empty one removes it; a hosts+ of another domain is ignored
    _init("--apply-hosts", *hosts.control_lines(pairs[:2], "dev.test"), "@banger hosts+ other.test a=1.2.3.4",
          env=env)
    assert etc.read_bytes() == b"127.0.0.1\tlocalhost\n# mine\n" + hosts.render(pairs[:2], "dev.test")
    _init("--apply-hosts", "@banger hosts dev.test", env=env)
    assert etc.read_bytes() == b"127.0.0.1\tlocalhost\n# mine\n"


@pytest.mark.parametrize("line", [
    "@banger hosts banger web=172.30.0.2 api=172.30.0.3",
    "@banger hosts vm.test",
    "@banger hosts+ banger a-1=10.0.0.1\r",
])
def test_guest_accepts_valid_hosts_lines_like_the_host_renders_them(line):
    cp = _init("--check-hosts", line)
    assert cp.returncode == 0 and cp.stdout.startswith("ok "), cp.stdout
    words = line.rstrip("\r").split()
    want = "".join(f"{w.split('=')[1]}\t{w.split('=')[0]}.{words[2]}\n" for w in words[3:])
    assert cp.stdout.split("\n", 1)[1] == want


@pytest.mark.parametrize("line", [
    "@banger hosts",                                   # no domain
    "@banger hosts Banger a=1.2.3.4",                  # upper case
    "@banger hosts bad..domain a=1.2.3.4",
    "@banger hosts -x a=1.2.3.4",
    "@banger hosts banger a=1.2.3",                    # short address
    "@banger hosts banger a=256.1.1.1",
    "@banger hosts banger a=01.1.1.1",                 # leading zero
    "@banger hosts banger A=1.2.3.4",
    "@banger hosts banger a_b=1.2.3.4",
    "@banger hosts banger -a=1.2.3.4",
    "@banger hosts banger a=1.2.3.4=5",
    "@banger hosts banger =1.2.3.4",
    "@banger hosts banger a=",
    "@banger hosts banger a",
    "@banger hosts banger a=1.2.3.4;reboot",
    "@banger hosts banger $(reboot)=1.2.3.4",
    "@banger hosts banger a=1.2.3.4 " + "b" * 64 + "=1.2.3.5",
    "@banger hosts+ banger",                           # a continuation without names
    "@banger hosts banger *=1.2.3.4",
    "@banger hostsbanger a=1.2.3.4",
])
def test_guest_refuses_invalid_hosts_lines(line):
    assert _init("--check-hosts", line).stdout.strip() == "invalid"


def test_dns_stub_upstreams_come_from_config(tmp_path):
    from banger.net import dns

    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.53\noptions edns0\n")
    (tmp_path / "up.conf").write_text("nameserver 192.0.2.1\nnameserver 2001:db8::1\nnameserver 192.0.2.2\n")
    cfg = Config(home=tmp_path, run=tmp_path, extra={"dns_stub_upstreams": [str(tmp_path / "up.conf")]})
    r = dns.resolve(cfg, resolv_conf=str(tmp_path / "resolv.conf"), resolvectl=None)
    assert r["servers"] == ["192.0.2.1", "192.0.2.2"] and r["source"] == str(tmp_path / "up.conf")
    with pytest.raises(UsageError):
        dns.resolve(Config(home=tmp_path, run=tmp_path, extra={"dns_stub_upstreams": ["relative"]}),
                    resolv_conf=str(tmp_path / "resolv.conf"), resolvectl=None)


def test_a_port_lost_to_a_racing_create_leaves_no_row(cfg, monkeypatch):
    """Two creates for one host port both pass the early check; the loser's net.ports step (the atomic
    claim) refuses it, and the row it had reserved goes too: nothing half-done. (The race is staged by
    letting the early check pass; the claim and the store are real.)"""
    import time as _time

    from banger.errors import Conflict
    from banger.names import Subnet
    from banger.net import ports, publish
    from banger.state.reservation import reserve_vm
    from banger.vms import lifecycle

    ctx = Ctx(cfg)
    now = _time.time()
    with ctx.store.immediate() as c:
        c.execute("INSERT INTO images (name, kind, rootfs, created_at) VALUES ('img', 'test', '/nonexistent', ?)",
                  (now,))
        c.execute("INSERT INTO kernels (name, dir, created_at) VALUES ('ker', '/nonexistent', ?)", (now,))
    winner = reserve_vm(ctx.store, Subnet(cfg.subnet), name="winner", image="img", kernel="ker", backend="qemu",
                        vcpu=1, memory_mib=256, overlay_size_mib=64, work_disk_size_mib=64, state="stopped")
    ports._insert(ctx, winner["id"], ports.parse_many(["7000:80"]))
    img = {"name": "img", "rootfs": "/nonexistent", "work_seed": None, "init": None, "key_fingerprint": "x"}
    ker = {"name": "ker", "vmlinux": None, "bzimage": None, "initrd": "/nonexistent", "version": "6.1"}
    monkeypatch.setattr(lifecycle, "resolve", lambda ctx, **kw: (img, ker, "qemu"))
    monkeypatch.setattr(publish, "precheck", lambda ctx, specs: None)  # the winner claimed after our check
    with pytest.raises(Conflict) as ei:
        lifecycle.create(ctx, name="loser", publish=["7000:80"], start=False)
    assert ei.value.exit_code == 4 and "already published by VM winner" in ei.value.message
    assert [v["name"] for v in ctx.store.list_vms()] == ["winner"]
    assert ports.claims(ctx, winner["id"]) == ports.parse_many(["7000:80"])
    assert not cfg.vms_dir.exists() or list(cfg.vms_dir.iterdir()) == []
    ctx.close()
