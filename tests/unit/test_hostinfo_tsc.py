"""Where tsc_early_khz comes from: the TSC rate, each source with fake inputs, best source first."""

from __future__ import annotations

from banger.host import hostinfo


def kmsg_file(tmp_path, lines, name="kmsg"):
    """A file in /dev/kmsg's record format: 'prio,seq,usec,flags;text' (+ continuation lines)."""
    p = tmp_path / name
    out = []
    for seq, (usec, text) in enumerate(lines):
        out.append(f"6,{seq},{usec},-;{text}\n")
        out.append(" SUBSYSTEM=cpu\n")  # a continuation line: never a message
    p.write_text("".join(out))
    return str(p)


NO = "/nonexistent/banger-test"
INVARIANT = {"tsc", "constant_tsc", "nonstop_tsc"}


def no_cpuid(leaf, sub=0):
    return (0, 0, 0, 0)  # max leaf 0: nothing to read


def no_measure():
    raise AssertionError("must not measure when a better source answered")


def fake_cpuid(table, max_leaf, hypervisor=False):
    def cpuid(leaf, sub=0):
        if leaf == 0:
            return (max_leaf, 0, 0, 0)
        if leaf == 1:
            return (0, 0, (1 << 31) if hypervisor else 0, 0)
        return table.get(leaf, (0, 0, 0, 0))
    return cpuid


def test_sysfs_wins(tmp_path):
    f = tmp_path / "tsc_freq_khz"
    f.write_text("2199998\n")
    km = kmsg_file(tmp_path, [(59, "tsc: Detected 2596.096 MHz processor")])
    assert hostinfo.detect_tsc(sysfs=str(f), kmsg=km, cpuid=no_cpuid, measure=no_measure,
                               cpuinfo=NO) == (2199998, "sysfs")


def test_kmsg_refined_beats_detected(tmp_path):
    km = kmsg_file(tmp_path, [(0, "Linux version 6.1"), (59, "tsc: Fast TSC calibration using PIT"),
                              (60, "tsc: Detected 2893.202 MHz processor"),
                              (1_400_000, "tsc: Refined TSC clocksource calibration: 2893.197 MHz"),
                              (1_400_100, "clocksource: tsc: mask: 0xffffffffffffffff")])
    assert hostinfo.detect_tsc(sysfs=NO, kmsg=km, cpuid=no_cpuid, measure=no_measure,
                               cpuinfo=NO) == (2893197, "kmsg-refined")


def test_kmsg_tsc_line_beats_processor_line(tmp_path):
    # the kernel prints "MHz TSC" only when the TSC's rate differs from the CPU's
    km = kmsg_file(tmp_path, [(59, "tsc: Detected 3400.000 MHz processor"), (61, "tsc: Detected 2400.000 MHz TSC")])
    assert hostinfo.detect_tsc(sysfs=NO, kmsg=km, cpuid=no_cpuid, measure=no_measure,
                               cpuinfo=NO) == (2400000, "kmsg-tsc")


def test_kmsg_processor_line_and_current_cpu_mhz_ignored(tmp_path):
    km = kmsg_file(tmp_path, [(59, "tsc: Detected 2596.096 MHz processor")])
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu MHz\t\t: 1397.211\n")  # the current (scaled) frequency
    assert hostinfo.detect_tsc(sysfs=NO, kmsg=km, cpuid=no_cpuid, measure=no_measure,
                               cpuinfo=str(cpuinfo)) == (2596096, "kmsg-processor")


def test_kmsg_lines_after_the_boot_horizon_are_not_read(tmp_path):
    # a ring buffer whose boot lines are gone: the first record is long after boot
    km = kmsg_file(tmp_path, [(172_585_481, "banger0: port 1(tap-pool-0) entered blocking state"),
                              (172_600_000, "tsc: Detected 1000.000 MHz processor")])
    assert list(hostinfo.kmsg_messages(km)) == []
    assert hostinfo.tsc_from_kernel_log(hostinfo.kmsg_messages(km)) is None


def test_kmsg_garbage_is_ignored(tmp_path):
    p = tmp_path / "kmsg"
    p.write_bytes(b"nonsense\n6,1,x,-;tsc: Detected 9.9 MHz processor\n6,2,5,-;tsc: Detected abc MHz processor\n"
                  b"6,3,6,-;tsc: Detected 99999999.000 MHz processor\n\xff\xfe;\n")
    assert hostinfo.tsc_from_kernel_log(hostinfo.kmsg_messages(str(p))) is None


def test_cpuid_leaf_15h(tmp_path):
    # crystal 24 MHz x 176/2 = 2112 MHz
    cpuid = fake_cpuid({0x15: (2, 176, 24_000_000, 0), 0x16: (2100, 4000, 100, 0)}, 0x16)
    assert hostinfo.detect_tsc(sysfs=NO, kmsg=NO, cpuid=cpuid, measure=no_measure,
                               cpuinfo=NO) == (2112000, "cpuid-15h")


def test_cpuid_hypervisor_leaf(tmp_path):
    cpuid = fake_cpuid({0x15: (0, 0, 0, 0), 0x40000000: (0x40000010, 0, 0, 0), 0x40000010: (2596096, 0, 0, 0)},
                       0x1C, hypervisor=True)
    assert hostinfo.detect_tsc(sysfs=NO, kmsg=NO, cpuid=cpuid, measure=no_measure,
                               cpuinfo=NO) == (2596096, "cpuid-hypervisor")


def test_measured_when_no_log_and_no_cpuid_leaf(tmp_path):
    # an AMD host whose boot lines rotated out of the kernel log: count the TSC
    cpuid = fake_cpuid({0x40000000: (0x40000001, 0, 0, 0)}, 0x1C, hypervisor=True)
    assert hostinfo.detect_tsc(sysfs=NO, kmsg=NO, cpuid=cpuid, measure=lambda: 2596101, flags=INVARIANT,
                               cpuinfo=NO) == (2596101, "measured")


def test_no_measurement_without_an_invariant_tsc(tmp_path):
    cpuid = fake_cpuid({0x16: (2100, 4000, 100, 0)}, 0x16)
    assert hostinfo.detect_tsc(sysfs=NO, kmsg=NO, cpuid=cpuid, measure=no_measure, flags={"tsc"},
                               cpuinfo=NO) == (2100000, "cpuid-16h")


def test_cpuinfo_only_as_the_last_resort(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu tsc\ncpu MHz\t\t: 2596.096\n")
    assert hostinfo.detect_tsc(sysfs=NO, kmsg=NO, cpuid=no_cpuid, measure=no_measure, flags={"tsc"},
                               cpuinfo=str(cpuinfo)) == (2596096, "cpuinfo")
    assert hostinfo.detect_tsc(sysfs=NO, kmsg=NO, cpuid=no_cpuid, measure=no_measure, flags={"tsc"},
                               cpuinfo=NO) == (None, None)


def test_implausible_values_fall_through(tmp_path):
    f = tmp_path / "tsc_freq_khz"
    f.write_text("0\n")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("cpu MHz\t\t: 2000.000\n")
    assert hostinfo.detect_tsc(sysfs=str(f), kmsg=NO, cpuid=no_cpuid, measure=lambda: 12, flags=INVARIANT,
                               cpuinfo=str(cpuinfo)) == (2000000, "cpuinfo")


def test_real_measurement_is_consistent():
    from banger.uffd import _uffd

    if "constant_tsc" not in hostinfo.cpu_flags():  # a TSC that is not invariant: its rate means nothing
        assert hostinfo.tsc_measured() is None
        return
    a, b = _uffd.tsc_rate_khz(2000), _uffd.tsc_rate_khz(20000)
    assert abs(a - b) / b < 5e-4, (a, b)


def test_detected_once_per_process_and_bootargs_use_it(monkeypatch):
    from banger.guest.bootargs import guest_cmdline
    from banger.vmm import registry

    hostinfo.tsc_info.cache_clear()
    calls = []

    def fake():
        calls.append(1)
        return 2345678, "measured"

    monkeypatch.setattr(hostinfo, "detect_tsc", fake)
    try:
        for _ in range(3):
            cmd = guest_cmdline(ip="10.0.0.2", prefixlen=24, gateway="10.0.0.1", hostname="h",
                                extra=registry.backend("qemu").boot_args())
            assert "tsc_early_khz=2345678" in cmd.split()
        assert calls == [1]
        assert "tsc_early_khz" not in guest_cmdline(ip="10.0.0.2", prefixlen=24, gateway="10.0.0.1", hostname="h",
                                                    extra=registry.backend("firecracker").boot_args())
    finally:
        hostinfo.tsc_info.cache_clear()
