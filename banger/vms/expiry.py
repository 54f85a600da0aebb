"""VMs that expire: ``--ttl 30m`` on create/run, ``vm set --ttl`` (from now: extends or shortens),
``vm list`` shows the time left, and ``banger gc`` stops and deletes what has expired.

The expiry is an absolute time (``options["expires_at"]``, seconds since the epoch) so every command
agrees on it without a daemon; ``banger gc`` run from cron or a systemd timer enforces it
(docs/gc-timer.md).
"""

from __future__ import annotations

import re
import time

from banger.errors import UsageError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TTL_S = 366 * 86400
_PART = re.compile(r"([0-9]{1,9})([smhd])")
FORMAT = "a number and a unit (s, m, h, d), e.g. 90s, 30m, 2h, 1d or 1h30m"


def parse_ttl(text, flag: str = "--ttl") -> int:
    """``30m`` / ``90s`` / ``2h`` / ``1d`` / ``1h30m`` -> seconds (at least 1 s, at most a year)."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = f"{text}s"
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{flag} needs a duration", f"use {FORMAT}")
    s = text.strip().lower()
    pos, total, seen = 0, 0, set()
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        if m[2] in seen:
            raise UsageError(f"{flag} {text!r} names the unit {m[2]!r} twice", f"use {FORMAT}")
        seen.add(m[2])
        total += int(m[1]) * UNITS[m[2]]
        pos = m.end()
    if pos != len(s) or not seen:
        hint = f"use {FORMAT}"
        if s.isdigit():
            hint = f"give a unit: {s}s, {s}m or {s}h"
        raise UsageError(f"{flag} {text!r} is not a duration", hint)
    if total < 1:
        raise UsageError(f"{flag} {text!r} is zero", "give at least 1s")
    if total > MAX_TTL_S:
        raise UsageError(f"{flag} {text!r} is longer than a year", "give at most 366d (or no --ttl: no expiry)")
    return total


def expires_at(vm) -> float | None:
    v = (vm.get("options") or {}).get("expires_at")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def seconds_left(vm, now: float | None = None) -> float | None:
    """Seconds until ``vm`` expires (<= 0: expired), None if it never does."""
    at = expires_at(vm)
    return None if at is None else at - (time.time() if now is None else now)


def is_expired(vm, now: float | None = None) -> bool:
    left = seconds_left(vm, now)
    return left is not None and left <= 0


def human(left: float | None) -> str:
    """For the TTL column: '', 'expired', '45s', '29m', '1h05m', '2d03h'."""
    if left is None:
        return ""
    if left <= 0:
        return "expired"
    s = int(left + 0.999)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s < 600 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"
