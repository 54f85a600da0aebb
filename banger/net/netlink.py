"""Host networking over netlink (pyroute2): links, bridge, TAPs, addresses, neighbours.

pyroute2 is imported lazily (it costs ~150 ms), only by the functions that talk to
the kernel.  Every netlink/OS error is translated here into a banger error with a
hint; callers never see NetlinkError.

Kernel changes are not always visible to the next dump at once (and another
process may be changing the same objects), so the ``wait_*`` helpers poll to a
deadline instead of trusting a single read (pyroute2's ensure/poll idiom).

Use ``with Netlink() as nl:`` for a batch of operations on one socket; the
module-level ``set_neighbour``/``del_neighbour`` open their own.
"""

from __future__ import annotations

import errno
import socket
import time

from banger.errors import BangerError, Conflict, HostError, NotFound

# tun/tap flags (linux/if_tun.h)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_UP = 0x1
NUD_PERMANENT = 0x80
IFNAMSIZ = 15  # usable characters (16 with the NUL)


def _hint_for(code: int | None, what: str) -> tuple[str, str | None]:
    """(reason, hint) for an errno from netlink or the tun ioctl."""
    if code in (errno.EPERM, errno.EACCES):
        return "permission denied", "run banger as root (it needs CAP_NET_ADMIN to manage the bridge and TAPs)"
    if code in (errno.ENODEV, errno.ENOENT):
        return "no such device", None
    if code == errno.EEXIST:
        return "already exists", None
    if code == errno.EBUSY:
        return "device busy", "another process (a VMM) has it open; stop that VM first"
    if code == errno.EOPNOTSUPP:
        return "operation not supported", f"this kernel lacks support needed to {what}"
    return (errno.errorcode.get(code or 0, f"errno {code}"), None)


def translate(exc: BaseException, what: str) -> BangerError:
    """Turn a NetlinkError/OSError raised while doing ``what`` into a banger error."""
    code = getattr(exc, "code", None)
    if code is None:
        code = getattr(exc, "errno", None)
    reason, hint = _hint_for(code, what)
    msg = f"cannot {what}: {reason} ({exc})"
    details = {"errno": code, "operation": what}
    if code in (errno.EPERM, errno.EACCES):
        return HostError(msg, hint, details=details)
    if code in (errno.ENODEV, errno.ENOENT):
        return NotFound(msg, hint or "run banger pool status / banger doctor to check host networking",
                        details=details)
    if code in (errno.EEXIST, errno.EBUSY):
        return Conflict(msg, hint or "another banger command may be changing the same device; retry",
                        details=details)
    return HostError(msg, hint or "check host networking with banger doctor", details=details)


def _tun_missing_error(exc: BaseException) -> BangerError:
    return HostError(f"cannot create a TAP device: /dev/net/tun is not available ({exc})",
                     "load the tun module: modprobe tun (and make sure /dev/net/tun exists)",
                     details={"errno": getattr(exc, "errno", None)})


def validate_ifname(name: str) -> str:
    if not name or len(name) > IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise BangerError(f"invalid interface name {name!r}",
                          f"interface names are 1-{IFNAMSIZ} characters without '/' or spaces")
    return name


def ifindex(name: str) -> int | None:
    """The ifindex of ``name`` in this network namespace, or None (stdlib ioctl, no pyroute2)."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _poll(pred, timeout: float, interval: float = 0.005):
    """Call ``pred`` until it returns a truthy value or the deadline passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)
        interval = min(interval * 2, 0.1)


class Netlink:
    """One rtnetlink socket. Returns plain dicts, raises banger errors."""

    def __init__(self):
        try:
            from pyroute2 import IPRoute
        except ImportError as e:  # pragma: no cover - dependency is declared
            raise HostError("pyroute2 is not installed", "pip install pyroute2") from e
        try:
            self.ipr = IPRoute()
        except OSError as e:
            raise translate(e, "open a netlink socket") from None

    def close(self) -> None:
        self.ipr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, what: str, fn, *args, **kw):
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            return fn(*args, **kw)
        except (NetlinkError, OSError) as e:
            raise translate(e, what) from None

    # ---- reading ----
    @staticmethod
    def _link_dict(msg, names: dict[int, str] | None = None) -> dict:
        kind = msg.get(("linkinfo", "kind"))
        master = msg.get("master")
        info = {
            "index": msg["index"],
            "name": msg.get("ifname"),
            "kind": kind,
            "up": bool(msg["flags"] & IFF_UP),
            "carrier": bool(msg.get("carrier")),
            "operstate": msg.get("operstate"),
            "mac": msg.get("address"),
            "master_index": master,
            "master": (names or {}).get(master) if master else None,
        }
        if kind == "tun":
            data = msg.get(("linkinfo", "data")) or None
            if data is not None:
                info["tun"] = {
                    "type": {1: "tun", 2: "tap"}.get(data.get("IFLA_TUN_TYPE")),
                    "pi": bool(data.get("IFLA_TUN_PI")),
                    "vnet_hdr": bool(data.get("IFLA_TUN_VNET_HDR")),
                    "persist": bool(data.get("IFLA_TUN_PERSIST")),
                }
        return info

    def links(self, prefix: str | None = None) -> list[dict]:
        msgs = list(self._call("list network links", self.ipr.get_links))
        names = {m["index"]: m.get("ifname") for m in msgs}
        out = [self._link_dict(m, names) for m in msgs]
        if prefix is not None:
            out = [link for link in out if (link["name"] or "").startswith(prefix)]
        return out

    def link(self, name: str) -> dict | None:
        from pyroute2.netlink.exceptions import NetlinkError

        idx = ifindex(name)
        if idx is None:
            return None
        try:
            msgs = list(self.ipr.get_links(idx))
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return None
            raise translate(e, f"read link {name}") from None
        if not msgs or msgs[0].get("ifname") != name:
            return None  # renamed or replaced in between
        d = self._link_dict(msgs[0])
        if d["master_index"]:
            try:
                m = list(self.ipr.get_links(d["master_index"]))
                d["master"] = m[0].get("ifname") if m else None
            except NetlinkError:
                d["master"] = None
        return d

    def addrs(self, name: str) -> list[tuple[str, int]]:
        """IPv4 addresses on ``name`` as (address, prefixlen)."""
        idx = ifindex(name)
        if idx is None:
            return []
        msgs = self._call(f"read addresses of {name}", self.ipr.get_addr, index=idx, family=socket.AF_INET)
        return [(m.get("address"), m["prefixlen"]) for m in msgs]

    def neighbours(self, dev: str) -> list[dict]:
        idx = ifindex(dev)
        if idx is None:
            return []
        msgs = self._call(f"read neighbours of {dev}", self.ipr.get_neighbours, ifindex=idx)
        return [{"ip": m.get("dst"), "mac": m.get("lladdr"), "state": m["state"],
                 "permanent": bool(m["state"] & NUD_PERMANENT)} for m in msgs]

    # ---- waiting (kernel changes are not always visible at once) ----
    def wait_link(self, name: str, pred=lambda link: True, timeout: float = 5.0) -> dict:
        got = _poll(lambda: (lambda link: link if link and pred(link) else None)(self.link(name)), timeout)
        if not got:
            raise HostError(f"network device {name} did not reach the expected state within {timeout:g}s",
                            "check `ip link show` and dmesg; another tool may be changing it",
                            details={"device": name, "last": self.link(name)})
        return got

    def wait_gone(self, name: str, timeout: float = 5.0) -> None:
        if not _poll(lambda: ifindex(name) is None, timeout):
            raise HostError(f"network device {name} is still present {timeout:g}s after deleting it",
                            "check who holds it: it may be open by a running VMM")

    # ---- changing ----
    def add_bridge(self, name: str, mac: str | None = None) -> dict:
        """Create a bridge; a fixed ``mac`` keeps its address stable as ports come and go
        (otherwise the kernel uses the lowest port MAC, and guests' ARP caches go stale)."""
        validate_ifname(name)
        kw = {"address": mac} if mac else {}
        self._call(f"create bridge {name}", self.ipr.link, "add", ifname=name, kind="bridge", **kw)
        return self.wait_link(name)

    def set_mac(self, name: str, mac: str) -> None:
        self._call(f"set the MAC address of {name}", self.ipr.link, "set", index=self._index(name), address=mac)

    def add_addr(self, name: str, address: str, prefixlen: int) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        idx = self._index(name)
        try:
            self.ipr.addr("add", index=idx, address=address, prefixlen=prefixlen)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise translate(e, f"add address {address}/{prefixlen} to {name}") from None
        _poll(lambda: (address, prefixlen) in self.addrs(name), 5.0)

    def set_up(self, name: str, up: bool = True) -> None:
        self._call(f"set {name} {'up' if up else 'down'}", self.ipr.link, "set", index=self._index(name),
                   state="up" if up else "down")

    def set_master(self, name: str, master: str) -> None:
        midx = self._index(master)
        self._call(f"attach {name} to {master}", self.ipr.link, "set", index=self._index(name), master=midx)

    def add_tap(self, name: str, *, master: str | None = None, up: bool = True) -> dict:
        """Create a persistent TAP (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, as QEMU/Firecracker open it).

        Fails with Conflict if ``name`` already exists (the tun ioctl would silently
        re-attach to an existing persistent device, so existence is checked first; the
        caller serialises creators with the ``pool`` lock).  On any failure after the
        device appeared, the device is deleted again.
        """
        validate_ifname(name)
        if ifindex(name) is not None:
            raise Conflict(f"network device {name} already exists",
                           "run banger pool status; banger gc removes leaked TAPs")
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            self.ipr.link("add", ifname=name, kind="tuntap", mode="tap", ifr={"no_pi": 1, "vnet_hdr": 1})
        except OSError as e:  # the TUNSETIFF ioctl path: opening /dev/net/tun failed
            self._cleanup_link(name)
            if isinstance(e, FileNotFoundError) or e.errno == errno.ENODEV:
                raise _tun_missing_error(e) from None
            raise translate(e, f"create TAP {name}") from None
        except NetlinkError as e:
            self._cleanup_link(name)
            raise translate(e, f"create TAP {name}") from None
        try:
            if not _poll(lambda: ifindex(name) is not None, 5.0):
                raise HostError(f"TAP {name} did not appear after creating it", "check dmesg")
            kw: dict = {"state": "up"} if up else {}
            if master:
                kw["master"] = self._index(master)
            if kw:  # one request: attach and bring up
                self._call(f"attach {name} to {master} and bring it up", self.ipr.link, "set",
                           index=self._index(name), **kw)
            return self.wait_link(name, lambda link: (not up or link["up"]) and
                                  (not master or link["master"] == master))
        except BaseException:
            self._cleanup_link(name)
            raise

    def del_link(self, name: str, missing_ok: bool = True) -> bool:
        """Delete ``name``; return False if it was not there (and ``missing_ok``)."""
        from pyroute2.netlink.exceptions import NetlinkError

        idx = ifindex(name)
        if idx is None:
            if missing_ok:
                return False
            raise NotFound(f"network device {name} does not exist", "run banger pool status")
        try:
            self.ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code == errno.ENODEV and missing_ok:
                return False
            raise translate(e, f"delete {name}") from None
        self.wait_gone(name)
        return True

    def _cleanup_link(self, name: str) -> None:
        try:
            self.del_link(name)
        except BangerError:
            pass

    def set_neighbour(self, dev: str, ip: str, mac: str) -> None:
        self._call(f"add neighbour {ip} lladdr {mac} on {dev}", self.ipr.neigh, "replace", dst=ip, lladdr=mac,
                   ifindex=self._index(dev), state=NUD_PERMANENT)

    def del_neighbour(self, dev: str, ip: str) -> bool:
        from pyroute2.netlink.exceptions import NetlinkError

        idx = ifindex(dev)
        if idx is None:
            return False
        try:
            self.ipr.neigh("del", dst=ip, ifindex=idx)
        except NetlinkError as e:
            if e.code in (errno.ENOENT, errno.ENODEV, errno.ESRCH):
                return False
            raise translate(e, f"delete neighbour {ip} on {dev}") from None
        return True

    def _index(self, name: str) -> int:
        idx = ifindex(name)
        if idx is None:
            raise NotFound(f"network device {name} does not exist",
                           "run banger pool warm 1 (creates the bridge) or banger doctor")
        return idx


def set_neighbour(dev: str, ip: str, mac: str) -> None:
    """A permanent neighbour entry ip -> mac on ``dev`` (the bridge): no ARP stall on first contact."""
    with Netlink() as nl:
        nl.set_neighbour(dev, ip, mac)


def del_neighbour(dev: str, ip: str) -> bool:
    """Remove the neighbour entry for ``ip`` on ``dev``; False if there was none (idempotent)."""
    with Netlink() as nl:
        return nl.del_neighbour(dev, ip)
