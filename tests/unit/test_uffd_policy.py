"""Pure parts of the UFFD handler: handshake validation, access log format, prefetch plans, settling."""

from __future__ import annotations

import array
import json
import os
import struct

import pytest

from banger.uffd import enabled, policy, prefetch_enabled
from banger.uffd.handshake import HandshakeError, Region, parse_regions
from banger.uffd.spawn import handler_argv

PS = 4096
MB = 1 << 20


def doc(*regions, **fields):
    out = []
    for base, size, off in regions:
        d = {"base_host_virt_addr": base, "size": size, "offset": off, "page_size": PS, "page_size_kib": PS}
        d.update(fields)
        out.append({k: v for k, v in d.items() if v is not None})
    return json.dumps(out).encode()


def test_parse_two_regions_back_to_back():
    regions, ps, ignored = parse_regions(doc((0x7F0000000000, 2 * MB, 0), (0x7F1000000000, MB, 2 * MB)), 3 * MB)
    assert ps == PS
    assert regions == [Region(0x7F0000000000, 2 * MB, 0), Region(0x7F1000000000, MB, 2 * MB)]
    assert ignored == []


@pytest.mark.parametrize("fields, want", [
    ({}, PS),                                          # 1.12+: both fields
    ({"page_size": None}, PS),                         # 1.7-1.11: page_size_kib only (in bytes)
    ({"page_size": None, "page_size_kib": None}, PS),  # <=1.6: neither -> 4096
    ({"page_size": 2 * MB, "page_size_kib": None}, 2 * MB),
    ({"page_size": None, "page_size_kib": 2 * MB}, 2 * MB),
])
def test_page_size_fallbacks(fields, want):
    _, ps, _ = parse_regions(doc((0x40000000, 4 * MB, 0), **fields), 4 * MB)
    assert ps == want


@pytest.mark.parametrize("payload, fragment", [
    (b'[{"base_host_virt_addr": 1, "size": ', "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[]", "non-empty JSON array"),
    (b'{"a": 1}', "non-empty JSON array"),
    (b"[1]", "not a JSON object"),
    (json.dumps([{"size": PS, "offset": 0}]).encode(), "no 'base_host_virt_addr'"),
    (doc((0x40000000, PS, 0), page_size=65536, page_size_kib=65536), "unsupported page size 65536"),
    (doc((0x40000000, PS, 0), page_size=PS, page_size_kib=2 * MB), "disagree"),
    (doc((0x40000000, PS, 0), page_size="4096"), "unsigned 64-bit integer"),
    (doc((0x40000000, PS, 0), page_size=True), "unsigned 64-bit integer"),
    (doc((0x40000000, -PS, 0)), "unsigned 64-bit integer"),
    (doc((0x40000000, 0, 0)), "is empty"),
    (doc((0x40000200, PS, 0)), "not aligned"),
    (doc((0x40000000, 1000, 0)), "not aligned"),
    (doc((0x40000000, PS, 100)), "not aligned"),
    (doc((0x40000000, 2 * PS, 0), (0x40001000, PS, 2 * PS)), "overlap in memory"),
    (doc((0x40000000, 2 * PS, 0), (0x50000000, PS, PS)), "overlap in the memory file"),
    (doc((0x40000000, 2 * PS, 0), (0x50000000, 2 * PS, 2 * PS)), "past the end of the memory file"),
    (doc((0x40000000, 2 * MB, 0), page_size=2 * MB, page_size_kib=2 * MB), "past the end"),
])
def test_bad_handshakes_are_refused_with_a_hint(payload, fragment):
    with pytest.raises(HandshakeError) as ei:
        parse_regions(payload, 3 * PS)
    assert fragment in ei.value.message
    assert ei.value.hint
    assert ei.value.code == "uffd_handshake"


def test_mixed_page_sizes_refused():
    payload = json.dumps([
        {"base_host_virt_addr": 0x40000000, "size": 2 * MB, "offset": 0, "page_size": 2 * MB},
        {"base_host_virt_addr": 0x80000000, "size": 2 * MB, "offset": 2 * MB, "page_size": PS},
    ]).encode()
    with pytest.raises(HandshakeError, match="differs"):
        parse_regions(payload, 4 * MB)


def test_unknown_fields_are_reported_not_fatal():
    _, _, ignored = parse_regions(doc((0x40000000, PS, 0), future_field=1), PS)
    assert ignored == ["future_field"]


def test_log_roundtrip_and_validation():
    pages = array.array("I", [5, 1, 9, 2])
    blob = policy.encode_log(pages, PS, 16 * PS)
    assert len(blob) == 32 + 16
    assert blob[:8] == b"BGRUFFDL"
    assert struct.unpack_from("<4I", blob, 32) == (5, 1, 9, 2)
    assert list(policy.decode_log(blob, PS, 16 * PS)) == [5, 1, 9, 2]
    with pytest.raises(policy.LogInvalid, match="recorded for"):
        policy.decode_log(blob, PS, 32 * PS)
    with pytest.raises(policy.LogInvalid, match="recorded for"):
        policy.decode_log(blob, 2 * MB, 16 * PS)
    with pytest.raises(policy.LogInvalid, match="does not match"):
        policy.decode_log(blob[:-1], PS, 16 * PS)
    with pytest.raises(policy.LogInvalid, match="magic"):
        policy.decode_log(b"X" * 40, PS, 16 * PS)
    with pytest.raises(policy.LogInvalid, match="past the end"):
        policy.decode_log(policy.encode_log(array.array("I", [16]), PS, 16 * PS), PS, 16 * PS)


def test_log_file_is_written_atomically(tmp_path):
    path = tmp_path / "mem.access"
    policy.write_log(path, array.array("I", [3, 4]), PS, 8 * PS)
    assert policy.peek_log_page_size(path) == PS
    assert list(policy.read_log(path, PS, 8 * PS)) == [3, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["mem.access"]  # no temp file left
    assert policy.read_log(tmp_path / "missing", PS, 8 * PS) is None


def runs(plan):
    return [(plan[i], plan[i + 1]) for i in range(0, len(plan), 2)]


def test_plan_from_log_sorts_within_growing_chunks_and_coalesces():
    # first chunk (4): 10, 3, 11, 4 -> runs 3-4, 10-11; second chunk (8): 12, 3 (dup), 20, 13, 5
    log = [10, 3, 11, 4, 12, 3, 20, 13, 5]
    plan = policy.plan_from_log(log, 64, first_chunk=4)
    assert runs(plan) == [(3, 2), (10, 2), (5, 1), (12, 2), (20, 1)]
    assert policy.plan_pages(plan) == len(set(log))


def test_plan_from_log_keeps_early_pages_early():
    log = list(range(1000, 0, -1))  # touched backwards
    plan = policy.plan_from_log(log, 2000, first_chunk=10)
    assert runs(plan)[0] == (991, 10)  # the ten earliest-touched pages come first
    assert policy.plan_pages(plan) == 1000


def test_plan_from_log_drops_pages_past_the_file():
    assert runs(policy.plan_from_log([1, 2, 99], 10)) == [(1, 2)]


def test_fill_plan_is_file_ordered():
    regions = [Region(0x9000000, 4 * PS, 8 * PS), Region(0x1000000, 8 * PS, 0)]
    assert runs(policy.fill_plan(regions, PS)) == [(0, 8), (8, 4)]


def test_settler_needs_first_fault_then_quiet_intervals():
    s = policy.Settler(quiet_faults=5, intervals=3)
    assert [s.observe(0) for _ in range(10)] == [False] * 10  # the guest has not run yet
    assert s.observe(100) is False   # burst
    assert s.observe(150) is False   # still busy (50 new)
    assert s.observe(152) is False   # quiet 1
    assert s.observe(154) is False   # quiet 2
    assert s.observe(200) is False   # busy again resets
    assert [s.observe(201), s.observe(202), s.observe(203)] == [False, False, True]


def test_switches():
    assert enabled({}) and prefetch_enabled({})
    assert not enabled({"BANGER_UFFD": "0"})
    assert enabled({"BANGER_UFFD": "1"})
    assert not prefetch_enabled({"BANGER_UFFD_PREFETCH": "0"})
    assert not prefetch_enabled({"BANGER_UFFD_PREFETCH": "off"})
    assert prefetch_enabled({"BANGER_UFFD": "0"})  # independent switches


def test_handler_argv():
    argv = handler_argv("/run/x/uffd.sock", "/s/mem", access_log="/s/mem.access", stats_path="/run/x/st.json",
                        prefetch=False, connect_timeout=2.5, vmm_pid=42)
    import banger

    assert argv[1:3] == ["-I", "-c"]  # isolated: no cwd, PYTHONPATH or user site on sys.path
    assert argv[4:] == [os.path.dirname(os.path.abspath(banger.__file__)), "banger.uffd.handler", "/run/x/uffd.sock",
                        "--mem-file", "/s/mem", "--connect-timeout", "2.5", "--access-log", "/s/mem.access",
                        "--stats", "/run/x/st.json", "--no-prefetch", "--vmm-pid", "42"]


def test_handler_argv_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the handler runs in /: a relative path would name another file
    argv = handler_argv("run/uffd.sock", "mem", access_log="mem.access", stats_path="st.json")
    assert argv[6:12] == [str(tmp_path / "run/uffd.sock"), "--mem-file", str(tmp_path / "mem"),
                          "--connect-timeout", "30", "--access-log"]
    assert argv[12] == str(tmp_path / "mem.access") and argv[14] == str(tmp_path / "st.json")


def test_server_rejects_bad_layouts(tmp_path):
    from banger.uffd import _uffd

    mem = tmp_path / "mem"
    mem.write_bytes(b"\1" * (4 * PS))
    with open(mem, "rb") as f:
        fd = f.fileno()
        with pytest.raises(ValueError, match="page size"):
            _uffd.Server(-1, fd, [(0x10000, PS, 0)], 8192)
        with pytest.raises(ValueError, match="past the end"):
            _uffd.Server(-1, fd, [(0x10000, 4 * PS, PS)], PS)
        with pytest.raises(ValueError, match="unaligned"):
            _uffd.Server(-1, fd, [(0x10001, PS, 0)], PS)
        with pytest.raises(ValueError, match="overlap"):
            _uffd.Server(-1, fd, [(0x10000, 2 * PS, 0), (0x11000, PS, 2 * PS)], PS)
        with pytest.raises(ValueError, match="multiple of the page size"):
            _uffd.Server(-1, fd, [(0x200000, 2 * MB, 0)], 2 * MB)
        with pytest.raises(ValueError, match="pairs"):
            _uffd.Server(-1, fd, [(0x10000, PS, 0)], PS).set_plan(b"123")


def test_plan_from_touch_order_keeps_interleaved_walkers_apart():
    # two vCPUs walking 10.. and 50.. interleave page by page; then one page elsewhere, a repeat,
    # a page past the file, and 13 that extends the first walk long after it began
    log = [10, 50, 11, 51, 12, 52, 5, 11, 999, 13]
    plan = policy.plan_from_touch_order(log, 64)
    assert runs(plan) == [(10, 4), (50, 3), (5, 1)]
    assert policy.plan_pages(plan) == len({p for p in log if p < 64})


def test_plan_from_touch_order_backwards_walk_is_one_page_per_run_in_order():
    plan = policy.plan_from_touch_order(array.array("I", [7, 6, 5]), 8)
    assert runs(plan) == [(7, 1), (6, 1), (5, 1)]
    assert runs(policy.plan_from_touch_order([], 8)) == []


def test_merge_logs_appends_only_new_pages_in_order():
    merged = policy.merge_logs(array.array("I", [4, 2, 9]), array.array("I", [2, 7, 4, 1]))
    assert list(merged) == [4, 2, 9, 7, 1]
