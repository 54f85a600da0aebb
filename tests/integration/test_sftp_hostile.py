"""`vm cp` against a hostile guest: a real paramiko SFTP server (tests/support/sftp_hostile.py) that
lies about names, types, modes, sizes and links.  After every test the host tree around the
destination is byte-identical and nothing anywhere in it carries a setuid/setgid bit.

The "victim" files stand in for /etc: the links and absolute names point into the sandbox, so even
the old code (which followed them) could only damage the sandbox.
"""

from __future__ import annotations

import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from banger.errors import BangerError
from banger.guest import sftpcopy
from tests.support.sftp_hostile import HostileGuest, serve


class Sandbox:
    def __init__(self, root: Path):
        self.root = root
        self.victim = root / "victim"
        (self.victim / "etc").mkdir(parents=True)
        (self.victim / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (self.victim / "etc" / "shadow").write_text("root:*:19000::::::\n")
        os.chmod(self.victim / "etc" / "shadow", 0o600)
        os.symlink("passwd", self.victim / "pw-link")
        self.dest_parent = root / "a" / "b"
        self.dest_parent.mkdir(parents=True)
        (root / "a" / "keep.txt").write_text("keep\n")
        self.dest = self.dest_parent / "out"
        self.before = self.snapshot()

    def snapshot(self) -> dict:
        out = {}
        for dirpath, dirs, files in os.walk(self.root):
            for n in dirs + files:
                p = Path(dirpath) / n
                if p == self.dest or self.dest in p.parents:
                    continue
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    out[str(p)] = ("link", os.readlink(p))
                elif stat.S_ISDIR(st.st_mode):
                    out[str(p)] = ("dir", st.st_mode)
                else:
                    out[str(p)] = ("file", st.st_mode, st.st_uid, p.read_bytes())
        return out

    def assert_untouched(self) -> None:
        assert self.snapshot() == self.before, "the host tree outside the destination changed"
        for dirpath, dirs, files in os.walk(self.root):
            for n in dirs + files:
                st = os.lstat(Path(dirpath) / n)
                assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), f"{dirpath}/{n} has a setuid/setgid bit"
        if self.dest.exists() or self.dest.is_symlink():
            for dirpath, dirs, files in os.walk(self.dest):
                for n in dirs + files:
                    p = Path(dirpath) / n
                    if p.is_symlink():
                        real = Path(os.path.realpath(p))
                        assert real == self.dest.resolve() or self.dest.resolve() in real.parents, \
                            f"{p} -> {os.readlink(p)} points outside the copy"


@pytest.fixture
def sb(tmp_path):
    s = Sandbox(tmp_path / "host")
    yield s
    s.assert_untouched()


def _get(guest, remote, local, **kw):
    with serve(guest) as t:
        return sftpcopy.get(t, remote, local, **kw)


def _refused(guest, sb, code="unsafe_guest_data", remote="/root/d", **kw):
    with pytest.raises(BangerError) as ei:
        _get(guest, remote, sb.dest, **kw)
    assert ei.value.code == code, ei.value.to_dict()
    assert not os.path.lexists(sb.dest), "a refused copy must leave nothing behind"
    sb.assert_untouched()
    return ei.value


# ---------------------------------------------------------------------------- names
@pytest.mark.parametrize("bad", ["../../escape", "sub/../../../escape", "{victim}/abs", "a/b", "x\x00y", "",
                                 "x" * 256])
def test_invalid_names_are_refused_and_nothing_is_written(sb, bad):
    bad = bad.format(victim=sb.victim)
    g = HostileGuest()
    g.dir("/root/d", [g.file("ok.txt", b"fine\n"), g.file(bad, b"pwned\n")])
    err = _refused(g, sb)
    assert "invalid file name" in err.message
    assert "\x00" not in err.message and "\x1b" not in err.message
    assert not (sb.root / "escape").exists() and not (sb.victim / "abs").exists()


def test_dot_entries_are_ignored(sb):
    # paramiko drops "." and ".." from listings itself (so the old code was safe here too); banger's own
    # check refuses them as names should any client library pass them on.
    g = HostileGuest()
    g.dir("/root/d", [g.file(".", b"x"), g.file("..", b"pwned\n"), g.file("ok.txt", b"fine\n")])
    assert _get(g, "/root/d", sb.dest) == 1
    assert sorted(os.listdir(sb.dest)) == ["ok.txt"]
    assert sftpcopy.bad_name("..") and sftpcopy.bad_name(".")


def test_non_utf8_name_is_refused(sb):
    g = HostileGuest()
    g.dir("/root/d", [g.file(b"bad\xff\xfe", b"x")])
    err = _refused(g, sb)
    assert "UTF-8" in err.message


def test_terminal_escapes_in_names_never_reach_messages(sb):
    g = HostileGuest()
    g.dir("/root/d", [g.file("\x1b]0;owned\x07\x1b[2J/x", b"x")])
    err = _refused(g, sb)
    assert "\x1b" not in err.message and "\x07" not in err.message and "\\x1b" in err.message


def test_duplicate_names_are_refused(sb):
    g = HostileGuest()
    g.dir("/root/d", [g.file("x", b"first\n"), g.file("x", b"second\n")])
    assert "twice" in _refused(g, sb).message


# ---------------------------------------------------------------------------- links and writes through them
def test_link_then_a_write_through_it_is_refused(sb):
    g = HostileGuest()
    g.dir("/root/d", [g.link("link", str(sb.victim)), g.file("link/passwd", b"pwned::0:0::/:/bin/sh\n")])
    _refused(g, sb)
    assert (sb.victim / "passwd").read_text().startswith("root:x:")


def test_link_then_a_directory_of_the_same_name_is_refused(sb):
    g = HostileGuest()
    g.dir("/root/d", [g.link("link", str(sb.victim)), g.subdir("link")])
    g.dir("/root/d/link", [g.file("passwd", b"pwned\n"), g.file("new-file", b"planted\n")])
    assert "twice" in _refused(g, sb).message
    assert not (sb.victim / "new-file").exists()


def test_links_are_kept_only_when_they_stay_inside_the_copy(sb):
    g = HostileGuest()
    g.dir("/root/d", [g.file("top.txt", b"top\n"), g.subdir("sub"),
                      g.link("abs", str(sb.victim / "passwd")), g.link("up", "../../../victim/passwd"),
                      g.link("ok", "sub/file"), g.link("dotted", "./sub//file"),
                      g.file("fifo", mode=stat.S_IFIFO | 0o644), g.file("dev", mode=stat.S_IFCHR | 0o666)])
    g.dir("/root/d/sub", [g.file("file", b"in sub\n"), g.link("okup", "../top.txt"), g.link("c", ".."),
                          g.link("chain", "c/../../victim"), g.link("up2", "../../x")])
    warnings: list[str] = []
    assert _get(g, "/root/d", sb.dest, warn=warnings.append) == 2
    d = sb.dest
    assert os.readlink(d / "ok") == "sub/file" and (d / "ok").read_text() == "in sub\n"
    assert os.readlink(d / "dotted") == "./sub//file"
    assert os.readlink(d / "sub" / "okup") == "../top.txt" and (d / "sub" / "okup").read_text() == "top\n"
    assert os.readlink(d / "sub" / "c") == ".."
    for skipped in ("abs", "up", "fifo", "dev", "sub/chain", "sub/up2"):
        assert not os.path.lexists(d / skipped), skipped
    text = "\n".join(warnings)
    for name in ("abs", "up", "fifo", "dev", "chain", "up2"):
        assert name in text, (name, text)
    sb.assert_untouched()


def test_a_flood_of_skipped_entries_gives_a_bounded_number_of_warnings(sb):
    g = HostileGuest()
    g.dir("/root/d", [g.file(f"fifo{i}", mode=stat.S_IFIFO | 0o644) for i in range(500)] + [g.file("a", b"A")])
    warnings: list[str] = []
    assert _get(g, "/root/d", sb.dest, warn=warnings.append) == 1
    assert len(warnings) == sftpcopy.WARNINGS_MAX + 1 and "480 more" in warnings[-1]


def test_link_safety_rule():
    ok = [("a", 0), ("a/b", 0), ("./a", 0), ("../a", 1), ("../../a/b", 2), ("..", 1), ("../..", 2)]
    bad = [("/etc", 5), ("../a", 0), ("../../a", 1), ("a/../..", 3), ("c/../x", 3), ("", 3), ("a\0b", 1)]
    assert all(sftpcopy.safe_link_target(t, d) for t, d in ok)
    assert not any(sftpcopy.safe_link_target(t, d) for t, d in bad)


# ---------------------------------------------------------------------------- modes and ownership
def test_setuid_setgid_sticky_and_group_write_never_reach_the_host(sb):
    g = HostileGuest()
    g.dir("/root/d", [g.file("sh", b"\x7fELF...", mode=0o4755, uid=0, gid=0),
                      g.file("sgid", b"x", mode=0o2755, uid=1000, gid=50),
                      g.file("world", b"x", mode=0o777), g.file("shared", b"x", mode=0o666),
                      g.file("locked", b"x", mode=0o000), g.subdir("tmp", mode=0o41777)])
    g.dir("/root/d/tmp", [g.file("inner", b"x", mode=0o6777)], mode=0o41777)
    umask = sftpcopy.current_umask()
    assert _get(g, "/root/d", sb.dest) == 6
    expect = {"sh": 0o755, "sgid": 0o755, "world": 0o755, "shared": 0o644, "locked": 0o600, "tmp": 0o755,
              "tmp/inner": 0o755}
    for rel, mode in expect.items():
        st = os.lstat(sb.dest / rel)
        assert stat.S_IMODE(st.st_mode) == mode & ~umask, (rel, oct(st.st_mode))
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | 0o022), rel
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), rel
    sb.assert_untouched()


def test_a_single_setuid_file_arrives_without_the_bit(sb):
    g = HostileGuest()
    g.top["/root/sh"] = g.file("sh", b"\x7fELF", mode=0o4755, uid=0)
    assert _get(g, "/root/sh", sb.dest) == 1
    assert stat.S_IMODE(os.stat(sb.dest).st_mode) == 0o755 & ~sftpcopy.current_umask()


# ---------------------------------------------------------------------------- the destination
def test_a_destination_that_is_a_symlink_is_not_written_through(sb):
    g = HostileGuest()
    g.dir("/root/d", [g.file("passwd", b"pwned\n")])
    os.symlink(sb.victim, sb.dest)
    sb.before = sb.snapshot()
    with pytest.raises(BangerError) as ei:
        _get(g, "/root/d", sb.dest)
    assert ei.value.code == "conflict" and "symlink" in ei.value.message
    assert os.readlink(sb.dest) == str(sb.victim) and not (sb.victim / "d").exists()
    sb.assert_untouched()


def test_a_pre_existing_link_at_the_target_inside_a_dest_dir_is_not_written_through(sb):
    g = HostileGuest()
    g.dir("/root/d", [g.file("passwd", b"pwned\n"), g.file("planted", b"x")])
    sb.dest.mkdir()
    os.symlink(sb.victim, sb.dest / "d")
    with pytest.raises(BangerError) as ei:
        _get(g, "/root/d", sb.dest)
    assert ei.value.code == "conflict"
    assert os.readlink(sb.dest / "d") == str(sb.victim) and not (sb.victim / "planted").exists()
    os.unlink(sb.dest / "d")  # the test's own plant (the check below flags any outward link)
    sb.assert_untouched()


def test_an_existing_file_is_never_overwritten(sb):
    g = HostileGuest()
    g.top["/root/f"] = g.file("f", b"guest data\n")
    sb.dest.write_text("mine\n")
    with pytest.raises(BangerError) as ei:
        _get(g, "/root/f", sb.dest)
    assert ei.value.code == "conflict"
    assert sb.dest.read_text() == "mine\n"


def test_copy_into_an_existing_directory_creates_the_named_entry(sb):
    g = HostileGuest()
    g.dir("/root/d", [g.file("a", b"A")])
    sb.dest.mkdir()
    assert _get(g, "/root/d", sb.dest) == 1
    assert (sb.dest / "d" / "a").read_bytes() == b"A"


# ---------------------------------------------------------------------------- bounds
def _zeros(offset, length):
    return b"\0" * length


def test_a_file_claiming_more_than_the_bound_is_refused_before_fetching(sb):
    g = HostileGuest()
    g.dir("/root/d", [g.file("small", b"x"), g.file("huge", _zeros, size=64 << 20)])
    err = _refused(g, sb, code="limit_exceeded", max_bytes=1 << 20)
    assert "--max-size" in err.message
    assert not [r for r in g.requests if r[0] == "open" and r[1].endswith("/huge")]


def test_a_file_sending_more_than_it_claims_is_stopped_at_the_bound(sb):
    g = HostileGuest()
    g.dir("/root/d", [g.file("liar", _zeros, size=10)])   # claims 10 bytes, sends forever
    err = _refused(g, sb, code="limit_exceeded", max_bytes=3 << 20)
    assert "more than" in err.message and "claimed" in err.message


def test_the_default_bound_is_the_destination_free_space_minus_a_margin(sb, tmp_path):
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        fd = os.open(mnt, os.O_RDONLY)
        try:
            limit = sftpcopy.default_max_bytes(fd)
        finally:
            os.close(fd)
        assert 0 <= limit <= (96 - 64) << 20
        g = HostileGuest()
        g.dir("/root/d", [g.file("lies", _zeros, size=1 << 20)])  # claims 1 MiB, would send 96+ MiB
        with pytest.raises(BangerError) as ei:
            with serve(g) as t:
                sftpcopy.get(t, "/root/d", mnt / "out")
        assert ei.value.code == "limit_exceeded" and "free" in ei.value.message
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_infinite_nesting_is_refused(sb):
    g = HostileGuest()
    g.dir("/root/d", [g.subdir("d")])
    g.deep = lambda path: [g.subdir("d")] if path.startswith("/root/d/") else None
    err = _refused(g, sb)
    assert "deeper than" in err.message


def test_a_guest_that_stops_answering_times_out(sb, monkeypatch):
    monkeypatch.setattr(sftpcopy, "STALL_S", 1.0)
    g = HostileGuest(stall=threading.Event())
    g.dir("/root/d", [g.file("slow", b"x" * 100)])
    _refused(g, sb, code="timeout")


def test_fetch_file_for_bundles_is_bounded_and_new(sb):
    g = HostileGuest()
    g.top["/tmp/x.bundle"] = g.file("x.bundle", _zeros, size=100)   # claims 100 bytes, never ends
    g.top["/tmp/ok.bundle"] = g.file("ok.bundle", b"B" * 70000, mode=0o4777)
    with serve(g) as t:
        sftp = t.open_sftp_client()
        seen = []
        assert sftpcopy.fetch_file(sftp, "/tmp/ok.bundle", sb.dest, progress=lambda d, c: seen.append(d)) == 70000
        assert sb.dest.read_bytes() == b"B" * 70000 and stat.S_IMODE(os.stat(sb.dest).st_mode) == 0o600
        assert seen[-1] == 70000
        with pytest.raises(BangerError) as ei:
            sftpcopy.fetch_file(sftp, "/tmp/ok.bundle", sb.dest)     # never overwrites
        assert ei.value.code == "conflict"
        other = sb.dest_parent / "other"
        with pytest.raises(BangerError) as ei:
            sftpcopy.fetch_file(sftp, "/tmp/x.bundle", other, max_bytes=1 << 20)
        assert ei.value.code == "limit_exceeded" and not other.exists()
    sb.dest.unlink()


# ---------------------------------------------------------------------------- to the guest
def test_put_recreates_host_symlinks_and_never_reads_their_targets(sb, tmp_path):
    src = tmp_path / "repo"
    (src / "sub").mkdir(parents=True)
    (src / "README").write_text("hello\n")
    os.symlink(sb.victim / "etc" / "shadow", src / "leak")      # a repository's link to a host secret
    os.symlink(sb.victim / "etc", src / "sub" / "etcdir")
    g = HostileGuest()
    warnings: list[str] = []
    with serve(g) as t:
        n = sftpcopy.put(t, src, "/root/repo", warn=warnings.append)
    assert n == 1
    assert bytes(g.written["/root/repo/README"]) == b"hello\n"
    assert g.symlinks == {"/root/repo/leak": str(sb.victim / "etc" / "shadow"),
                          "/root/repo/sub/etcdir": str(sb.victim / "etc")}
    secret = (sb.victim / "etc" / "shadow").read_bytes()
    assert not [p for p, data in g.written.items() if secret in bytes(data)]


def test_put_skips_fifos_instead_of_blocking_on_them(sb, tmp_path):
    src = tmp_path / "tree"
    src.mkdir()
    (src / "a").write_text("a\n")
    os.mkfifo(src / "pipe")
    g = HostileGuest()
    warnings: list[str] = []
    with serve(g) as t:
        assert sftpcopy.put(t, src, "/root/tree", warn=warnings.append) == 1
    assert "/root/tree/pipe" not in g.written and any("pipe" in w for w in warnings)
