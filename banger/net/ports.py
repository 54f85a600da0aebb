"""Published ports: ``[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]`` from the host to a VM.

A publication is a durable claim (table ``published_ports``, primary key proto + host port,
so two VMs can never hold the same host port, whatever host address they name) that
follows the VM across stop/start; while the VM's policy is live (banger.net.policy.apply)
the claims are DNAT rules in banger's nftables table. A claim is refused when another VM
holds the port or a host process has it bound (/proc/net/{tcp,udp}{,6} plus a bind probe):
DNAT would silently shadow that process.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import time
from collections import namedtuple

from banger.errors import Conflict, UsageError

PORT_FORMAT = "[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp], e.g. 8080:80, 127.0.0.1:5432:5432 or 5353:53/udp"
_NUM = re.compile(r"^[0-9]{1,5}$")


class PortSpec(namedtuple("PortSpec", "proto host_ip host_port guest_port")):
    """proto: tcp | udp; host_ip: None for every host address (and 127.0.0.1). (collections.namedtuple:
    typing costs ~2 ms of every `vm create`'s start.)"""

    __slots__ = ()

    def __str__(self) -> str:
        return (f"{self.host_ip}:" if self.host_ip else "") + f"{self.host_port}:{self.guest_port}/{self.proto}"

    def to_dict(self) -> dict:
        return {"proto": self.proto, "host_ip": self.host_ip, "host_port": self.host_port,
                "guest_port": self.guest_port, "spec": str(self)}


def _err(text, why: str, hint: str | None = None) -> UsageError:
    return UsageError(f"-p {text!r}: {why}", hint or f"use {PORT_FORMAT}")


def _num(text, whole, what: str) -> int:
    if not _NUM.match(text):
        raise _err(whole, f"{what} {text!r} is not a port number")
    v = int(text)
    if not 1 <= v <= 65535:
        raise _err(whole, f"{what} {v} is out of range", "ports are 1-65535")
    return v


def parse(text) -> PortSpec:
    """Parse one -p value strictly; errors name the value and the part that is wrong."""
    import ipaddress

    if isinstance(text, PortSpec):
        return text
    if not isinstance(text, str) or not text:
        raise _err(text, "empty value")
    if any(c.isspace() for c in text):
        raise _err(text, "contains whitespace")
    body, slash, proto = text.partition("/")
    if slash:
        if proto not in ("tcp", "udp"):
            raise _err(text, f"protocol {proto!r} is not tcp or udp")
    else:
        proto = "tcp"
    if body.startswith("["):
        raise _err(text, "IPv6 host addresses are not supported (published ports are IPv4)")
    parts = body.split(":")
    if len(parts) == 2:
        host_ip, hp, gp = None, parts[0], parts[1]
    elif len(parts) == 3:
        host_ip, hp, gp = parts
        try:
            addr = ipaddress.IPv4Address(host_ip)
        except ValueError:
            raise _err(text, f"host address {host_ip!r} is not an IPv4 address") from None
        if addr.is_multicast or addr == ipaddress.IPv4Address("255.255.255.255"):
            raise _err(text, f"host address {host_ip} is not a unicast address")
        host_ip = None if addr.is_unspecified else str(addr)
    elif len(parts) == 1:
        raise _err(text, "needs both a host port and a guest port", "write HOSTPORT:GUESTPORT, e.g. 8080:80")
    else:
        raise _err(text, "too many ':'-separated parts")
    return PortSpec(proto, host_ip, _num(hp, text, "host port"), _num(gp, text, "guest port"))


def parse_many(values) -> list[PortSpec]:
    """Parse a list of -p values; the same host port twice (per protocol) is an error."""
    out: list[PortSpec] = []
    for v in values or ():
        p = parse(v)
        for q in out:
            if (q.proto, q.host_port) == (p.proto, p.host_port):
                raise _err(v, f"host port {p.host_port}/{p.proto} is given twice ({q} and {p})",
                           "each host port can be published once")
        out.append(p)
    return out


def parse_ref(text) -> tuple[str | None, int]:
    """``HOSTPORT[/proto]`` or a full spec, for ``vm port rm``: (proto or None, host port)."""
    if isinstance(text, str) and ":" not in text:
        body, slash, proto = text.partition("/")
        if slash and proto not in ("tcp", "udp"):
            raise _err(text, f"protocol {proto!r} is not tcp or udp")
        return (proto if slash else None), _num(body, text, "host port")
    p = parse(text)
    return p.proto, p.host_port


# ---------------------------------------------------------------------------- host side

_PROC = {"tcp": ("/proc/net/tcp", "/proc/net/tcp6"), "udp": ("/proc/net/udp", "/proc/net/udp6")}
TCP_LISTEN = "0A"


def _hex_addr(h: str) -> str:
    """A /proc/net address (little-endian 32-bit words) as text; v4-mapped v6 shown as IPv4."""
    import ipaddress

    raw = bytes.fromhex(h)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return str(ipaddress.IPv4Address(words))
    a6 = ipaddress.IPv6Address(words)
    return str(a6.ipv4_mapped) if a6.ipv4_mapped else str(a6)


def _sockets(proto: str, proc_files=None) -> list[dict] | None:
    """Every TCP listener / bound UDP socket in this network namespace (None: /proc unreadable)."""
    out, readable = [], False
    for path in proc_files or _PROC[proto]:
        try:
            with open(path) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            f = line.split()
            if len(f) < 10 or (proto == "tcp" and f[3] != TCP_LISTEN):
                continue
            addr, _, hport = f[1].partition(":")
            out.append({"address": _hex_addr(addr), "port": int(hport, 16), "inode": int(f[9]),
                        "family": "ipv6" if len(addr) == 32 else "ipv4"})
    return out if readable else None


def bound_sockets(proto: str, port: int, proc_files=None) -> list[dict]:
    """Sockets in this network namespace with local ``port``: TCP listeners, any UDP socket."""
    return [s for s in _sockets(proto, proc_files) or [] if s["port"] == port]


def _shadowed(sock_addr: str, host_ip: str | None) -> bool:
    """Would DNAT of (host_ip or every address):port take traffic away from a socket on sock_addr?"""
    if sock_addr in ("0.0.0.0", "::"):
        return True
    if ":" in sock_addr:  # a specific IPv6 address: IPv4 DNAT never sees its traffic
        return False
    return host_ip is None or sock_addr == host_ip


def _owner_of(inode: int) -> str | None:
    want = f"socket:[{inode}]"
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == want:
                        with open(f"/proc/{pid}/comm") as f:
                            return f"pid {pid} ({f.read().strip()})"
                except OSError:
                    continue
        except OSError:
            continue
    return None


def _probe_bind(proto: str, host_ip: str | None, port: int) -> bool:
    """True if binding the port fails with EADDRINUSE (a socket we could not see holds it)."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind)
    try:
        if proto == "tcp":  # TIME_WAIT leftovers are no reason to refuse
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host_ip or "0.0.0.0", port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
        return False
    finally:
        s.close()


def host_port_users(specs) -> dict:
    """{spec: who} for the specs whose host port a host process (this netns) has bound so that
    publishing it would shadow them ("pid 42 (nginx) on 0.0.0.0:8080/tcp"); free ones are absent.
    Reads /proc/net once per protocol; only if that is unreadable, tries to bind the port."""
    out = {}
    socks: dict[str, list | None] = {}
    for p in specs:
        if p.proto not in socks:
            socks[p.proto] = _sockets(p.proto)
        if socks[p.proto] is None:
            if _probe_bind(p.proto, p.host_ip, p.host_port):
                out[p] = f"a socket on {p.host_ip or '0.0.0.0'}:{p.host_port}/{p.proto}"
            continue
        for s in socks[p.proto]:
            if s["port"] == p.host_port and _shadowed(s["address"], p.host_ip):
                who = _owner_of(s["inode"])
                out[p] = f"{who or 'a process'} on {s['address']}:{p.host_port}/{p.proto}"
                break
    return out


def host_port_user(proto: str, port: int, host_ip: str | None = None) -> str | None:
    """Who has ``port`` bound on the host so that publishing it would shadow them, or None."""
    return host_port_users([PortSpec(proto, host_ip, port, port)]).get(PortSpec(proto, host_ip, port, port))


def check_host_ip(spec: PortSpec) -> None:
    """A HOSTIP must be an address of this host (else DNAT would never match)."""
    if spec.host_ip is None:
        return
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((spec.host_ip, 0))
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"-p {spec}: {spec.host_ip} is not an address of this host",
                             "use one of the host's addresses (ip -4 addr), 127.0.0.1, or leave it out for all"
                             ) from None
        raise
    finally:
        s.close()


# ---------------------------------------------------------------------------- durable claims

def _row_spec(r: dict) -> PortSpec:
    return PortSpec(r["proto"], r["host_ip"] or None, r["host_port"], r["guest_port"])


def claims(ctx, vm_id: str | None = None) -> list[PortSpec]:
    """The VM's published ports from the store (all VMs' with vm_id=None), ordered."""
    if vm_id is None:
        rows = ctx.store.query("SELECT * FROM published_ports ORDER BY host_port, proto")
    else:
        rows = ctx.store.query("SELECT * FROM published_ports WHERE vm_id = ? ORDER BY host_port, proto", (vm_id,))
    return [_row_spec(r) for r in rows]


def _vm_fields(vm) -> tuple[str, str]:
    vm_id = vm if isinstance(vm, str) else (vm.get("id") if isinstance(vm, dict) else getattr(vm, "id", None))
    if not isinstance(vm_id, str) or not vm_id:
        raise UsageError(f"invalid VM {vm!r}", "pass the VM's row")
    name = vm.get("name") if isinstance(vm, dict) else getattr(vm, "name", None)
    return vm_id, name or vm_id


def _insert(ctx, vm_id: str, specs: list[PortSpec]) -> None:
    now = time.time()
    with ctx.store.immediate() as c:
        for p in specs:
            held = c.execute("SELECT p.vm_id, v.name FROM published_ports p LEFT JOIN vms v ON v.id = p.vm_id "
                             "WHERE p.proto = ? AND p.host_port = ?", (p.proto, p.host_port)).fetchone()
            if held:
                who = "this VM" if held["vm_id"] == vm_id else f"VM {held['name'] or held['vm_id']}"
                raise Conflict(f"host port {p.host_port}/{p.proto} is already published by {who}",
                               "pick another host port" + ("" if held["vm_id"] == vm_id else
                                                           f", or free it: banger vm port rm "
                                                           f"{held['name'] or held['vm_id']} {p.host_port}/{p.proto}"),
                               details={"port": str(p), "vm_id": held["vm_id"]})
            c.execute("INSERT INTO published_ports (vm_id, proto, host_ip, host_port, guest_port, created_at) "
                      "VALUES (?, ?, ?, ?, ?, ?)", (vm_id, p.proto, p.host_ip, p.host_port, p.guest_port, now))


def _delete(ctx, vm_id: str, specs: list[PortSpec]) -> None:
    with ctx.store.immediate() as c:
        for p in specs:
            c.execute("DELETE FROM published_ports WHERE vm_id = ? AND proto = ? AND host_port = ?",
                      (vm_id, p.proto, p.host_port))


def forget(ctx, vm_id: str) -> int:
    """Drop every claim of ``vm_id`` (delete; the vms row's ON DELETE CASCADE does it too)."""
    return ctx.store.execute("DELETE FROM published_ports WHERE vm_id = ?", (vm_id,))

