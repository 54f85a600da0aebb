"""The one validation layer: every value from outside (a flag, config.toml, an environment variable)
goes through one of these checkers before anything is reserved or written.

Each checker takes the raw value and the *field* it came from (``--memory``, ``config.toml
memory_mib``, ``BANGER_UFFD``) and returns the typed value, or raises :class:`InvalidInput`
(a UsageError: exit code 2) whose message names the field, the value and what is allowed.

Limits per field live in :data:`LIMITS`, so a flag and its config key share one rule.
Core layer: imports nothing heavy (no typer, no ipaddress unless a subnet is checked).
"""

from __future__ import annotations

import math
import re

from banger.errors import UsageError

MiB_PER = {"": 1, "M": 1, "G": 1024, "T": 1024 * 1024}


class InvalidInput(UsageError):
    """A value from outside is of the wrong type, out of range, or not one of the choices."""

    code = "invalid_input"

    def __init__(self, field: str, value, allowed: str, hint: str | None = None):
        shown = value if isinstance(value, str) else repr(value)
        if isinstance(value, str):
            shown = repr(value) if len(value) <= 80 else repr(value[:77] + "...")
        hint = hint or (f"see banger ... --help for {field}" if field.startswith("-") else
                        f"fix {field.split(': ')[0]}" if ": " in field else f"check {field}")
        super().__init__(f"{field}: invalid value {shown}: {allowed}", hint,
                         details={"field": field, "value": value if isinstance(value, (str, int, float, bool))
                                  else repr(value), "allowed": allowed})
        self.field = field


# name -> (min, max) in the field's unit (MiB for sizes, seconds for durations)
LIMITS: dict[str, tuple[float, float]] = {
    "vcpu": (1, 64),
    "memory_mib": (128, 1024 * 1024),            # 128 MiB .. 1 TiB
    "overlay_size_mib": (64, 16 * 1024 * 1024),  # 64 MiB .. 16 TiB (ext4's file size limit)
    "work_disk_size_mib": (64, 16 * 1024 * 1024),
    "ssh_timeout_s": (1, 24 * 3600),
    "stop_timeout_s": (0, 24 * 3600),
    "lock_timeout_s": (0, 7 * 24 * 3600),
    "ttl_s": (1, 365 * 24 * 3600),
    "pool_size": (0, 1024),
}


def _human_mib(n: float) -> str:
    if n >= 1024 * 1024 and n % (1024 * 1024) == 0:
        return f"{int(n // (1024 * 1024))} TiB"
    if n >= 1024 and n % 1024 == 0:
        return f"{int(n // 1024)} GiB"
    return f"{int(n)} MiB"


def _limits(key: str | None, lo, hi):
    if key is not None:
        dlo, dhi = LIMITS[key]
        lo = dlo if lo is None else lo
        hi = dhi if hi is None else hi
    return lo, hi


def size_mib(value, field: str, key: str | None = None, *, lo: int | None = None, hi: int | None = None) -> int:
    """A size in MiB: an integer (MiB), or a string with a unit: '512', '512M', '2G', '1.5G', '1T',
    'MiB'/'GiB' spellings too. Rejects inf, nan, negatives, zero, fractions of a MiB and anything past
    the field's maximum (``LIMITS[key]``)."""
    lo, hi = _limits(key, lo, hi)
    allowed = f"a size from {_human_mib(lo)} to {_human_mib(hi)}, e.g. 1024 (MiB), 512M, 2G"
    if isinstance(value, bool):
        raise InvalidInput(field, value, allowed)
    if isinstance(value, int):
        n = float(value)
    elif isinstance(value, float):
        n = value
    elif isinstance(value, str):
        s = value.strip().upper()
        for suffix in ("IB", "B"):
            if s.endswith(suffix) and len(s) > len(suffix) and s[-len(suffix) - 1] in "MGT":
                s = s[:-len(suffix)]
                break
        unit = s[-1] if s and s[-1] in "MGT" else ""
        num = s[:-1] if unit else s
        # digits with at most one decimal point: no exponents, no inf/nan, no signs, no underscores
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)?|\.[0-9]+", num):
            raise InvalidInput(field, value, allowed)
        n = float(num) * MiB_PER[unit]
    else:
        raise InvalidInput(field, value, allowed)
    if not math.isfinite(n) or n <= 0:
        raise InvalidInput(field, value, allowed)
    if n != int(n):
        raise InvalidInput(field, value, "a whole number of MiB; " + allowed)
    n = int(n)
    if not lo <= n <= hi:
        raise InvalidInput(field, value, allowed)
    return n


def integer(value, field: str, key: str | None = None, *, lo: int | None = None, hi: int | None = None) -> int:
    """An integer in [lo, hi] (from ``LIMITS[key]`` unless given). Strings of digits are accepted
    (environment variables); bools, floats and anything else are not."""
    lo, hi = _limits(key, lo, hi)
    allowed = f"a whole number from {lo} to {hi}"
    if isinstance(value, bool):
        raise InvalidInput(field, value, allowed)
    if isinstance(value, str):
        if not re.fullmatch(r"\s*-?[0-9]+\s*", value):
            raise InvalidInput(field, value, allowed)
        n = int(value)
    elif isinstance(value, int):
        n = value
    else:
        raise InvalidInput(field, value, allowed)
    if not lo <= n <= hi:
        raise InvalidInput(field, value, allowed)
    return n


def number(value, field: str, key: str | None = None, *, lo: float | None = None, hi: float | None = None) -> float:
    """A finite number in [lo, hi] (seconds for the *_s keys)."""
    lo, hi = _limits(key, lo, hi)
    allowed = f"a number from {lo:g} to {hi:g}"
    if isinstance(value, bool):
        raise InvalidInput(field, value, allowed)
    if isinstance(value, str):
        if not re.fullmatch(r"\s*[0-9]+(\.[0-9]+)?\s*", value):
            raise InvalidInput(field, value, allowed)
        n = float(value)
    elif isinstance(value, (int, float)):
        n = float(value)
    else:
        raise InvalidInput(field, value, allowed)
    if not math.isfinite(n) or not lo <= n <= hi:
        raise InvalidInput(field, value, allowed)
    return n


_DUR = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(value, field: str, key: str | None = "ttl_s", *, lo: float | None = None,
               hi: float | None = None) -> float:
    """A duration in seconds: a number (seconds) or '90s', '30m', '2h', '7d', or combined '1h30m'."""
    lo, hi = _limits(key, lo, hi)
    allowed = f"a duration from {lo:g}s to {hi:g}s, e.g. 90s, 30m, 2h, 1h30m, 7d"
    if isinstance(value, bool):
        raise InvalidInput(field, value, allowed)
    if isinstance(value, (int, float)):
        n = float(value)
    elif isinstance(value, str):
        s = value.strip().lower()
        if re.fullmatch(r"[0-9]+(\.[0-9]+)?", s):
            n = float(s)
        elif s and re.fullmatch(r"(?:[0-9]+[dhms])+", s):
            n = float(sum(int(num) * _DUR[u] for num, u in re.findall(r"([0-9]+)([dhms])", s)))
        else:
            raise InvalidInput(field, value, allowed)
    else:
        raise InvalidInput(field, value, allowed)
    if not math.isfinite(n) or not lo <= n <= hi:
        raise InvalidInput(field, value, allowed)
    return n


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def boolean(value, field: str) -> bool:
    """Strict: a TOML boolean, or (environment) one of true/false/1/0/yes/no/on/off. 'maybe' is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise InvalidInput(field, value, "true or false")


def choice(value, field: str, choices) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise InvalidInput(field, value, f"one of: {', '.join(choices)}")
    return value


def text(value, field: str, *, max_len: int = 4096, allow_empty: bool = False) -> str:
    """A plain string: no NUL or other control characters; empty only if allowed."""
    if not isinstance(value, str):
        raise InvalidInput(field, value, "a string")
    if not value.strip() and not allow_empty:
        raise InvalidInput(field, value, "a non-empty string")
    if len(value) > max_len or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidInput(field, value, f"at most {max_len} printable characters")
    return value


def name(value, field: str, what: str = "VM name") -> str:
    """A VM or snapshot name (a DNS label). Empty is an error, never 'use the default'."""
    from banger.errors import InvalidName
    from banger.names import validate_name

    allowed = "a DNS label: 1-63 lowercase letters, digits and '-', not starting or ending with '-'"
    if not isinstance(value, str) or not value:
        raise InvalidInput(field, value, allowed)
    try:
        return validate_name(value, what)
    except InvalidName as e:
        raise InvalidInput(field, value, allowed, e.hint) from None


_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")


def sha256_hex(value, field: str) -> str:
    v = value.strip().lower().removeprefix("sha256:") if isinstance(value, str) else value
    if not isinstance(v, str) or not re.fullmatch(r"[0-9a-f]{64}", v):
        raise InvalidInput(field, value, "64 hex digits (optionally prefixed sha256:)")
    return v


def ifname(value, field: str) -> str:
    if not isinstance(value, str) or not _IFNAME.match(value):
        raise InvalidInput(field, value, "a network interface name: 1-15 letters, digits, '_', '.', '-'")
    return value


def subnet(value, field: str) -> str:
    allowed = "an IPv4 network in CIDR form, /8 to /29, e.g. 172.30.0.0/24"
    if not isinstance(value, str):
        raise InvalidInput(field, value, allowed)
    import ipaddress

    try:
        net = ipaddress.IPv4Network(value, strict=False)
    except ValueError:
        raise InvalidInput(field, value, allowed) from None
    if not 8 <= net.prefixlen <= 29:
        raise InvalidInput(field, value, allowed)
    return value


def ipv4(value, field: str) -> str:
    allowed = "an IPv4 address, e.g. 1.1.1.1"
    if not isinstance(value, str):
        raise InvalidInput(field, value, allowed)
    import ipaddress

    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise InvalidInput(field, value, allowed) from None
    return value
