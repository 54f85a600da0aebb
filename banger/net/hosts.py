"""VM names on the host: a block of the hosts file that banger owns, between marker lines.

``sync(ctx, [(name, ip), ...])`` rewrites the block to exactly those entries, as
``<ip>\\t<name>.<domain>``, under the ``hostnet`` lock; an empty list removes the block. The
rest of the file is kept byte for byte. The new file is written beside the old one (same
mode and owner), fsynced and renamed over it, so a reader (glibc re-reads /etc/hosts on
every lookup) sees the old or the new file, never a torn one. Only where the hosts file is
a mount point (a container's bind-mounted /etc/hosts) is rename impossible; then the file
is rewritten in place with one write and the result says ``atomic: False``.

Config (config.toml): ``hosts_file`` (default /etc/hosts; tests point it at a temp file or
/etc/netns/<ns>/hosts) and ``domain`` (default ``banger``).
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from banger.errors import HostError, UsageError

DEFAULT_HOSTS = "/etc/hosts"
DEFAULT_DOMAIN = "banger"
BEGIN = b"# BEGIN banger: names of running VMs (rewritten by banger; edits here are lost)"
END = b"# END banger"
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def hosts_path(cfg) -> Path:
    p = cfg.extra.get("hosts_file", DEFAULT_HOSTS)
    if not isinstance(p, str) or not p.startswith("/"):
        raise UsageError(f"config hosts_file {p!r} is not an absolute path", "e.g. hosts_file = \"/etc/hosts\"")
    return Path(p)


def validate_domain(d) -> str:
    if not isinstance(d, str) or not d or len(d) > 200 or not all(_LABEL.match(x) for x in d.split(".")):
        raise UsageError(f"config domain {d!r} is not a DNS domain",
                         "use lowercase labels of letters, digits and '-' joined by dots, e.g. banger or vm.test")
    return d


def domain(cfg) -> str:
    return validate_domain(cfg.extra.get("domain", DEFAULT_DOMAIN))


def fqdn(cfg, name: str) -> str:
    return f"{name}.{domain(cfg)}"


def render(entries, dom: str) -> bytes:
    """The block (markers included) for ``entries`` [(name, ip)], sorted; b"" when empty."""
    import ipaddress

    from banger.names import validate_name

    validate_domain(dom)
    seen: dict[str, str] = {}
    for name, ip in entries:
        validate_name(name)
        ip = str(ipaddress.IPv4Address(ip))
        if seen.get(name, ip) != ip:
            raise UsageError(f"VM name {name!r} given with two addresses ({seen[name]} and {ip})",
                             "each name maps to one VM")
        seen[name] = ip
    if not seen:
        return b""
    lines = [BEGIN] + [f"{ip}\t{name}.{dom}".encode() for name, ip in sorted(seen.items())] + [END]
    return b"\n".join(lines) + b"\n"


def _find(lines: list[bytes], path) -> tuple[int, int] | None:
    """(begin, end) line indexes of banger's block, None if absent; HostError if malformed."""
    begins = [i for i, ln in enumerate(lines) if ln.rstrip(b"\r\n").startswith(b"# BEGIN banger")]
    ends = [i for i, ln in enumerate(lines) if ln.rstrip(b"\r\n") == END]
    if not begins and not ends:
        return None
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise HostError(f"{path} has a damaged banger block (BEGIN at lines {[b + 1 for b in begins]}, "
                        f"END at lines {[e + 1 for e in ends]})",
                        f"remove the lines between '# BEGIN banger' and '{END.decode()}' from {path} by hand; "
                        "banger rewrites the block on the next VM change")
    return begins[0], ends[0]


def merge(old: bytes, block: bytes, path="hosts file") -> bytes:
    """``old`` with banger's block replaced by ``block`` (appended if absent; removed if empty)."""
    lines = old.splitlines(keepends=True)
    where = _find(lines, path)
    if where is not None:
        b, e = where
        return b"".join(lines[:b]) + block + b"".join(lines[e + 1:])
    if not block:
        return old
    sep = b"" if not old or old.endswith(b"\n") else b"\n"
    return old + sep + block


def entries(path) -> list[tuple[str, str]]:
    """(fqdn, ip) pairs in the block of ``path`` (for tests and doctor)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    lines = data.splitlines(keepends=True)
    where = _find(lines, path)
    if where is None:
        return []
    out = []
    for ln in lines[where[0] + 1:where[1]]:
        f = ln.decode(errors="replace").split()
        if len(f) >= 2:
            out.append((f[1], f[0]))
    return out


def _write(real: str, data: bytes, st: os.stat_result | None) -> bool:
    """Publish ``data`` at ``real``; True if by rename (atomic), False if in place (mount point).

    The new file's data is fsynced before the rename (so no crash leaves an empty hosts file), but
    not the directory after it: a rename a crash loses leaves the previous names, as stale then as
    the VMs they name (a host crash ends them all; gc rewrites the block)."""
    d = os.path.dirname(real)
    tmp = os.path.join(d, f".banger-hosts.{os.urandom(6).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), (st.st_mode & 0o7777) if st else 0o644)
            if st:
                os.fchown(f.fileno(), st.st_uid, st.st_gid)
            os.fsync(f.fileno())
        try:
            os.rename(tmp, real)
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.EXDEV):
                raise
            with open(real, "r+b") as f:  # a bind-mounted file cannot be renamed over: one write in place
                f.write(data)
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
            os.unlink(tmp)
            return False
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def sync(ctx, pairs, *, path=None, dom: str | None = None, lock_held: bool = False) -> dict:
    """Make banger's block in the hosts file list exactly ``pairs`` [(vm name, ip)].

    Idempotent (no write when nothing changes). Returns {"path", "changed", "entries", "atomic"}.
    """
    path = Path(path) if path is not None else hosts_path(ctx.cfg)
    dom = validate_domain(dom) if dom is not None else domain(ctx.cfg)
    block = render(list(pairs), dom)
    if not lock_held:
        with ctx.locks.hold("hostnet", purpose="update VM names in the hosts file"):
            return sync(ctx, pairs, path=path, dom=dom, lock_held=True)
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        with open(real, "rb") as f:
            old = f.read()
    except FileNotFoundError:
        st, old = None, b""
        if not block:
            return {"path": str(path), "changed": False, "entries": 0, "atomic": True}
    except OSError as e:
        raise HostError(f"cannot read {path}: {e.strerror}", "run banger as root") from None
    new = merge(old, block, path)
    n = block.count(b"\n") - 2 if block else 0
    if new == old:
        return {"path": str(path), "changed": False, "entries": n, "atomic": True}
    try:
        atomic = _write(real, new, st)
    except OSError as e:
        raise HostError(f"cannot update {path}: {e.strerror}",
                        "run banger as root, or point hosts_file in config.toml at a writable file") from None
    return {"path": str(path), "changed": True, "entries": n, "atomic": atomic}


CONTROL_PREFIX = "@banger hosts "


def control_line(pairs, dom: str) -> str:
    """The serial control line that tells a guest the current names, for banger-init to write the
    same block into the guest's /etc/hosts: ``@banger hosts <domain> [name=ip ...]`` (sorted;
    no pairs means "remove the block"). Validated exactly as the host block is."""
    render(list(pairs), dom)  # validates names, addresses, domain; raises on duplicates
    body = " ".join(f"{name}={ip}" for name, ip in sorted(dict(pairs).items()))
    return (CONTROL_PREFIX + dom + (" " + body if body else "")).rstrip()


CONTROL_MORE = "@banger hosts+ "
MAX_CONTROL_LINE = 1000  # well under a tty's 4095-byte canonical line limit


def control_lines(pairs, dom: str, max_len: int = MAX_CONTROL_LINE) -> list[str]:
    """The names as one or more control lines no longer than ``max_len``: the first is a
    control_line (it replaces the guest's block), each further ``@banger hosts+ <domain> name=ip
    ...`` adds to it (a serial console reads at most 4095 bytes per line; a /24 holds 253 VMs)."""
    render(list(pairs), dom)
    out, cur = [], (CONTROL_PREFIX + dom)
    for name, ip in sorted(dict(pairs).items()):
        item = f"{name}={ip}"
        if len(cur) + 1 + len(item) > max_len and cur != CONTROL_PREFIX + dom and cur != CONTROL_MORE + dom:
            out.append(cur)
            cur = CONTROL_MORE + dom
        cur += " " + item
    out.append(cur)
    return out


def parse_control_line(line: str) -> tuple[str, list[tuple[str, str]]]:
    """Inverse of control_line, strict (what banger-init must accept and nothing more)."""
    import ipaddress

    from banger.names import validate_name

    if not line.startswith(CONTROL_PREFIX):
        raise UsageError(f"not a hosts control line: {line[:40]!r}")
    words = line[len(CONTROL_PREFIX):].split(" ")
    dom = validate_domain(words[0])
    pairs = []
    for w in words[1:]:
        name, eq, ip = w.partition("=")
        if not eq:
            raise UsageError(f"bad hosts entry {w!r}", "expected name=ip")
        validate_name(name)
        pairs.append((name, str(ipaddress.IPv4Address(ip))))
    return dom, pairs
