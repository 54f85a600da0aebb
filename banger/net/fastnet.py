"""Read-mostly host network checks that need no pyroute2 (which costs ~200 ms to import).

`vm create` with a warm pool and an existing bridge only has to *verify* state
(sysfs + one ioctl) and write one neighbour entry; it does that here, with a
minimal rtnetlink request for the neighbour, and leaves pyroute2
(banger.net.netlink) to every path that must create or repair something.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

IFF_UP = 0x1
SIOCGIFADDR = 0x8915
SIOCGIFNETMASK = 0x891B

# rtnetlink constants (linux/rtnetlink.h, linux/neighbour.h, linux/netlink.h)
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
NLMSG_ERROR = 2
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT = 0x80


def link(name: str) -> dict | None:
    """{name, kind ('tun'|'bridge'|'other'), up, master, mac} from sysfs, or None if absent."""
    base = f"/sys/class/net/{name}"
    try:
        flags = int(open(f"{base}/flags").read().strip(), 16)
        mac = open(f"{base}/address").read().strip().lower()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if os.path.exists(f"{base}/tun_flags"):
        kind = "tun"
    elif os.path.isdir(f"{base}/bridge"):
        kind = "bridge"
    else:
        kind = "other"
    try:
        master = os.path.basename(os.readlink(f"{base}/master"))
    except OSError:
        master = None
    return {"name": name, "kind": kind, "up": bool(flags & IFF_UP), "master": master, "mac": mac}


def ipv4(name: str) -> tuple[str, int] | None:
    """The primary IPv4 address and prefix length of ``name`` (SIOCGIFADDR/NETMASK), or None."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        req = struct.pack("16s16x", name.encode()[:15])
        try:
            addr = fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24]
            mask = fcntl.ioctl(s.fileno(), SIOCGIFNETMASK, req)[20:24]
        except OSError:
            return None
        return socket.inet_ntoa(addr), bin(int.from_bytes(mask, "big")).count("1")
    finally:
        s.close()


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def _request(msg: bytes, seq: int = 1) -> None:
    """Send one rtnetlink request and wait for its ack; OSError(errno) when the kernel refuses it."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        s.settimeout(5)
        s.bind((0, 0))
        s.send(msg)
        while True:
            data = s.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _f, rseq, _pid = struct.unpack_from("IHHII", data, off)
                if mtype == NLMSG_ERROR and rseq == seq:
                    code = -struct.unpack_from("i", data, off + 16)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return
                off += max(16, (length + 3) & ~3)
    finally:
        s.close()


def _neigh_request(msg_type: int, flags: int, idx: int, ip: str, mac: str | None) -> None:
    # struct ndmsg: family, pad1, pad2, ifindex, state, flags, type
    body = struct.pack("BBHiHBB", socket.AF_INET, 0, 0, idx, NUD_PERMANENT, 0, 0)
    body += _attr(NDA_DST, socket.inet_aton(ip))
    if mac:
        body += _attr(NDA_LLADDR, bytes.fromhex(mac.replace(":", "")))
    _request(struct.pack("IHHII", 16 + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK | flags, 1, 0) + body)


def set_master(dev: str, master: str | None) -> None:
    """Attach ``dev`` to bridge ``master`` (None: detach) with one RTM_SETLINK IFLA_MASTER request (no
    pyroute2 on this path). Attaching an up port whose carrier is on enables it at once (STP off)."""
    from banger.errors import HostError

    try:
        idx = socket.if_nametoindex(dev)
        midx = socket.if_nametoindex(master) if master else 0
        body = struct.pack("BBHiII", socket.AF_UNSPEC, 0, 0, idx, 0, 0) + _attr(10, struct.pack("I", midx))  # IFLA_MASTER
        _request(struct.pack("IHHII", 16 + len(body), 19, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body)  # RTM_SETLINK
    except OSError as e:
        raise HostError(f"cannot {'attach' if master else 'detach'} {dev}: {e}", "run banger gc") from None


def set_neighbour(dev: str, ip: str, mac: str) -> None:
    """Permanent neighbour entry ip -> mac on dev (RTM_NEWNEIGH, create|replace)."""
    from banger.errors import HostError, NotFound

    try:
        idx = socket.if_nametoindex(dev)
    except OSError:
        raise NotFound(f"network device {dev} does not exist", "run banger pool warm 1 (creates the bridge)") \
            from None
    try:
        _neigh_request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, idx, ip, mac)
    except OSError as e:
        if e.errno == errno.EPERM:
            raise HostError(f"cannot add neighbour {ip} on {dev}: permission denied", "run banger as root") from None
        raise HostError(f"cannot add neighbour {ip} lladdr {mac} on {dev}: {e}", "check `ip neigh` on the host") \
            from None


def set_up(dev: str, up: bool) -> None:
    """Set ``dev`` administratively up or down with one RTM_SETLINK request (ifi_change = IFF_UP). A
    TAP that is down passes no frame to its bridge: a VM's TAP stays down until its guard is in place."""
    from banger.errors import HostError

    try:
        idx = socket.if_nametoindex(dev)
        body = struct.pack("BBHiII", socket.AF_UNSPEC, 0, 0, idx, IFF_UP if up else 0, IFF_UP)
        _request(struct.pack("IHHII", 16 + len(body), 19, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body)  # RTM_SETLINK
    except OSError as e:
        raise HostError(f"cannot set {dev} {'up' if up else 'down'}: {e}", "run banger gc") from None
