"""Guest console text is stripped of every terminal control before a terminal sees it."""

from __future__ import annotations

import random

import pytest

from banger.errors import UsageError
from banger.guest import console
from banger.guest.console import Sanitizer, sanitize


def forbidden(text: str) -> list[str]:
    return [c for c in text if (ord(c) < 0x20 and c not in "\n\t") or 0x7f <= ord(c) <= 0x9f]


@pytest.mark.parametrize("raw, clean", [
    ("plain text\n", "plain text\n"),
    ("a\x1b[31mred\x1b[0m b", "ared b"),                      # CSI (SGR)
    ("x\x1b[2J\x1b[H\x1b[?1049hy", "xy"),                      # clear screen, home, alt screen
    ("\x9b31mz", "z"),                                         # 8-bit CSI
    ("a\x1b]0;new title\x07b", "ab"),                          # OSC, BEL-terminated
    ("a\x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\c", "alinkc"),  # OSC 8 hyperlink, ST-terminated
    ("a\x1b]52;c;cHduZWQ=\x07b", "ab"),                        # OSC 52: write the clipboard
    ("\x9d0;t\x9cq", "q"),                                     # 8-bit OSC + ST
    ("x\x1bPq#0;2;0;0;0#0~~\x1b\\y", "xy"),                    # DCS (sixel)
    ("a\x1b_apc\x1b\\b\x1b^pm\x1b\\c\x1bXsos\x1b\\d", "abcd"),  # APC, PM, SOS
    ("lone\x1b", "lone"),                                      # a lone ESC at the end
    ("a\x1bcb\x1b(0c\x1b7d", "abcd"),                          # RIS, charset, save cursor
    ("a\rb\x08c\x07d\x00e\x7ff", "abcdef"),                    # CR, BS, BEL, NUL, DEL
    ("tab\tand\nnewline", "tab\tand\nnewline"),
    ("\x85\x8d\x9f", ""),                                      # C1 controls
    ("unterminated \x1b]0;title", "unterminated "),
    ("csi cut \x1b[1;3", "csi cut "),
    ("café ünïcode ✓", "café ünïcode ✓"),
])
def test_sanitize(raw, clean):
    assert sanitize(raw) == clean
    assert sanitize(raw.encode()) == clean


def test_invalid_utf8_never_becomes_a_c1_control():
    out = sanitize(b"a\x9bb\xc2\x9b31mc")   # a raw 0x9b byte is invalid UTF-8; C2 9B is U+009B (CSI)
    assert not forbidden(out) and out.startswith("a\ufffdb")


def test_random_input_never_leaves_a_control():
    rnd = random.Random(1234)
    alphabet = "\x1b[]P^_X\\;0123456789mHJ\x07\x9b\x9c\x9d\x90\x18\x1a\r\n\tab c\x00\x7f\x85"
    for _ in range(3000):
        s = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40)))
        assert not forbidden(sanitize(s)), repr(s)
        b = bytes(rnd.randrange(256) for _ in range(rnd.randint(0, 40)))
        assert not forbidden(sanitize(b)), b


def test_streaming_matches_whole_and_never_leaks_across_cuts():
    text = ("boot \x1b[1;32mOK\x1b[0m\r\n\x1b]0;title\x07line two \x9b4m\xe2\x9c\x93 \x1bPdcs\x1b\\end\n" * 20)
    data = text.encode()
    rnd = random.Random(7)
    for _ in range(200):
        s = Sanitizer()
        out, i = [], 0
        while i < len(data):
            n = rnd.randint(1, 9)
            out.append(s.feed(data[i:i + n]))
            i += n
        out.append(s.flush())
        joined = "".join(out)
        assert joined == sanitize(data)
        assert not forbidden(joined)


def test_streaming_random_bytes_never_leave_a_control():
    rnd = random.Random(99)
    for _ in range(300):
        s = Sanitizer()
        out = [s.feed(bytes(rnd.choice(b"\x1b[]\x07\x9b\xc2\x9dPab;1\n\r") for _ in range(rnd.randint(0, 12))))
               for _ in range(10)]
        out.append(s.flush())
        assert not forbidden("".join(out))


def test_an_unfinished_sequence_is_held_at_most_hold_max():
    s = Sanitizer()
    assert s.feed(b"a\x1b]0;") == "a"                 # maybe the start of a title: held
    big = s.feed(b"x" * (console.HOLD_MAX + 10))      # never terminated: released (as nothing)
    assert big == "" and s.flush() == ""
    assert s.feed(b"after\n") == "after\n"


def test_tail_reads_across_the_rotation_and_strips_escapes(tmp_path):
    log = tmp_path / "serial.log"
    (tmp_path / "serial.log.1").write_bytes(b"".join(b"old %d\r\n" % i for i in range(50)))
    log.write_bytes(b"new \x1b[31m1\x1b[0m\r\nnew 2\r\n")
    assert console.tail(log, 4) == "old 48\nold 49\nnew 1\nnew 2"
    assert console.read_all(log).endswith(b"old 49\r\nnew \x1b[31m1\x1b[0m\r\nnew 2\r\n")
    assert console.tail(tmp_path / "missing.log", 5) == ""


def test_the_cap_setting_is_checked():
    class Cfg:
        console_log_max_kib = 1024

    assert console.cap_bytes(Cfg()) == 1 << 20
    for bad in (0, 15, -1, 2 ** 40, "64", True, 1.5):
        Cfg.console_log_max_kib = bad
        with pytest.raises(UsageError) as ei:
            console.cap_bytes(Cfg())
        assert "console_log_max_kib" in ei.value.message and "16" in ei.value.hint


def test_parse_max_size():
    from banger.cli.vm import parse_bytes

    assert parse_bytes("100", "--max-size") == 100
    assert parse_bytes("0", "--max-size") == 0
    assert parse_bytes("512K", "--max-size") == 512 << 10
    assert parse_bytes("1.5G", "--max-size") == 3 << 29
    assert parse_bytes("2GiB", "--max-size") == 2 << 30
    assert parse_bytes(None, "--max-size") is None
    for bad in ("lots", "-1", "1.3", "nan", "inf", "1e30"):
        with pytest.raises(UsageError):
            parse_bytes(bad, "--max-size")
