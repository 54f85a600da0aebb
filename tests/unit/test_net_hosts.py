"""banger's block in a hosts file: rendered, merged and removed without touching anything else."""

from __future__ import annotations

import os

import pytest

from banger.config import Config
from banger.context import Ctx
from banger.errors import HostError, InvalidName, UsageError
from banger.net import hosts

ORIGINAL = (b"127.0.0.1\tlocalhost\n"
            b"::1\tlocalhost ip6-localhost   # tabs, spaces and comments stay\n"
            b"\n"
            b"# a comment\r\n"
            b"10.0.0.5 db.internal\n")


def _ctx(tmp_path, **extra):
    return Ctx(Config(home=tmp_path / "home", run=tmp_path / "run", extra=extra))


def test_render_is_sorted_and_marked():
    block = hosts.render([("web", "172.30.0.3"), ("api", "172.30.0.2")], "banger")
    assert block == (hosts.BEGIN + b"\n172.30.0.2\tapi.banger\n172.30.0.3\tweb.banger\n" + hosts.END + b"\n")
    assert hosts.render([], "banger") == b""


def test_render_refuses_bad_names_addresses_and_domains():
    with pytest.raises(InvalidName):
        hosts.render([("Bad_Name", "172.30.0.2")], "banger")
    with pytest.raises(ValueError):
        hosts.render([("web", "not-an-ip")], "banger")
    with pytest.raises(UsageError) as ei:
        hosts.render([("web", "172.30.0.2"), ("web", "172.30.0.3")], "banger")
    assert "two addresses" in ei.value.message
    for bad in ("", "Banger", "a..b", "-x", "x y", "a/b"):
        with pytest.raises(UsageError):
            hosts.validate_domain(bad)


def test_merge_appends_replaces_and_removes_byte_for_byte():
    b1 = hosts.render([("web", "172.30.0.3")], "banger")
    with_block = hosts.merge(ORIGINAL, b1)
    assert with_block == ORIGINAL + b1
    b2 = hosts.render([("web", "172.30.0.3"), ("api", "172.30.0.2")], "banger")
    assert hosts.merge(with_block, b2) == ORIGINAL + b2
    assert hosts.merge(hosts.merge(with_block, b2), b"") == ORIGINAL  # gone without a trace
    # a block in the middle (someone appended after it) stays in place
    middle = ORIGINAL + b1 + b"192.0.2.1 later\n"
    assert hosts.merge(middle, b2) == ORIGINAL + b2 + b"192.0.2.1 later\n"
    assert hosts.merge(middle, b"") == ORIGINAL + b"192.0.2.1 later\n"
    # a file without a final newline gets one before the block, and keeps it afterwards
    assert hosts.merge(b"127.0.0.1 localhost", b1) == b"127.0.0.1 localhost\n" + b1
    assert hosts.merge(b"", b1) == b1 and hosts.merge(b"", b"") == b""


@pytest.mark.parametrize("bad", [
    ORIGINAL + hosts.BEGIN + b"\n1.2.3.4 x.banger\n",  # BEGIN without END
    ORIGINAL + hosts.END + b"\n",  # END alone
    ORIGINAL + hosts.END + b"\n" + hosts.BEGIN + b"\n",  # wrong order
    ORIGINAL + (hosts.BEGIN + b"\n" + hosts.END + b"\n") * 2,  # twice
])
def test_a_damaged_block_is_reported_not_guessed(bad):
    with pytest.raises(HostError) as ei:
        hosts.merge(bad, b"", path="/etc/hosts")
    assert "damaged banger block" in ei.value.message and "by hand" in ei.value.hint


def test_sync_writes_by_rename_keeping_mode_owner_and_the_rest(tmp_path):
    p = tmp_path / "hosts"
    p.write_bytes(ORIGINAL)
    os.chmod(p, 0o644)
    uid, gid = (1234, 5678) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(p, uid, gid)
    ino = p.stat().st_ino
    ctx = _ctx(tmp_path, hosts_file=str(p), domain="vm.test")
    r = hosts.sync(ctx, [("web", "172.30.0.3")])
    assert r == {"path": str(p), "changed": True, "entries": 1, "atomic": True}
    assert p.read_bytes() == ORIGINAL + hosts.render([("web", "172.30.0.3")], "vm.test")
    st = p.stat()
    assert st.st_ino != ino  # a new file renamed over the old one
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o644, uid, gid)
    assert hosts.entries(p) == [("web.vm.test", "172.30.0.3")]
    ino = st.st_ino
    assert hosts.sync(ctx, [("web", "172.30.0.3")])["changed"] is False  # idempotent: no write
    assert p.stat().st_ino == ino
    assert hosts.sync(ctx, [])["changed"] is True
    assert p.read_bytes() == ORIGINAL
    assert not [x for x in os.listdir(tmp_path) if x.startswith(".banger-hosts.")]  # no temp left


def test_sync_follows_a_symlinked_hosts_file(tmp_path):
    real = tmp_path / "real-hosts"
    real.write_bytes(ORIGINAL)
    link = tmp_path / "hosts"
    link.symlink_to(real)
    hosts.sync(_ctx(tmp_path), [("web", "172.30.0.3")], path=link)
    assert link.is_symlink() and real.read_bytes().startswith(ORIGINAL)


def test_sync_on_a_missing_file(tmp_path):
    p = tmp_path / "hosts"
    ctx = _ctx(tmp_path, hosts_file=str(p))
    assert hosts.sync(ctx, [])["changed"] is False and not p.exists()
    hosts.sync(ctx, [("web", "172.30.0.3")])
    assert p.read_bytes() == hosts.render([("web", "172.30.0.3")], "banger")
    assert p.stat().st_mode & 0o777 == 0o644  # readable by everyone's resolver, even under umask 077


def test_config_values_are_checked(tmp_path):
    with pytest.raises(UsageError) as ei:
        hosts.hosts_path(_ctx(tmp_path, hosts_file="relative/hosts").cfg)
    assert "absolute path" in ei.value.message
    with pytest.raises(UsageError):
        hosts.domain(_ctx(tmp_path, domain="Not A Domain").cfg)
    assert hosts.fqdn(_ctx(tmp_path).cfg, "web") == "web.banger"


def test_the_guest_control_line_round_trips_and_is_strict():
    pairs = [("web", "172.30.0.3"), ("api", "172.30.0.2")]
    line = hosts.control_line(pairs, "banger")
    assert line == "@banger hosts banger api=172.30.0.2 web=172.30.0.3"
    assert hosts.parse_control_line(line) == ("banger", sorted(pairs))
    assert hosts.control_line([], "vm.test") == "@banger hosts vm.test"
    assert hosts.parse_control_line("@banger hosts vm.test") == ("vm.test", [])
    for bad in ("@banger hosts banger web=1.2.3", "@banger hosts banger web", "@banger hosts Bad",
                "@banger hosts banger x;rm=1.2.3.4", "@banger net 1.2.3.4/24"):
        with pytest.raises((UsageError, ValueError)):
            hosts.parse_control_line(bad)
