"""What banger accepts as a commit id or a branch name when one comes from a guest (pure).

A guest's answers are hostile input: an id must be a full hex object name; a branch name must
pass git's own check-ref-format rules, be valid UTF-8 without control characters, and never
start with '-' (so it can never be read as an option by git on the host)."""

from __future__ import annotations

import re

SHA = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_NAME = 255


def valid_sha(s) -> bool:
    return isinstance(s, str) and bool(SHA.match(s))


def valid_branch(name) -> bool:
    if not isinstance(name, str) or not name or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        return False
    try:
        name.encode("utf-8")  # lone surrogates: the guest's name was not UTF-8
    except UnicodeEncodeError:
        return False
    if name.startswith("-") or name == "HEAD" or name == "@" or _BAD_CHARS.search(name):
        return False
    if ".." in name or "@{" in name or "//" in name or name.startswith("/") or name.endswith(("/", ".")):
        return False
    return all(part and not part.startswith(".") and not part.endswith(".lock") for part in name.split("/"))


def shown(name: str) -> str:
    """A guest string made safe to print and to put in JSON: non-UTF-8 bytes and control characters
    (terminal escape sequences) as \\xNN escapes."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def count(text: str) -> int | None:
    """A decimal count as git prints it (at most 9 digits), else None."""
    t = text.strip()
    return int(t) if t.isdigit() and t.isascii() and len(t) <= 9 else None


def printable(text: str) -> str:
    """Guest text (stderr) for an error message: lines kept, other control characters escaped."""
    return "\n".join(shown(line) for line in text.split("\n"))


def printable_path(path: str) -> bool:
    """A guest path banger will pass back to the guest: UTF-8, no control characters."""
    return shown(path) == path
