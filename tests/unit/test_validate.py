"""banger/validate.py: each checker accepts what it documents and names field, value and what is allowed
for everything else."""

from __future__ import annotations

import pytest

from banger import validate as v
from banger.errors import EXIT_USAGE, UsageError


@pytest.mark.parametrize("raw,mib", [("1024", 1024), ("512M", 512), ("512MiB", 512), ("2G", 2048), ("2gib", 2048),
                                     ("1.5G", 1536), ("1T", 1 << 20), (" 4G ", 4096), (2048, 2048), ("128mb", 128)])
def test_sizes_accepted(raw, mib):
    assert v.size_mib(raw, "--memory", "memory_mib") == mib


@pytest.mark.parametrize("raw", ["inf", "nan", "-1", "-1G", "0", "0G", "1e9T", "1e3", "2T", "127", "1.0000001G",
                                 "", "G", "12X", "1_000", "0x10", True, None, [], float("inf"), float("nan"), 1.5])
def test_sizes_rejected(raw):
    with pytest.raises(v.InvalidInput) as ei:
        v.size_mib(raw, "--memory", "memory_mib")
    e = ei.value
    assert isinstance(e, UsageError) and e.exit_code == EXIT_USAGE and e.code == "invalid_input"
    assert e.message.startswith("--memory: invalid value ") and "128 MiB to 1 TiB" in e.message
    assert e.details["field"] == "--memory" and e.hint


def test_disk_limits_are_per_field():
    assert v.size_mib("16T", "--overlay-size", "overlay_size_mib") == 16 << 20
    with pytest.raises(v.InvalidInput, match="64 MiB to 16 TiB"):
        v.size_mib("17T", "--overlay-size", "overlay_size_mib")
    with pytest.raises(v.InvalidInput):
        v.size_mib("32M", "--work-disk-size", "work_disk_size_mib")


@pytest.mark.parametrize("raw,ok", [("1", 1), ("64", 64), (8, 8), ("0", None), ("65", None), ("-1", None),
                                    ("1.5", None), (1.0, None), (True, None), ("two", None), ("", None)])
def test_integers(raw, ok):
    if ok is None:
        with pytest.raises(v.InvalidInput, match=r"--vcpu: .*a whole number from 1 to 64"):
            v.integer(raw, "--vcpu", "vcpu")
    else:
        assert v.integer(raw, "--vcpu", "vcpu") == ok


@pytest.mark.parametrize("raw,ok", [(True, True), (False, False), ("yes", True), ("0", False), ("OFF", False),
                                    ("maybe", None), (1, None), ("", None), (None, None)])
def test_booleans_are_strict(raw, ok):
    if ok is None:
        with pytest.raises(v.InvalidInput, match="true or false"):
            v.boolean(raw, "nat")
    else:
        assert v.boolean(raw, "nat") is ok


def test_choices_name_the_allowed_values():
    from banger.vmm.registry import choices

    assert v.choice("qemu", "--backend", choices()) == "qemu"
    with pytest.raises(v.InvalidInput) as ei:
        v.choice("xen", "--backend", choices())
    assert "xen" in ei.value.message and all(c in ei.value.message for c in choices())


@pytest.mark.parametrize("raw,s", [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400),
                                   ("7d", 7 * 86400), (45, 45)])
def test_durations(raw, s):
    assert v.duration_s(raw, "--ttl") == s


@pytest.mark.parametrize("raw", ["", "0", "30x", "m", "-5m", "inf", "nan", "400d", "1.5h", True, None])
def test_durations_rejected(raw):
    with pytest.raises(v.InvalidInput, match="--ttl: invalid value"):
        v.duration_s(raw, "--ttl")


@pytest.mark.parametrize("raw", ["", "Bad_Name", "-x", "x" * 64, "a b", "a\0b", None])
def test_names(raw):
    with pytest.raises(v.InvalidInput, match="--name: invalid value"):
        v.name(raw, "--name")
    assert v.name("dev-1", "--name") == "dev-1"


def test_text_numbers_subnets():
    with pytest.raises(v.InvalidInput, match="non-empty"):
        v.text("  ", "--name")
    with pytest.raises(v.InvalidInput, match="printable"):
        v.text("a\x1b[31m", "--dest")
    for bad in ("inf", "nan", "-1", "1e5", 10 ** 9, float("inf")):
        with pytest.raises(v.InvalidInput):
            v.number(bad, "--timeout", "stop_timeout_s")
    assert v.number("2.5", "--timeout", "stop_timeout_s") == 2.5
    assert v.subnet("10.1.0.0/16", "subnet") == "10.1.0.0/16"
    for bad in ("10.0.0.0/30", "nope", "::/64", 5):
        with pytest.raises(v.InvalidInput, match="IPv4 network"):
            v.subnet(bad, "subnet")
    assert v.sha256_hex("sha256:" + "A" * 64, "--sha256") == "a" * 64
