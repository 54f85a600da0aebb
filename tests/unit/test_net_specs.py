"""-p / --allow / --net parsing: strict, and every error names the value and what is allowed."""

from __future__ import annotations

import pytest

from banger.errors import UsageError
from banger.net import policy, ports
from banger.net.policy import Allow
from banger.net.ports import PortSpec


@pytest.mark.parametrize("text,want", [
    ("8080:80", PortSpec("tcp", None, 8080, 80)),
    ("8080:80/tcp", PortSpec("tcp", None, 8080, 80)),
    ("5353:53/udp", PortSpec("udp", None, 5353, 53)),
    ("127.0.0.1:5432:5432", PortSpec("tcp", "127.0.0.1", 5432, 5432)),
    ("0.0.0.0:80:8080", PortSpec("tcp", None, 80, 8080)),  # all addresses, as with no address
    ("10.1.2.3:1:65535/udp", PortSpec("udp", "10.1.2.3", 1, 65535)),
])
def test_port_specs_parse(text, want):
    assert ports.parse(text) == want


def test_port_spec_canonical_text():
    assert str(ports.parse("8080:80")) == "8080:80/tcp"
    assert str(ports.parse("127.0.0.1:53:53/udp")) == "127.0.0.1:53:53/udp"
    assert ports.parse(str(ports.parse("127.0.0.1:53:53/udp"))) == ports.parse("127.0.0.1:53:53/udp")


@pytest.mark.parametrize("text,needle", [
    ("", "empty"),
    ("8080", "needs both a host port and a guest port"),
    ("8080:", "guest port '' is not a port number"),
    (":80", "host port '' is not a port number"),
    ("0:80", "host port 0 is out of range"),
    ("8080:65536", "guest port 65536 is out of range"),
    ("8080:80/sctp", "protocol 'sctp' is not tcp or udp"),
    ("8080:80/", "protocol '' is not tcp or udp"),
    ("-1:80", "host port '-1' is not a port number"),
    ("+80:80", "host port '+80' is not a port number"),
    ("8080 :80", "contains whitespace"),
    ("localhost:8080:80", "host address 'localhost' is not an IPv4 address"),
    ("1.2.3:8080:80", "host address '1.2.3' is not an IPv4 address"),
    ("224.0.0.1:8080:80", "224.0.0.1 is not a unicast address"),
    ("[::1]:8080:80", "IPv6 host addresses are not supported"),
    ("a:b:c:d", "too many"),
    ("80-90:80-90", "host port '80-90' is not a port number"),
])
def test_bad_port_specs_name_the_value(text, needle):
    with pytest.raises(UsageError) as ei:
        ports.parse(text)
    assert f"-p {text!r}" in ei.value.message and needle in ei.value.message, ei.value.message
    assert ei.value.hint and ("HOSTPORT" in ei.value.hint or "ports are 1-65535" in ei.value.hint)


def test_the_same_host_port_twice_is_refused_per_protocol():
    assert len(ports.parse_many(["8080:80", "8080:80/udp"])) == 2
    with pytest.raises(UsageError) as ei:
        ports.parse_many(["8080:80", "127.0.0.1:8080:81"])
    assert "8080/tcp is given twice" in ei.value.message


def test_port_refs_for_removal():
    assert ports.parse_ref("8080") == (None, 8080)
    assert ports.parse_ref("8080/udp") == ("udp", 8080)
    assert ports.parse_ref("127.0.0.1:8080:80") == ("tcp", 8080)
    with pytest.raises(UsageError):
        ports.parse_ref("8080/icmp")


@pytest.mark.parametrize("text,want", [
    ("10.0.0.0/8", Allow("10.0.0.0/8")),
    ("192.168.1.5", Allow("192.168.1.5/32")),
    ("192.168.1.5:5432", Allow("192.168.1.5/32", None, 5432, 5432)),
    ("192.168.1.5:5432/tcp", Allow("192.168.1.5/32", "tcp", 5432, 5432)),
    ("0.0.0.0/0:443", Allow("0.0.0.0/0", None, 443, 443)),
    ("10.0.0.0/8:8000-8100/udp", Allow("10.0.0.0/8", "udp", 8000, 8100)),
])
def test_allow_specs_parse(text, want):
    assert policy.parse_allow(text) == want


def test_allow_canonical_text_round_trips():
    for t in ("10.0.0.0/8", "192.168.1.5", "192.168.1.5:5432/tcp", "0.0.0.0/0:443", "10.0.0.0/8:8000-8100/udp"):
        assert str(policy.parse_allow(t)) == t
        assert policy.parse_allow(str(policy.parse_allow(t))) == policy.parse_allow(t)


@pytest.mark.parametrize("text,needle", [
    ("", "empty value"),
    ("10.0.0.1/8", "has host bits set"),
    ("10.0.0.0/33", "is not an IPv4 address or CIDR"),
    ("example.com", "is not an IPv4 address or CIDR"),
    ("10.0.0.0/8:0", "port 0 is out of range"),
    ("10.0.0.0/8:70000", "port 70000 is out of range"),
    ("10.0.0.0/8:90-80", "backwards"),
    ("10.0.0.0/8:http", "is not a port or a range"),
    ("10.0.0.0/8:53/icmp", "protocol 'icmp' is not tcp or udp"),
    ("fd00::/8", "IPv6 destinations are not supported"),
    ("10.0.0.0/8 ", "contains whitespace"),
])
def test_bad_allow_specs_name_the_value(text, needle):
    with pytest.raises(UsageError) as ei:
        policy.parse_allow(text)
    assert f"--allow {text!r}" in ei.value.message and needle in ei.value.message, ei.value.message
    assert ei.value.hint


def test_host_bits_error_suggests_the_network():
    with pytest.raises(UsageError) as ei:
        policy.parse_allow("10.0.0.1/8")
    assert "did you mean 10.0.0.0/8" in ei.value.hint


def test_allow_entries_naming_only_other_guests_are_refused():
    sn = "172.30.0.0/24"
    assert policy.parse_allows(["172.30.0.1:8080", "0.0.0.0/0", "172.30.0.0/16"], sn)  # host / wider: fine
    with pytest.raises(UsageError) as ei:
        policy.parse_allows(["172.30.0.5"], sn)
    assert "only contains other guests" in ei.value.message and "--net nat" in ei.value.hint
    assert policy.parse_allows(["10.0.0.0/8", "10.0.0.0/8"]) == (Allow("10.0.0.0/8"),)  # duplicates folded


def test_modes():
    for m in ("nat", "isolated", "none"):
        assert policy.parse_mode(m) == m
    with pytest.raises(UsageError) as ei:
        policy.parse_mode("bridged")
    assert "--net 'bridged'" in ei.value.message and "isolated" in ei.value.hint


def test_vm_net_from_rows():
    row = {"id": "abc123", "ip": "172.30.0.5", "mac": "06:00:AC:1E:00:05", "nat": 1, "options": {}}
    assert policy.vm_net(row) == policy.VmNet("abc123", "172.30.0.5", "06:00:ac:1e:00:05", "nat", ())
    row2 = {**row, "nat": 0, "options": '{"net": "isolated", "allow": ["10.0.0.0/8:443"]}'}
    v = policy.vm_net(row2)
    assert v.mode == "isolated" and v.allow == (Allow("10.0.0.0/8", None, 443, 443),)
    assert policy.vm_net({**row, "net": "none"}).mode == "none"
    for bad, needle in (({**row, "id": "a b"}, "invalid VM id"), ({**row, "ip": "x"}, "no valid IPv4"),
                        ({**row, "mac": "zz"}, "invalid MAC"), ({**row, "net": "open"}, "--net 'open'")):
        with pytest.raises(UsageError) as ei:
            policy.vm_net(bad)
        assert needle in ei.value.message
    with pytest.raises(UsageError):
        policy.vm_net({**row, "mac": None})
    assert policy.vm_net({**row, "mac": None}, require_mac=False).mac is None


def test_proc_net_parsing_finds_listeners_and_bound_udp(tmp_path):
    tcp = tmp_path / "tcp"
    tcp.write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1\n"
        "   1: 0500A8C0:1F90 0100A8C0:D431 01 00000000:00000000 00:00000000 00000000     0        0 222 1\n"
        "   2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1\n")
    tcp6 = tmp_path / "tcp6"
    tcp6.write_text(
        "  sl  local_address                         remote_address                        st ...\n"
        "   0: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A 0 0 0 0 0 444 1\n"
        "   1: 0000000000000000FFFF00000100007F:1F92 00000000000000000000000000000000:0000 0A 0 0 0 0 0 555 1\n")
    files = (str(tcp), str(tcp6))
    assert [s["address"] for s in ports.bound_sockets("tcp", 8080, files)] == ["127.0.0.1"]  # not the ESTAB one
    assert [s["address"] for s in ports.bound_sockets("tcp", 80, files)] == ["0.0.0.0"]
    assert ports.bound_sockets("tcp", 8081, files)[0]["address"] == "::1"
    assert ports.bound_sockets("tcp", 8082, files)[0]["address"] == "127.0.0.1"  # v4-mapped
    # which sockets a DNAT of the port would take traffic away from
    assert ports._shadowed("0.0.0.0", "10.0.0.1") and ports._shadowed("::", None)
    assert ports._shadowed("127.0.0.1", None) and not ports._shadowed("127.0.0.1", "10.0.0.1")
    assert not ports._shadowed("::1", None)
