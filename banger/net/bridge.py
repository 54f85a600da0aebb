"""The host bridge every VM's TAP is attached to.

``ensure_bridge`` is idempotent and cheap when the bridge is already right (no
lock taken); otherwise it takes the ``hostnet`` lock, re-checks, and creates /
fixes the bridge: name ``cfg.bridge``, the subnet's gateway address, up.

IP forwarding is only switched on when NAT is asked for (banger.net.nft).
"""

from __future__ import annotations

from banger.errors import Conflict, HostError
from banger.names import Subnet

IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"


def bridge_mac(sn: Subnet) -> str:
    """The bridge's fixed MAC: locally administered 06:00 + the gateway's IPv4 bytes (guests use
    06:00 + their own IP, so the two never collide)."""
    import ipaddress

    return "06:00:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(sn.gateway).packed)


def _state(nl, name: str, gw: str, prefixlen: int) -> dict:
    link = nl.link(name)
    want_mac = bridge_mac(Subnet(f"{gw}/{prefixlen}"))
    addrs = nl.addrs(name) if link else []
    return {
        "name": name,
        "exists": link is not None,
        "kind": link["kind"] if link else None,
        "up": bool(link and link["up"]),
        "gateway": gw,
        "prefixlen": prefixlen,
        "has_address": (gw, prefixlen) in addrs,
        "addresses": [f"{a}/{p}" for a, p in addrs],
        "mac": link["mac"] if link else None,
        "want_mac": want_mac,
    }


def _ok(st: dict) -> bool:
    return (st["exists"] and st["kind"] == "bridge" and st["up"] and st["has_address"]
            and (st["mac"] or "").lower() == st["want_mac"])


def _fast_state(name: str, sn: Subnet) -> dict | None:
    """The already-correct case, verified from sysfs + SIOCGIFADDR without importing pyroute2;
    None when anything differs (then the netlink path checks in full and repairs)."""
    from banger.net import fastnet

    link = fastnet.link(name)
    want_mac = bridge_mac(sn)
    if not link or link["kind"] != "bridge" or not link["up"] or link["mac"] != want_mac:
        return None
    if fastnet.ipv4(name) != (sn.gateway, sn.prefixlen):
        return None
    return {"name": name, "exists": True, "kind": "bridge", "up": True, "gateway": sn.gateway,
            "prefixlen": sn.prefixlen, "has_address": True, "addresses": [f"{sn.gateway}/{sn.prefixlen}"],
            "mac": link["mac"], "want_mac": want_mac, "created": False, "changed": False}


def bridge_state(ctx, nl=None) -> dict:
    """Read-only view of the bridge (for pool status / doctor)."""
    from banger.net.netlink import Netlink

    sn = Subnet(ctx.cfg.subnet)
    if nl is not None:
        return _state(nl, ctx.cfg.bridge, sn.gateway, sn.prefixlen)
    with Netlink() as nl2:
        return _state(nl2, ctx.cfg.bridge, sn.gateway, sn.prefixlen)


def ensure_bridge(ctx, nl=None) -> dict:
    """Make sure the bridge exists, carries the gateway address and is up. Returns its state.

    ``created``/``changed`` in the result say whether this call did anything.
    """
    name = ctx.cfg.bridge
    sn = Subnet(ctx.cfg.subnet)
    if nl is None:
        fast = _fast_state(name, sn)
        if fast is not None:
            return fast
        from banger.net.netlink import Netlink

        with Netlink() as nl2:
            return ensure_bridge(ctx, nl2)
    st = _state(nl, name, sn.gateway, sn.prefixlen)
    if _ok(st):
        return {**st, "created": False, "changed": False}
    with ctx.locks.hold("hostnet", purpose="ensure bridge"):
        st = _state(nl, name, sn.gateway, sn.prefixlen)  # someone may have fixed it while we waited
        if _ok(st):
            return {**st, "created": False, "changed": False}
        created = False
        if st["exists"] and st["kind"] != "bridge":
            raise Conflict(f"network device {name} exists but is a {st['kind'] or 'plain'} device, not a bridge",
                           f"remove it (ip link del {name}) or set another bridge name in config.toml (bridge = ...)")
        ctx.progress.step(f"setting up bridge {name} ({sn.gateway}/{sn.prefixlen})")
        if not st["exists"]:
            nl.add_bridge(name, st["want_mac"])
            created = True
        try:
            if (nl.link(name)["mac"] or "").lower() != st["want_mac"]:
                nl.set_mac(name, st["want_mac"])
            if not st["has_address"]:
                nl.add_addr(name, sn.gateway, sn.prefixlen)
            if not st["up"]:
                nl.set_up(name)
            nl.wait_link(name, lambda link: link["up"])
        except BaseException:
            if created:  # leave nothing half-made behind
                nl.del_link(name)
            raise
        st = _state(nl, name, sn.gateway, sn.prefixlen)
        if not _ok(st):
            raise HostError(f"bridge {name} is not in the expected state after setting it up: {st}",
                            "check `ip addr show` for a conflicting address or tool managing this device")
        return {**st, "created": created, "changed": True}


def ip_forward_enabled() -> bool:
    try:
        with open(IP_FORWARD) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def enable_ip_forward(ctx, *, lock_held: bool = False) -> bool:
    """Set net.ipv4.ip_forward=1 (under the hostnet lock). Returns True if it changed.

    Pass ``lock_held=True`` when the caller already holds ``hostnet``.
    """
    if ip_forward_enabled():
        return False
    if not lock_held:
        with ctx.locks.hold("hostnet", purpose="enable ip_forward"):
            return enable_ip_forward(ctx, lock_held=True)
    try:
        with open(IP_FORWARD, "w") as f:
            f.write("1\n")
    except PermissionError as e:
        raise HostError(f"cannot enable IP forwarding: {e}",
                        "run banger as root, or set net.ipv4.ip_forward=1 yourself (sysctl -w)") from None
    except OSError as e:
        raise HostError(f"cannot enable IP forwarding: {e}", "set net.ipv4.ip_forward=1 with sysctl") from None
    if not ip_forward_enabled():
        raise HostError("net.ipv4.ip_forward did not stay at 1", "check for a tool resetting sysctls")
    return True
