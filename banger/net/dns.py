"""The DNS resolvers a guest should use: the host's real upstreams, or ``dns = [...]`` from config.

Guests cannot reach a resolver on the host's loopback (127.0.0.53 of systemd-resolved,
127.0.1.1 of NetworkManager's dnsmasq, ...), so a stub in /etc/resolv.conf is followed to
its upstreams: systemd-resolved's /run/systemd/resolve/resolv.conf, NetworkManager's
/run/NetworkManager/no-stub-resolv.conf, then ``resolvectl dns``. Guests have IPv4 only,
so IPv6 resolvers are skipped. Every path is injectable for tests.
"""

from __future__ import annotations

from banger.errors import HostError, UsageError

RESOLV_CONF = "/etc/resolv.conf"
STUB_UPSTREAMS = ("/run/systemd/resolve/resolv.conf", "/run/NetworkManager/no-stub-resolv.conf")
MAX_SERVERS = 3  # what the guest's resolver reads (MAXNS)


def parse_resolv_conf(text: str) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf, in order (IPv6 zone ids dropped)."""
    out = []
    for line in text.splitlines():
        f = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(f) >= 2 and f[0] == "nameserver":
            out.append(f[1].split("%", 1)[0])
    return out


def _classify(addrs) -> tuple[list[str], list[str], list[str]]:
    """(usable IPv4 upstreams, local stubs, skipped) from a list of addresses."""
    import ipaddress

    v4, local, skipped = [], [], []
    for a in addrs:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            skipped.append(a)
            continue
        if ip.is_loopback or ip.is_unspecified:
            local.append(str(ip))
        elif ip.version == 6:
            skipped.append(str(ip))
        elif str(ip) not in v4:
            v4.append(str(ip))
    return v4, local, skipped


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def parse_resolvectl(text: str) -> list[str]:
    """Addresses from ``resolvectl dns`` output (``Global: a b`` / ``Link 2 (eth0): c``)."""
    out = []
    for line in text.splitlines():
        _, colon, rest = line.partition(":")
        if colon:
            out += [a.split("%", 1)[0].split("#", 1)[0] for a in rest.split()]
    return out


def _resolvectl() -> str | None:
    from banger.host.runner import run, which

    exe = which("resolvectl")
    if not exe:
        return None
    try:
        cp = run([exe, "dns"], check=False, timeout=5)
    except Exception:  # resolved not running, D-Bus absent, timeout: no answer from this source
        return None
    return cp.stdout if cp.returncode == 0 else None


def _config_servers(cfg) -> list[str] | None:
    import ipaddress

    v = cfg.extra.get("dns") if cfg is not None else None
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v:
        raise UsageError(f"config dns = {v!r} is not a list of addresses", "e.g. dns = [\"192.168.1.1\"]")
    out = []
    for a in v:
        try:
            out.append(str(ipaddress.IPv4Address(a)))
        except (ValueError, TypeError):
            raise UsageError(f"config dns entry {a!r} is not an IPv4 address",
                             "guests have IPv4 only; e.g. dns = [\"192.168.1.1\", \"9.9.9.9\"]") from None
    return out


def _config_stub_upstreams(cfg):
    """Config ``dns_stub_upstreams = ["/path", ...]``: where a local stub's upstream list lives (default:
    systemd-resolved's and NetworkManager's files); tests point it into their own namespace."""
    v = cfg.extra.get("dns_stub_upstreams") if cfg is not None else None
    if v is None:
        return STUB_UPSTREAMS
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(p, str) and p.startswith("/") for p in v):
        raise UsageError(f"config dns_stub_upstreams = {v!r} is not a list of absolute paths",
                         "e.g. dns_stub_upstreams = [\"/run/systemd/resolve/resolv.conf\"]")
    return tuple(v)


def resolve(cfg=None, *, resolv_conf: str = RESOLV_CONF, stub_upstreams=None,
            resolvectl=_resolvectl) -> dict:
    """{"servers": [...], "source": where they came from, "skipped": [...]} (see upstreams)."""
    if stub_upstreams is None:
        stub_upstreams = _config_stub_upstreams(cfg)
    cfg_servers = _config_servers(cfg)
    if cfg_servers:
        return {"servers": cfg_servers[:MAX_SERVERS], "source": "config dns", "skipped": []}
    text = _read(resolv_conf)
    if text is None:
        raise HostError(f"cannot read {resolv_conf} to find the host's DNS servers",
                        "set dns = [\"ADDRESS\"] in banger's config.toml")
    v4, local, skipped = _classify(parse_resolv_conf(text))
    if v4:
        return {"servers": v4[:MAX_SERVERS], "source": resolv_conf, "skipped": skipped}
    if not local:
        raise HostError(f"{resolv_conf} lists no IPv4 name server guests can use"
                        + (f" (skipped: {', '.join(skipped)})" if skipped else ""),
                        "set dns = [\"ADDRESS\"] in banger's config.toml")
    for path in stub_upstreams:
        t = _read(path)
        if t is None:
            continue
        v4, _l, sk = _classify(parse_resolv_conf(t))
        skipped += sk
        if v4:
            return {"servers": v4[:MAX_SERVERS], "source": path, "skipped": skipped, "stub": local}
    out = resolvectl() if resolvectl else None
    if out:
        v4, _l, sk = _classify(parse_resolvectl(out))
        skipped += sk
        if v4:
            return {"servers": v4[:MAX_SERVERS], "source": "resolvectl dns", "skipped": skipped, "stub": local}
    raise HostError(f"{resolv_conf} points at a local resolver ({', '.join(local)}) and its upstream servers "
                    f"could not be found (looked in {', '.join(stub_upstreams)} and resolvectl)",
                    "set dns = [\"ADDRESS\"] in banger's config.toml (e.g. your router or your network's resolver)")


def upstreams(cfg=None, **kw) -> list[str]:
    """The IPv4 resolvers a guest should use (at most 3): ``dns`` from config if set, else the
    host's real upstreams (a loopback stub is followed to its upstreams). HostError if none."""
    if cfg is not None and hasattr(cfg, "cfg"):  # a Ctx
        cfg = cfg.cfg
    return resolve(cfg, **kw)["servers"]
