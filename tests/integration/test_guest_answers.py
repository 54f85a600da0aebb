"""Odd data from a guest over a real SSH channel (a scripted paramiko server on a socket pair):
megabytes on stderr do not stall the exec path, non-UTF-8 output survives, output is bounded, and
a hostile guest's answers during a workspace export are refused clearly instead of being used."""

from __future__ import annotations

import time

import pytest

from banger.errors import GuestTimeout, IntegrityError
from banger.guest import ssh
from banger.workspace.guest import Guest
from tests.support.sshguest import ScriptedGuest

SHA_A = "a" * 40
SHA_B = "b" * 40


def test_megabytes_on_stderr_before_stdout_do_not_deadlock_the_channel():
    big = b"e" * (8 << 20)           # four times paramiko's 2 MiB channel window

    with ScriptedGuest(lambda cmd: (b"the answer\n", big, 3)) as g:
        t0 = time.monotonic()
        rc, out, err = ssh.run_capture(g.client, ["noisy"], timeout=60)
        took = time.monotonic() - t0
    print(f"\n8 MiB of stderr then stdout: {took:.2f}s")
    assert (rc, out, len(err)) == (3, "the answer\n", len(big))
    assert took < 30


def test_non_utf8_output_survives_and_goes_back_as_the_same_bytes():
    name = b"caf\xe9-\xff.txt"        # a git -z path that is not UTF-8

    def answer(cmd: bytes):
        if cmd.startswith(b"echo-back "):
            return cmd[len(b"echo-back "):], b"", 0
        return name + b"\0", b"bad \xff byte\n", 0

    with ScriptedGuest(answer) as g:
        rc, out, err = ssh.run_capture(g.client, ["git", "ls-files", "-z"])
        assert rc == 0 and out.encode("utf-8", "surrogateescape") == name + b"\0"
        assert "\ufffd" in err                       # stderr is for people: replaced, never an exception
        # a name read back from the guest reaches the guest again byte for byte
        rc, out, _ = ssh.run_capture(g.client, ["echo-back " + out.rstrip("\0")])
        assert g.commands[-1] == b"echo-back " + name


def test_output_is_bounded():
    with ScriptedGuest(lambda cmd: (b"x" * (3 << 20), b"", 0)) as g:
        with pytest.raises(ssh.SshError, match="more than 1 MiB"):
            ssh.run_capture(g.client, ["flood"], max_bytes=1 << 20)


def test_a_guest_that_never_finishes_times_out():
    def answer(cmd):
        time.sleep(30)
        return b"", b"", 0

    with ScriptedGuest(answer) as g:
        t0 = time.monotonic()
        with pytest.raises(GuestTimeout):
            ssh.run_capture(g.client, ["hang"], timeout=1.5)
        assert time.monotonic() - t0 < 10


# ---------------------------------------------------------------- a hostile guest's answers
def _guest(cfg, answers: dict[bytes, bytes]):
    """A Guest whose git answers are ``answers[first word after 'git -C REPO']``."""
    from banger.context import Ctx

    def answer(cmd: bytes):
        for key, out in answers.items():
            if key in cmd:
                return out, b"", 0
        return b"", b"unexpected command\n", 1

    sg = ScriptedGuest(answer)
    return sg, Guest(Ctx(cfg), {"id": "0" * 32, "name": "evil"}, sg.client, "export")


def test_branch_names_that_could_be_options_or_break_the_host_are_never_used(cfg):
    listing = (f"{SHA_A} refs/heads/main\n{SHA_B} refs/heads/--upload-pack=touch /tmp/x\n"
               f"{SHA_B} refs/heads/-x\n{SHA_B} refs/heads/a..b\n{SHA_B} refs/heads/\x1b[31mred\n"
               f"{SHA_B} refs/heads/ok/topic\n").encode() + SHA_B.encode() + b" refs/heads/caf\xe9\n"
    sg, g = _guest(cfg, {b"for-each-ref": listing})
    with sg:
        ok, odd = g.branches("/root/r")
    assert ok == {"main": SHA_A, "ok/topic": SHA_B}
    assert [o["branch"] for o in odd] == ["--upload-pack=touch /tmp/x", "-x", "a..b", "\\x1b[31mred", "caf\\xe9"]


@pytest.mark.parametrize("listing", [
    b"not-a-sha refs/heads/main\n",
    b"aaaa refs/heads/main\n",
    (SHA_A + " refs/tags/v1\n").encode(),
    (SHA_A + "refs/heads/main\n").encode(),
    (f"{SHA_A} refs/heads/main\n{SHA_B} refs/heads/main\n").encode(),
])
def test_malformed_ref_listings_are_refused(cfg, listing):
    sg, g = _guest(cfg, {b"for-each-ref": listing})
    with sg, pytest.raises(IntegrityError, match="unexpected answer") as e:
        g.branches("/root/r")
    assert "evil" in e.value.message and e.value.hint


@pytest.mark.parametrize("answer", [b"main 3\n", b"main 3\ndev x\n", b"main 3\ndev 2\nother 1\n",
                                    b"main 3\nmain 3\ndev 1\n", b"main 99999999999\ndev 1\n", b""])
def test_commit_counts_must_name_each_branch_once_with_a_number(cfg, answer):
    sg, g = _guest(cfg, {b"rev-list --count": answer})
    with sg, pytest.raises(IntegrityError):
        g.counts("/root/r", ["main", "dev"], [SHA_A])


def test_counts_and_head_accept_a_well_formed_answer(cfg):
    sg, g = _guest(cfg, {b"rev-list --count": b"dev 2\nmain 3\n", b"symbolic-ref": b"refs/heads/main\n",
                         b"rev-parse": (SHA_A + "\n").encode()})
    with sg:
        assert g.counts("/root/r", ["main", "dev"], [SHA_A]) == {"main": 3, "dev": 2}
        assert g.head("/root/r") == ("main", SHA_A)


def test_odd_heads_and_preflight_answers(cfg):
    sg, g = _guest(cfg, {b"symbolic-ref": b"refs/heads/-evil\n", b"rev-parse": b"zzzz\n"})
    with sg, pytest.raises(IntegrityError, match="rev-parse"):
        g.head("/root/r")
    sg, g = _guest(cfg, {b"symbolic-ref": b"refs/heads/-evil\n", b"rev-parse": (SHA_A + "\n").encode()})
    with sg:
        assert g.head("/root/r") == (None, SHA_A)      # an unusable branch name counts as detached
    for out in (b"git ok\nkind repo\ntmp /etc\n", b"git ok\nkind weird\n",
                b"git ok\nkind repo\ntmp /root/r/.git/../../etc/banger-export-\n"):
        sg, g = _guest(cfg, {b"sh -c": out})
        with sg, pytest.raises(IntegrityError, match="preflight"):
            g.preflight("/root/r", "export")
