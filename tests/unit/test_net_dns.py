"""Which resolvers a guest gets: config, the host's upstreams, a local stub followed to its upstreams."""

from __future__ import annotations

import pytest

from banger.config import Config
from banger.errors import HostError, UsageError
from banger.net import dns

RESOLVED_STUB = """# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).
nameserver 127.0.0.53
options edns0 trust-ad
search lan
"""
RESOLVED_UPSTREAM = """# This is /run/systemd/resolve/resolv.conf managed by man:systemd-resolved(8).
nameserver 192.168.1.1
nameserver fe80::1%eth0
nameserver 9.9.9.9
search lan
"""


def _files(tmp_path, **contents):
    out = {}
    for name, text in contents.items():
        p = tmp_path / name
        p.write_text(text)
        out[name] = str(p)
    return out


def _cfg(tmp_path, **extra):
    return Config(home=tmp_path, run=tmp_path, extra=extra)


def test_plain_resolv_conf_servers_are_used(tmp_path):
    f = _files(tmp_path, resolv="nameserver 10.255.255.53\nnameserver 2001:db8::1\n# nameserver 1.2.3.4\n")
    r = dns.resolve(_cfg(tmp_path), resolv_conf=f["resolv"], stub_upstreams=(), resolvectl=None)
    assert r["servers"] == ["10.255.255.53"] and r["source"] == f["resolv"]
    assert r["skipped"] == ["2001:db8::1"]  # guests have IPv4 only


def test_systemd_resolved_stub_is_followed_to_its_upstreams(tmp_path):
    f = _files(tmp_path, resolv=RESOLVED_STUB, upstream=RESOLVED_UPSTREAM)
    r = dns.resolve(_cfg(tmp_path), resolv_conf=f["resolv"], stub_upstreams=(str(tmp_path / "absent"),
                                                                              f["upstream"]), resolvectl=None)
    assert r["servers"] == ["192.168.1.1", "9.9.9.9"] and r["source"] == f["upstream"]
    assert r["stub"] == ["127.0.0.53"] and "fe80::1" in r["skipped"]
    assert dns.upstreams(_cfg(tmp_path), resolv_conf=f["resolv"], stub_upstreams=(f["upstream"],),
                         resolvectl=None) == ["192.168.1.1", "9.9.9.9"]


def test_any_loopback_stub_falls_back_to_resolvectl(tmp_path):
    f = _files(tmp_path, resolv="nameserver 127.0.1.1\n")  # NetworkManager's dnsmasq
    out = ("Global: 127.0.0.1\n"
           "Link 2 (eth0): 192.168.7.1 fe80::1%2\n"
           "Link 3 (wlan0): 10.0.0.1#dns.example 192.168.7.1\n"
           "Link 4 (banger0):\n")
    r = dns.resolve(_cfg(tmp_path), resolv_conf=f["resolv"], stub_upstreams=(), resolvectl=lambda: out)
    assert r["servers"] == ["192.168.7.1", "10.0.0.1"] and r["source"] == "resolvectl dns"


def test_at_most_three_servers(tmp_path):
    f = _files(tmp_path, resolv="".join(f"nameserver 10.0.0.{i}\n" for i in range(1, 6)))
    assert dns.upstreams(_cfg(tmp_path), resolv_conf=f["resolv"]) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def test_config_overrides_everything(tmp_path):
    f = _files(tmp_path, resolv=RESOLVED_STUB)
    cfg = _cfg(tmp_path, dns=["192.0.2.53", "198.51.100.53"])
    r = dns.resolve(cfg, resolv_conf=f["resolv"], stub_upstreams=(), resolvectl=None)
    assert r["servers"] == ["192.0.2.53", "198.51.100.53"] and r["source"] == "config dns"
    assert dns.upstreams(_cfg(tmp_path, dns="192.0.2.1"), resolv_conf="/nonexistent") == ["192.0.2.1"]


@pytest.mark.parametrize("value,needle", [(["8.8.8.8", "dns.google"], "'dns.google' is not an IPv4 address"),
                                          (["2001:4860:4860::8888"], "is not an IPv4 address"),
                                          ([], "is not a list"), (53, "is not a list")])
def test_bad_config_dns_is_a_usage_error(tmp_path, value, needle):
    with pytest.raises(UsageError) as ei:
        dns.resolve(_cfg(tmp_path, dns=value), resolv_conf="/nonexistent")
    assert needle in ei.value.message and "dns = [" in ei.value.hint


def test_a_stub_without_findable_upstreams_says_what_to_set(tmp_path):
    f = _files(tmp_path, resolv=RESOLVED_STUB, upstream="# empty\n")
    with pytest.raises(HostError) as ei:
        dns.resolve(_cfg(tmp_path), resolv_conf=f["resolv"], stub_upstreams=(f["upstream"],),
                    resolvectl=lambda: None)
    assert "127.0.0.53" in ei.value.message and "dns = [" in ei.value.hint
    with pytest.raises(HostError) as ei:
        dns.resolve(_cfg(tmp_path), resolv_conf=str(tmp_path / "missing"))
    assert "cannot read" in ei.value.message


def test_ipv6_only_host_resolvers_are_refused_clearly(tmp_path):
    f = _files(tmp_path, resolv="nameserver 2001:db8::53\n")
    with pytest.raises(HostError) as ei:
        dns.resolve(_cfg(tmp_path), resolv_conf=f["resolv"], stub_upstreams=(), resolvectl=None)
    assert "no IPv4 name server" in ei.value.message and "2001:db8::53" in ei.value.message
