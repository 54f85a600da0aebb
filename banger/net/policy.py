"""Per-VM network policy, kept in banger's own nftables tables (one pair per bridge).

What a guest may do, per VM, decided by its mode (``nat`` | ``isolated`` | ``none``) and its
``--allow`` list, enforced on the host whatever the host's own firewall policy is:

* **Anti-spoofing** (table ``bridge banger-<br>``, chain ``vm-<id>``, reached through map
  ``guard`` keyed by the VM's TAP): a frame from the TAP must carry the VM's MAC; ARP must
  claim the VM's MAC and IP; IPv4 must come from the VM's IP, never go to 127.0.0.0/8, and
  never use the host as a router back into the guest subnet; everything else (IPv6,
  VLAN tags, other ethertypes) is dropped. A ``tap-pool-*`` port without a guard entry
  drops everything: a guest whose policy was not applied has no network at all.
* **Guests among themselves**: ``nat`` guests reach each other on the bridge; an
  ``isolated`` guest reaches no other guest and no guest reaches it (map ``isolate``).
* **Egress** (table ``ip banger-<br>``): traffic from the bridge that is routed onwards goes
  through map ``egress`` (VM IP -> ``vm-<id>-out``): ``nat`` accepts, ``isolated`` accepts
  only its ``--allow`` entries; anything else is rejected (ICMP admin-prohibited). A VM
  whose traffic leaves the host is masqueraded (map ``snat``). Nothing from outside may
  open a connection to a guest except through a published port (``ct status dnat``).
* **Guest to host**: only replies to connections the host opened, ICMP echo to the
  gateway and the VM's ``--allow`` entries that name host addresses (map ``hostin``);
  the rest is rejected. 127.0.0.0/8 to or from the bridge is dropped in a raw-priority
  chain (``route_localnet`` is turned on for the bridge while ports are published).
* **Published ports** (map ``ports``, proto . host port -> ``vm-<id>-dnat``): DNAT from the
  host's addresses (prerouting, not from the bridge) and from the host itself (output);
  connections from 127.0.0.0/8 are masqueraded to the gateway address. Durable claims live
  in the ``published_ports`` table (banger.net.ports); ``apply`` reads them.

Every change runs under the ``hostnet`` lock as one nft transaction; ``apply`` reads the
current tables first and does nothing when they already match (idempotent). A VM's objects
are its chains ``vm-<id>[-part]`` and the map elements that jump to them, so a VM is
removed as a unit and ``stale_rules``/``reap_rules`` (gc) find leftovers by VM id. Base
chains carry a comment with a hash of their content and are rebuilt when it differs.

``net.ipv4.ip_forward`` is switched on only when a VM needs routing (``nat``, an
``--allow`` list, or a port published on non-loopback addresses); banger never switches it
off (another tool may rely on it) but ``forwarding_report`` says who needs it.
"""

from __future__ import annotations

import json
import re
import time
from collections import namedtuple

from banger.errors import Conflict, HostError, UsageError
from banger.net import nft
from banger.net.nft import (
    ACCEPT,
    DROP,
    MASQUERADE,
    REJECT_ADMIN,
    cmd,
    ct,
    jump,
    match,
    meta,
    payload,
    port_value,
    prefix,
)

MODES = ("nat", "isolated", "none")
KEEP = object()  # apply(..., tap=KEEP): keep the TAP currently guarded for this VM
_ID = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_CHAIN = re.compile(r"^vm-(?P<id>[A-Za-z0-9_]{1,64})(?:-(?P<part>out|in|snat|dnat|iso))?$")
_MAC = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")
_PORT = re.compile(r"^([0-9]{1,5})(?:-([0-9]{1,5}))?$")
LOOPBACK = "127.0.0.0/8"
ALLOW_FORMAT = "CIDR[:PORT[-PORT]][/tcp|/udp], e.g. 10.0.0.0/8, 192.168.1.5:5432/tcp or 0.0.0.0/0:443"


# ---------------------------------------------------------------------------- spec parsing

class Allow(namedtuple("Allow", "net proto port_lo port_hi", defaults=(None, None, None))):
    """One ``--allow`` entry: destinations (a CIDR) and optionally a port or range and protocol
    (``proto``: tcp | udp | None, both when a port is given)."""

    __slots__ = ()

    def __str__(self) -> str:
        s = self.net[:-3] if self.net.endswith("/32") else self.net
        if self.port_lo is not None:
            s += f":{self.port_lo}" + (f"-{self.port_hi}" if self.port_hi != self.port_lo else "")
            if self.proto:
                s += f"/{self.proto}"
        return s


def parse_mode(text) -> str:
    if text not in MODES:
        raise UsageError(f"--net {text!r} is not a network mode", "use one of: nat (outbound through the host), "
                         "isolated (host only, no route out), none (no network card)")
    return text


def _allow_error(text, why: str, hint: str | None = None) -> UsageError:
    return UsageError(f"--allow {text!r}: {why}", hint or f"use {ALLOW_FORMAT}")


def _port(text, whole, what: str) -> tuple[int, int]:
    m = _PORT.match(text)
    if not m:
        raise _allow_error(whole, f"{what} {text!r} is not a port or a range LO-HI")
    lo = int(m[1])
    hi = int(m[2]) if m[2] else lo
    for p in (lo, hi):
        if not 1 <= p <= 65535:
            raise _allow_error(whole, f"port {p} is out of range", "ports are 1-65535")
    if hi < lo:
        raise _allow_error(whole, f"port range {lo}-{hi} is backwards", f"write it as {hi}-{lo}")
    return lo, hi


def parse_allow(text) -> Allow:
    """Parse ``CIDR[:PORT[-PORT]][/tcp|/udp]`` strictly (a bare address means /32)."""
    import ipaddress

    if isinstance(text, Allow):
        return text
    if not isinstance(text, str) or not text.strip():
        raise _allow_error(text, "empty value")
    if text != text.strip() or any(c.isspace() for c in text):
        raise _allow_error(text, "contains whitespace")
    target, colon, rest = text.partition(":")
    if colon and ":" in rest:
        raise _allow_error(text, "IPv6 destinations are not supported (guests have IPv4 only)")
    proto = lo = hi = None
    if colon:
        port_s, slash, proto_s = rest.partition("/")
        if slash:
            if proto_s not in ("tcp", "udp"):
                raise _allow_error(text, f"protocol {proto_s!r} is not tcp or udp")
            proto = proto_s
        lo, hi = _port(port_s, text, "port")
    if "/" not in target:
        target += "/32"
    try:
        net = ipaddress.IPv4Network(target, strict=True)
    except ValueError:
        try:
            loose = ipaddress.IPv4Network(target, strict=False)
        except ValueError:
            raise _allow_error(text, f"{target.removesuffix('/32')!r} is not an IPv4 address or CIDR") from None
        raise _allow_error(text, f"{target} has host bits set", f"did you mean {loose}?") from None
    return Allow(str(net), proto, lo, hi)


def parse_allows(values, subnet: str | None = None) -> tuple[Allow, ...]:
    """Parse a list of --allow values; with ``subnet``, refuse entries that only name other guests
    (isolated guests never reach peers; nat guests reach them without an entry)."""
    import ipaddress

    out: list[Allow] = []
    for v in values or ():
        a = parse_allow(v)
        if subnet:
            sn = ipaddress.IPv4Network(subnet, strict=False)
            net = ipaddress.IPv4Network(a.net)
            gw = sn.network_address + 1
            if net.subnet_of(sn) and gw not in net:
                raise _allow_error(str(a), f"{a.net} only contains other guests on the bridge ({sn})",
                                   "guests reach each other only with --net nat; to reach the host use its "
                                   f"address {gw}")
        if a not in out:
            out.append(a)
    return tuple(out)


class VmNet(namedtuple("VmNet", "id ip mac mode allow", defaults=((),))):
    """What the policy needs to know about a VM: id, ip, mac (or None), mode, allow (Allow entries)."""

    __slots__ = ()


def vm_net(vm, *, require_mac: bool = True) -> VmNet:
    """A VmNet from a VmNet or a VM row dict: id, ip, mac, and the mode from ``net`` (or
    ``options["net"]``, else ``nat`` -> nat/isolated) and ``allow`` (or ``options["allow"]``)."""
    import ipaddress

    if isinstance(vm, VmNet):
        return vm
    if hasattr(vm, "as_dict"):  # a typed record (banger.state.records.VmRecord)
        vm = vm.as_dict()
    if not isinstance(vm, dict):
        raise UsageError(f"invalid VM for network policy: {vm!r}", "pass the VM's row (id, ip, mac, net, allow)")
    opts = vm.get("options") or {}
    if isinstance(opts, str):
        opts = json.loads(opts or "{}")
    vm_id = vm.get("id")
    if not isinstance(vm_id, str) or not _ID.match(vm_id):
        raise UsageError(f"invalid VM id {vm_id!r} for network policy", "VM ids are letters, digits and '_'")
    mode = vm.get("net") or opts.get("net") or ("nat" if vm.get("nat") else "isolated")
    parse_mode(mode)
    ip = vm.get("ip")
    try:
        ipaddress.IPv4Address(ip or "")
    except ValueError:
        raise UsageError(f"VM {vm_id} has no valid IPv4 address ({ip!r})", "the policy needs the guest IP") from None
    mac = (vm.get("mac") or "").lower() or None
    if mac is not None and not _MAC.match(mac):
        raise UsageError(f"VM {vm_id} has an invalid MAC address {mac!r}", "expected aa:bb:cc:dd:ee:ff")
    if require_mac and mac is None:
        raise UsageError(f"VM {vm_id} has no MAC address", "the anti-spoofing rules need the guest MAC")
    allow = vm.get("allow", opts.get("allow")) or ()
    return VmNet(vm_id, ip, mac, mode, parse_allows(allow))


# ---------------------------------------------------------------------------- desired state

_Net = namedtuple("_Net", "bridge table gateway subnet bridge_mac tap_glob")


def _net(ctx) -> _Net:
    from banger.names import Subnet
    from banger.net.bridge import bridge_mac
    from banger.net.pool import PREFIX

    sn = Subnet(ctx.cfg.subnet)
    return _Net(ctx.cfg.bridge, nft.table_name(ctx.cfg.bridge), sn.gateway, str(sn.net), bridge_mac(sn),
                PREFIX + "*")


def _h(obj) -> str:
    from banger.names import short_digest

    return short_digest(json.dumps(obj, sort_keys=True).encode(), 12)


_EST = match(ct("state"), ["established", "related"], "in")
_IIF, _OIF = meta("iifname"), meta("oifname")
_SADDR, _DADDR = payload("ip", "saddr"), payload("ip", "daddr")


def _base(n: _Net) -> dict:
    """Base chains and maps of both tables: {family: {"maps": {name: type}, "chains": {name: (attrs, rules)}}}."""
    br = n.bridge
    l4key = {"concat": [meta("l4proto"), payload("th", "dport")]}
    local = match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    bridge = {
        "maps": {"guard": "ifname", "isolate": "ifname"},
        "chains": {
            "prerouting": ({"type": "filter", "hook": "prerouting", "prio": -200, "policy": "accept"}, [
                [{"vmap": {"key": _IIF, "data": "@guard"}}],
                [match(_IIF, n.tap_glob), DROP],  # a banger TAP without a policy: no network at all
            ]),
            "forward": ({"type": "filter", "hook": "forward", "prio": -200, "policy": "accept"}, [
                [{"vmap": {"key": _IIF, "data": "@isolate"}}],
                [{"vmap": {"key": _OIF, "data": "@isolate"}}],
            ]),
        },
    }
    ip = {
        "maps": {"egress": "ipv4_addr", "hostin": "ipv4_addr", "snat": "ipv4_addr",
                 "ports": ("inet_proto", "inet_service")},
        "chains": {
            "raw_pre": ({"type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"}, [
                [match(_IIF, br), match(_SADDR, prefix(LOOPBACK)), DROP],
                [match(_IIF, br), match(_DADDR, prefix(LOOPBACK)), DROP],
            ]),
            "dnat_pre": ({"type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}, [
                [match(_IIF, br, "!="), local, {"vmap": {"key": l4key, "data": "@ports"}}],
            ]),
            "dnat_out": ({"type": "nat", "hook": "output", "prio": -100, "policy": "accept"}, [
                [local, {"vmap": {"key": l4key, "data": "@ports"}}],
            ]),
            "snat_post": ({"type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}, [
                [match(_OIF, br), match(_SADDR, prefix(LOOPBACK)), match(ct("status"), "dnat", "in"), MASQUERADE],
                [match(_OIF, br, "!="), {"vmap": {"key": _SADDR, "data": "@snat"}}],
            ]),
            "forward": ({"type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}, [
                # bridged guest-to-guest traffic seen here through br_netfilter: decided at layer 2
                [match(_IIF, br), match(_OIF, br), ACCEPT],
                [match(_IIF, br), jump("from_guest")],
                [match(_OIF, br), jump("to_guest")],
            ]),
            "from_guest": ({}, [
                [_EST, ACCEPT],
                [{"vmap": {"key": _SADDR, "data": "@egress"}}],
                [REJECT_ADMIN],
            ]),
            "to_guest": ({}, [
                [_EST, ACCEPT],
                [match(ct("status"), "dnat", "in"), ACCEPT],
                [DROP],
            ]),
            "input": ({"type": "filter", "hook": "input", "prio": 0, "policy": "accept"}, [
                [match(_IIF, br), jump("guest_to_host")],
            ]),
            "guest_to_host": ({}, [
                [_EST, ACCEPT],
                [match(_DADDR, n.gateway), match(payload("icmp", "type"), "echo-request"), ACCEPT],
                [{"vmap": {"key": _SADDR, "data": "@hostin"}}],
                [REJECT_ADMIN],
            ]),
        },
    }
    return {"bridge": bridge, "ip": ip}


def _allow_rules(allow: tuple[Allow, ...]) -> list[list[dict]]:
    rules = []
    for a in allow:
        r = [] if a.net == "0.0.0.0/0" else [match(_DADDR, prefix(a.net))]
        if a.port_lo is not None:
            r.append(match(meta("l4proto"), a.proto or {"set": ["tcp", "udp"]}))
            r.append(match(payload("th", "dport"), port_value(a.port_lo, a.port_hi)))
        rules.append(r + [ACCEPT])
    return rules


def _guard_rules(vm: VmNet, n: _Net) -> list[list[dict]]:
    eth_type = payload("ether", "type")
    return [
        [match(payload("ether", "saddr"), vm.mac, "!="), DROP],
        [match(eth_type, "arp"), match(payload("arp", "saddr ether"), vm.mac, "!="), DROP],
        [match(eth_type, "arp"), match(payload("arp", "saddr ip"), vm.ip, "!="), DROP],
        [match(eth_type, "arp"), match(payload("arp", "daddr ip"), prefix(LOOPBACK)), DROP],
        [match(eth_type, "arp"), ACCEPT],
        [match(eth_type, "ip"), match(_SADDR, vm.ip, "!="), DROP],
        [match(eth_type, "ip"), match(_DADDR, prefix(LOOPBACK)), DROP],
        # the host is the way out, never a router back into the guest subnet (that would skip layer 2)
        [match(eth_type, "ip"), match(payload("ether", "daddr"), n.bridge_mac), match(_DADDR, prefix(n.subnet)),
         match(_DADDR, n.gateway, "!="), DROP],
        [match(eth_type, "ip"), ACCEPT],
        [DROP],
    ]


def routes_out(vm: VmNet) -> bool:
    return vm.mode == "nat" or (vm.mode == "isolated" and bool(vm.allow))


def _desired(vm: VmNet, tap: str | None, n: _Net, ports) -> dict:
    """{family: {"chains": {name: [(exprs, comment_extra)]}, "elems": {(map, key): value}}} for one VM."""
    d = {"bridge": {"chains": {}, "elems": {}}, "ip": {"chains": {}, "elems": {}}}
    if vm.mode == "none":
        return d
    ipc, ipe = d["ip"]["chains"], d["ip"]["elems"]
    c = f"vm-{vm.id}"
    if vm.mode == "nat":
        ipc[c + "-out"] = [([ACCEPT], "")]
    elif vm.allow:
        ipc[c + "-out"] = [(r, "") for r in _allow_rules(vm.allow)]
    if c + "-out" in ipc:
        ipe[("egress", vm.ip)] = ("jump", c + "-out")
    if vm.allow:
        ipc[c + "-in"] = [(r, "") for r in _allow_rules(vm.allow)]
        ipe[("hostin", vm.ip)] = ("jump", c + "-in")
    if routes_out(vm):
        ipc[c + "-snat"] = [([MASQUERADE], "")]
        ipe[("snat", vm.ip)] = ("jump", c + "-snat")
    if ports:
        rules = []
        for p in ports:
            r = [] if p.host_ip is None else [match(_DADDR, p.host_ip)]
            r += [match(meta("l4proto"), p.proto), match(payload("th", "dport"), p.host_port),
                  {"dnat": {"family": "ip", "addr": vm.ip, "port": p.guest_port}}]
            rules.append((r, f" port={p}"))
            ipe[("ports", (p.proto, p.host_port))] = ("jump", c + "-dnat")
        ipc[c + "-dnat"] = rules
    if tap:
        if not vm.mac:
            raise UsageError(f"VM {vm.id} has no MAC address", "the anti-spoofing rules need the guest MAC")
        d["bridge"]["chains"][c] = [(r, "") for r in _guard_rules(vm, n)]
        d["bridge"]["elems"][("guard", tap)] = ("jump", c)
        if vm.mode != "nat":
            d["bridge"]["chains"][c + "-iso"] = [([DROP], "")]
            d["bridge"]["elems"][("isolate", tap)] = ("jump", c + "-iso")
    return d


def _tag(vm: VmNet, h: str) -> str:
    return f"banger vm={vm.id} mode={vm.mode} h={h}"


# ---------------------------------------------------------------------------- observed state

def _owner(value) -> str | None:
    if isinstance(value, tuple) and len(value) == 2 and value[0] in ("jump", "goto"):
        m = _CHAIN.match(value[1])
        return m["id"] if m else None
    return None


def _vm_objects(tbl: dict | None) -> dict[str, dict]:
    """{vm_id: {"chains": {name: chain}, "elems": {(map, key): value}}} found in a parsed table."""
    out: dict[str, dict] = {}
    if not tbl:
        return out
    for name, chain in tbl["chains"].items():
        m = _CHAIN.match(name)
        if m and not chain["base"]:
            out.setdefault(m["id"], {"chains": {}, "elems": {}})["chains"][name] = chain
    for mname, mp in tbl["maps"].items():
        for key, value in mp["elems"].items():
            owner = _owner(value)
            if owner:
                out.setdefault(owner, {"chains": {}, "elems": {}})["elems"][(mname, key)] = value
    return out


def _read(n: _Net) -> dict:
    return {fam: nft.read_table(fam, n.table) for fam in nft.FAMILIES}


def _base_tag(base_fam: dict) -> str:
    return f"banger base h={_h(base_fam)}"


def _base_ok(tbl: dict | None, base_fam: dict) -> bool:
    if tbl is None:
        return False
    tag = _base_tag(base_fam)
    for mname, mtype in base_fam["maps"].items():
        if mname not in tbl["maps"] or tbl["maps"][mname]["type"] != mtype:
            return False
    for cname, (attrs, rules) in base_fam["chains"].items():
        ch = tbl["chains"].get(cname)
        if ch is None or [r["comment"] for r in ch["rules"]] != [tag] * len(rules):
            return False
        if attrs and (ch["hook"], ch["type"], ch["prio"]) != (attrs["hook"], attrs["type"], attrs["prio"]):
            return False
    return True


def _base_cmds(fam: str, tbl: dict | None, n: _Net, base_fam: dict) -> list[dict]:
    t = n.table
    out = [cmd("add", "table", fam, t)]
    for mname, mtype in base_fam["maps"].items():
        have = (tbl or {}).get("maps", {}).get(mname)
        if have is not None and have["type"] != mtype:
            raise HostError(f"nftables map {fam} {t} {mname} has type {have['type']}, expected {mtype}",
                            f"delete banger's table (nft delete table {fam} {t}) and start the VMs again")
        out.append(cmd("add", "map", fam, t, name=mname, type=list(mtype) if isinstance(mtype, tuple) else mtype,
                       map="verdict"))
    tag = _base_tag(base_fam)
    for cname, (attrs, _rules) in base_fam["chains"].items():  # every chain first: rules jump between them
        have = (tbl or {}).get("chains", {}).get(cname)
        if have is not None and attrs and (have["hook"], have["type"], have["prio"]) != \
                (attrs["hook"], attrs["type"], attrs["prio"]):
            out += [cmd("flush", "chain", fam, t, name=cname), cmd("delete", "chain", fam, t, name=cname)]
        out.append(cmd("add", "chain", fam, t, name=cname, **attrs))
        out.append(cmd("flush", "chain", fam, t, name=cname))
    for cname, (_attrs, rules) in base_fam["chains"].items():
        out += [cmd("add", "rule", fam, t, chain=cname, comment=tag, expr=r) for r in rules]
    return out


def _elem_key(key):
    return {"concat": list(key)} if isinstance(key, tuple) else key


def _delete_vm_cmds(fam: str, t: str, objs: dict) -> list[dict]:
    out = [cmd("delete", "element", fam, t, name=m, elem=[_elem_key(k)]) for (m, k) in objs["elems"]]
    for name in objs["chains"]:
        out += [cmd("flush", "chain", fam, t, name=name), cmd("delete", "chain", fam, t, name=name)]
    return out


# ---------------------------------------------------------------------------- sysctls

def _conf_path(bridge: str, key: str) -> str:
    return f"/proc/sys/net/ipv4/conf/{bridge}/{key}"


def _read_sysctl(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _set_route_localnet(bridge: str, on: bool) -> bool:
    """Set route_localnet on the bridge (needed to DNAT 127.0.0.1 to a guest). True if changed."""
    p = _conf_path(bridge, "route_localnet")
    cur = _read_sysctl(p)
    want = "1" if on else "0"
    if cur is None or cur == want:
        return False
    try:
        with open(p, "w") as f:
            f.write(want + "\n")
    except OSError as e:
        raise HostError(f"cannot set {p} to {want}: {e}", "run banger as root") from None
    return True


def _forward_marker(ctx):
    return ctx.cfg.run / "net" / "ip_forward.json"


def _enable_forwarding(ctx, why: str) -> bool:
    from banger.host.fsutil import atomic_write_json
    from banger.net.bridge import enable_ip_forward

    changed = enable_ip_forward(ctx, lock_held=True)
    if changed:
        atomic_write_json(_forward_marker(ctx), {"enabled_at": time.time(), "reason": why}, mode=0o600)
    return changed


# ---------------------------------------------------------------------------- public API

def _needs_forwarding(vm: VmNet, ports) -> str | None:
    if vm.mode == "nat":
        return f"VM {vm.id} uses NAT"
    if routes_out(vm):
        return f"VM {vm.id} is allowed out to {', '.join(map(str, vm.allow))}"
    ext = [p for p in ports or () if p.host_ip is None or not p.host_ip.startswith("127.")]
    if ext:
        return f"VM {vm.id} publishes {', '.join(map(str, ext))} on the host's addresses"
    return None


def apply(ctx, vm, tap=None, *, ports=None) -> dict:
    """Make banger's nftables state for ``vm`` exactly what its mode, allow list and published
    ports say, guarding ``tap`` (the VM's TAP; None: no layer-2 part; KEEP: the TAP it has now).

    ``ports``: PortSpecs to publish; None reads the VM's claims from the store
    (banger.net.ports). Idempotent; one nft transaction under the ``hostnet`` lock. Any element
    of another VM holding this VM's IP, TAP or claimed ports is stale and evicted.
    Returns {"vm_id", "changed", "evicted", "ip_forward_changed", "route_localnet"}.
    """
    vm = vm_net(vm, require_mac=tap is not None and tap is not KEEP)
    if tap is not None and tap is not KEEP:
        from banger.net.netlink import validate_ifname

        validate_ifname(tap)
    if ports is None:
        from banger.net import ports as ports_mod

        ports = ports_mod.claims(ctx, vm.id)
    ports = tuple(ports) if vm.mode != "none" else ()
    with ctx.locks.hold("hostnet", purpose=f"network policy for {vm.id}"):
        return _apply_locked(ctx, vm, tap, ports)


def _apply_locked(ctx, vm: VmNet, tap, ports, obs: dict | None = None) -> dict:
    n = _net(ctx)
    obs = obs if obs is not None else _read(n)
    mine = {fam: _vm_objects(obs[fam]).get(vm.id, {"chains": {}, "elems": {}}) for fam in nft.FAMILIES}
    if tap is KEEP:
        tap = next((k for (m, k), v in mine["bridge"]["elems"].items() if m == "guard"), None)
        if tap is not None and not vm.mac:
            raise UsageError(f"VM {vm.id} has no MAC address", "the anti-spoofing rules need the guest MAC")
    _check_ports_free(ctx, vm, ports, obs["ip"])
    want = _desired(vm, tap, n, ports)
    h = _h({fam: {"chains": want[fam]["chains"], "elems": sorted(map(repr, want[fam]["elems"].items()))}
            for fam in want})
    tag = _tag(vm, h)
    base = _base(n)
    cmds: list[dict] = []
    evicted: set[str] = set()
    # the ip table (default deny for routed and guest-to-host traffic) exists while any VM has a
    # policy; the bridge table (which drops unguarded banger TAPs) while any VM has a guarded TAP
    others_any = {k for fam in nft.FAMILIES for k in _vm_objects(obs[fam]) if k != vm.id}
    need = {"ip": vm.mode != "none" or bool(others_any), "bridge": bool(tap) and vm.mode != "none"}
    for fam in nft.FAMILIES:
        tbl, w, m = obs[fam], want[fam], mine[fam]
        all_objs = _vm_objects(tbl)
        others = {k: v for k, v in all_objs.items() if k != vm.id}
        if not need[fam] and not others:
            if tbl is not None:
                cmds.append(cmd("delete", "table", fam, n.table))
            continue
        fam_cmds = [] if _base_ok(tbl, base[fam]) else _base_cmds(fam, tbl, n, base[fam])
        held = {key: owner for owner, objs in others.items() for key in objs["elems"]}
        for key in w["elems"]:
            if key in held and key[0] == "ports":
                _check_port_owner(ctx, vm, key[1], held[key])
            if key in held:  # IP/TAP/port now belongs to this VM: the other VM's element is stale
                evicted.add(held[key])
                fam_cmds.append(cmd("delete", "element", fam, n.table, name=key[0], elem=[_elem_key(key[1])]))
        for key, value in m["elems"].items():
            if w["elems"].get(key) != value:
                fam_cmds.append(cmd("delete", "element", fam, n.table, name=key[0], elem=[_elem_key(key[1])]))
        for name in m["chains"]:
            if name not in w["chains"]:
                fam_cmds += [cmd("flush", "chain", fam, n.table, name=name),
                             cmd("delete", "chain", fam, n.table, name=name)]
        for name, rules in w["chains"].items():
            have = m["chains"].get(name)
            comments = [tag + extra for _r, extra in rules]
            if have is not None and [r["comment"] for r in have["rules"]] == comments:
                continue
            fam_cmds.append(cmd("flush" if have is not None else "add", "chain", fam, n.table, name=name))
            fam_cmds += [cmd("add", "rule", fam, n.table, chain=name, comment=c, expr=r)
                         for (r, _x), c in zip(rules, comments, strict=True)]
        for key, value in w["elems"].items():
            if m["elems"].get(key) != value or key in held:
                fam_cmds.append(cmd("add", "element", fam, n.table, name=key[0],
                                    elem=[[_elem_key(key[1]), jump(value[1])]]))
        cmds += fam_cmds
    nft.transact(cmds)
    why = _needs_forwarding(vm, ports)
    fwd = _enable_forwarding(ctx, why) if why else False
    rl = _sync_route_localnet(n, obs["ip"], {vm.id}, bool(ports))
    return {"vm_id": vm.id, "mode": vm.mode, "tap": tap, "changed": bool(cmds), "evicted": sorted(evicted),
            "ip_forward_changed": fwd, "route_localnet": rl, "ports": [str(p) for p in ports]}


def _sync_route_localnet(n: _Net, ip_tbl: dict | None, changed_ids: set, changed_have_ports: bool) -> bool:
    """route_localnet on the bridge follows 'is any port published': the ports of the VMs this call
    did not touch (from ``ip_tbl``, read before the change) plus whether the changed ones have any."""
    elems = (((ip_tbl or {}).get("maps") or {}).get("ports") or {}).get("elems", {})
    need = changed_have_ports or any(_owner(v) not in changed_ids for v in elems.values())
    _set_route_localnet(n.bridge, need)
    return need


def _check_port_owner(ctx, vm: VmNet, key, other: str) -> None:
    """Another VM's live DNAT for this port is stale unless that VM still holds the durable claim."""
    proto, port = key
    row = ctx.store.one("SELECT vm_id FROM published_ports WHERE proto = ? AND host_port = ?", (proto, port))
    if row and row["vm_id"] == other:
        raise Conflict(f"host port {port}/{proto} is published by VM {other}; cannot publish it for VM {vm.id}",
                       f"free it first: banger vm port rm {other} {port}/{proto}", details={"vm_id": other})


def _check_ports_free(ctx, vm: VmNet, ports, ip_tbl) -> None:
    from banger.net.ports import host_port_users

    active = {k for (m, k) in _vm_objects(ip_tbl).get(vm.id, {"elems": {}})["elems"] if m == "ports"}
    # already ours: a host process binding it now is shadowed, not shadowing
    new = [p for p in ports if (p.proto, p.host_port) not in active]
    for p, user in (host_port_users(new) if new else {}).items():
        if user:
            raise Conflict(f"host port {p.host_port}/{p.proto} is in use on the host ({user}); cannot publish {p} "
                           f"for VM {vm.id}", "stop that process or publish on another host port "
                           "(banger vm port rm / add)", details={"port": str(p), "user": user})


def remove(ctx, vm) -> dict:
    """Remove everything banger's tables hold for ``vm`` (a row, VmNet or id); drop the tables
    when no VM is left in them. Idempotent. Durable port claims are kept (they follow the VM)."""
    vm_id = vm if isinstance(vm, str) else (vm.id if isinstance(vm, VmNet) else (vm or {}).get("id"))
    if not isinstance(vm_id, str) or not _ID.match(vm_id):
        raise UsageError(f"invalid VM id {vm_id!r} for network policy", "VM ids are letters, digits and '_'")
    with ctx.locks.hold("hostnet", purpose=f"remove network policy of {vm_id}"):
        return _remove_locked(ctx, [vm_id])


def _remove_locked(ctx, vm_ids: list[str]) -> dict:
    n = _net(ctx)
    obs = _read(n)
    cmds: list[dict] = []
    removed = 0
    dropped = []
    remaining = {k for fam in nft.FAMILIES for k in _vm_objects(obs[fam])} - set(vm_ids)
    for fam in nft.FAMILIES:
        objs = _vm_objects(obs[fam])
        gone = [objs[v] for v in vm_ids if v in objs]
        removed += sum(len(o["chains"]) + len(o["elems"]) for o in gone)
        if obs[fam] is None:
            continue
        # same rule as in apply: ip while any VM is left, bridge while any VM left has a TAP there
        if not (remaining if fam == "ip" else set(objs) - set(vm_ids)):
            cmds.append(cmd("delete", "table", fam, n.table))
            dropped.append(fam)
        else:
            for o in gone:
                cmds += _delete_vm_cmds(fam, n.table, o)
    nft.transact(cmds)
    _sync_route_localnet(n, obs["ip"], set(vm_ids), False)
    return {"vm_ids": vm_ids, "removed": removed, "tables_removed": bool(dropped), "families_removed": dropped}


def _summary(n: _Net, obs: dict) -> list[dict]:
    ip_objs, br_objs = _vm_objects(obs["ip"]), _vm_objects(obs["bridge"])
    out = []
    for vm_id in sorted(set(ip_objs) | set(br_objs)):
        io = ip_objs.get(vm_id, {"chains": {}, "elems": {}})
        bo = br_objs.get(vm_id, {"chains": {}, "elems": {}})
        ips = {k for (m, k) in io["elems"] if m in ("egress", "hostin", "snat")}
        taps = [k for (m, k) in bo["elems"] if m == "guard"]
        comments = [r["comment"] or "" for o in (io, bo) for ch in o["chains"].values() for r in ch["rules"]]
        mode = next((c.split(" mode=")[1].split()[0] for c in comments if " mode=" in c), None)
        ports = sorted(c.split(" port=")[1] for c in comments if " port=" in c)
        out.append({"vm_id": vm_id, "ip": min(ips) if ips else None, "tap": taps[0] if taps else None,
                    "mode": mode, "masquerade": any(m == "snat" for (m, _k) in io["elems"]),
                    "ports": ports, "objects": sum(len(o["chains"]) + len(o["elems"]) for o in (io, bo))})
    return out


def active(ctx) -> list[dict]:
    """What is live in nftables, per VM: {vm_id, ip, tap, mode, masquerade, ports, objects}. No lock."""
    n = _net(ctx)
    return _summary(n, _read(n))


def _is_live(ctx, vm_id: str) -> bool:
    obs = _read(_net(ctx))
    return any(vm_id in _vm_objects(obs[fam]) for fam in nft.FAMILIES)


def is_active(ctx, vm_id: str) -> bool:
    """Does banger's nftables state hold anything for this VM (its policy is live)?"""
    return _is_live(ctx, vm_id)


def stale_rules(ctx, live_vm_ids) -> list[dict]:
    """Policy of VMs not in ``live_vm_ids`` (for gc): entries as in ``active``."""
    live = set(live_vm_ids)
    return [v for v in active(ctx) if v["vm_id"] not in live]


def reap_rules(ctx, vm_ids) -> dict:
    """Remove the policy of ``vm_ids`` in one transaction (gc: call it holding each VM's lock,
    after checking the VM is not running). Idempotent."""
    ids = list(vm_ids)
    for v in ids:
        if not isinstance(v, str) or not _ID.match(v):
            raise UsageError(f"invalid VM id {v!r}", "VM ids are letters, digits and '_'")
    if not ids:
        return {"vm_ids": [], "removed": 0, "tables_removed": False, "families_removed": []}
    with ctx.locks.hold("hostnet", purpose="reap stale network policy"):
        return _remove_locked(ctx, ids)


def forwarding_report(ctx) -> dict:
    """For ``banger doctor``: is IPv4 forwarding on, which VMs need it and why, did banger switch
    it on, and is route_localnet on for the bridge. {"status": ok|warn, "detail", "hint", ...}."""
    from banger.host.fsutil import read_json
    from banger.net.bridge import ip_forward_enabled

    n = _net(ctx)
    try:
        vms = _summary(n, _read(n))
        foreign = _foreign_forward_drops(n)
    except HostError as e:
        return {"status": "warn", "detail": f"cannot read nftables: {e.message}", "hint": e.hint,
                "ip_forward": ip_forward_enabled(), "needed_by": [], "foreign_forward_drop": []}
    on = ip_forward_enabled()
    needed = []
    for v in vms:
        why = []
        if v["mode"] == "nat":
            why.append("nat")
        elif v["masquerade"]:
            why.append("isolated with --allow")
        ext = [p for p in v["ports"] if not p.startswith("127.")]
        if ext:
            why.append("publishes " + ", ".join(ext))
        if why:
            needed.append({"vm_id": v["vm_id"], "ip": v["ip"], "reason": "; ".join(why)})
    marker = read_json(_forward_marker(ctx))
    rl = _read_sysctl(_conf_path(n.bridge, "route_localnet"))
    rep = {"ip_forward": on, "needed_by": needed, "enabled_by_banger": marker,
           "route_localnet": rl == "1", "route_localnet_reason":
           ("ports are published (DNAT from 127.0.0.1)" if rl == "1" else None),
           "foreign_forward_drop": foreign, "status": "ok", "hint": None}
    if on and needed:
        rep["detail"] = "IPv4 forwarding is on: needed by " + "; ".join(f"VM {x['vm_id']} ({x['reason']})"
                                                                          for x in needed)
    elif on:
        rep["detail"] = ("IPv4 forwarding is on but no banger VM needs it"
                         + (" (banger switched it on; it never switches it off)" if marker else
                            " (switched on by something else)"))
        if marker:
            rep["status"] = "warn"
            rep["hint"] = "if nothing else on this host routes, turn it off: sysctl -w net.ipv4.ip_forward=0"
    elif needed:
        rep["status"] = "warn"
        rep["detail"] = "IPv4 forwarding is off but VMs need it: " + "; ".join(x["vm_id"] for x in needed)
        rep["hint"] = "restart those VMs (banger switches it on), or sysctl -w net.ipv4.ip_forward=1"
    else:
        rep["detail"] = "IPv4 forwarding is off (no banger VM needs it)"
    if foreign and needed:
        rep["status"] = "warn"
        rep["detail"] += "; other forward chains drop by default: " + ", ".join(foreign)
        rep["hint"] = (f"allow the bridge there too, e.g. for Docker: iptables -I DOCKER-USER -i {n.bridge} -j "
                       f"ACCEPT; iptables -I DOCKER-USER -o {n.bridge} -j ACCEPT")
    return rep


def _foreign_forward_drops(n: _Net) -> list[str]:
    out = []
    for item in nft.list_ruleset():
        c = item.get("chain")
        if c and c.get("hook") == "forward" and c.get("policy") == "drop" and c.get("table") != n.table:
            out.append(f"{c['family']} {c['table']} {c['name']}")
    return out


def doctor_check(cfg) -> dict:
    """One doctor line about forwarding: {"name", "status", "detail", "hint"} (doctor.Check(**this))."""
    from banger.context import Ctx

    rep = forwarding_report(Ctx(cfg))
    detail = rep["detail"]
    if rep.get("route_localnet"):
        detail += f"; route_localnet on {cfg.bridge} ({rep['route_localnet_reason']})"
    return {"name": "ip_forward", "status": rep["status"], "detail": detail, "hint": rep.get("hint")}


# ---------------------------------------------------------------------------- older NAT-only API



def enable_nat(ctx, vm_row: dict) -> dict:
    """Older entry point: NAT for a VM row without layer-2 anti-spoofing (no TAP known).

    Prefer banger.net.apply(ctx, vm, tap), which also guards the TAP.
    """
    vm = vm_net({**vm_row, "net": "nat"}, require_mac=False)
    r = apply(ctx, vm, None, ports=())
    return {"vm_id": vm.id, "ip": vm.ip, "changed": r["changed"], "ip_forward_changed": r["ip_forward_changed"]}


def disable_nat(ctx, vm_row: dict) -> dict:
    """Older entry point: remove everything banger.net.policy set up for this VM (by id)."""
    from banger.errors import UsageError
    vm_id = vm_row.get("id") if isinstance(vm_row, dict) else None
    if not vm_id or not _ID.match(vm_id):
        raise UsageError(f"invalid VM for NAT: {vm_row!r}", "pass the VM's row (with id and ip)")
    r = remove(ctx, vm_id)
    return {"vm_id": vm_id, "removed": r["removed"], "table_removed": r["tables_removed"]}


def list_nat(ctx) -> list[dict]:
    """VMs whose traffic is masqueraded: [{vm_id, ip}] (from the live ruleset)."""
    return [{"vm_id": v["vm_id"], "ip": v["ip"]} for v in active(ctx) if v["masquerade"]]
