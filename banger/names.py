"""VM names (DNS labels), generated names, and slot -> address derivation."""

from __future__ import annotations

import re

from banger.errors import InvalidName

# ipaddress and secrets are imported where used: this module is on `banger vm list`'s start-up path.

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")

_ADJ = ("brisk", "calm", "deft", "eager", "fleet", "glad", "hale", "keen", "lucid", "merry", "nimble",
        "plucky", "quick", "spry", "swift", "tidy", "vivid", "witty", "zesty", "bold", "bright", "sunny")
_NOUN = ("otter", "falcon", "lynx", "heron", "marten", "badger", "wren", "ibis", "orca", "puffin",
         "gecko", "panda", "koala", "bison", "crane", "finch", "newt", "tapir", "yak", "zebra")


def validate_name(name: str, what: str = "VM name") -> str:
    """Return ``name`` if it is a valid DNS label (it becomes a hostname, a kernel arg and a path)."""
    if not isinstance(name, str) or not name:
        raise InvalidName(f"{what} must not be empty", "use lowercase letters, digits and '-', e.g. dev-1")
    if len(name) > 63:
        raise InvalidName(f"{what} {name!r} is {len(name)} characters; a DNS label allows at most 63",
                          "choose a shorter name")
    if not _LABEL.match(name):
        lower = name.lower()
        hint = "use lowercase letters a-z, digits and '-', not starting or ending with '-'"
        if lower != name and _LABEL.match(lower):
            hint = f"names are lowercase: try {lower!r}"
        raise InvalidName(f"{what} {name!r} is not a valid DNS label", hint)
    return name


def generate_name() -> str:
    import secrets

    return f"{secrets.choice(_ADJ)}-{secrets.choice(_NOUN)}-{secrets.token_hex(2)}"


def new_vm_id() -> str:
    import os

    return os.urandom(6).hex()  # (secrets would import random, hmac and base64 on every create)


class Subnet:
    """Guest addressing derived from one slot number: ip = network + slot, gateway = network + 1."""

    def __init__(self, cidr: str):
        import ipaddress

        self.net = ipaddress.IPv4Network(cidr, strict=False)
        if self.net.prefixlen > 29:
            raise InvalidName(f"subnet {cidr} is too small", "use a /24 or larger")

    @property
    def gateway(self) -> str:
        return str(self.net.network_address + 1)

    @property
    def prefixlen(self) -> int:
        return self.net.prefixlen

    @property
    def netmask(self) -> str:
        return str(self.net.netmask)

    @property
    def first_slot(self) -> int:
        return 2

    @property
    def last_slot(self) -> int:
        return self.net.num_addresses - 2  # exclude broadcast

    def ip(self, slot: int) -> str:
        if not self.first_slot <= slot <= self.last_slot:
            raise ValueError(f"slot {slot} outside {self.net}")
        return str(self.net.network_address + slot)

    def mac(self, slot: int) -> str:
        # locally administered unicast (06:...) + the 4 bytes of the guest IP
        import ipaddress

        b = ipaddress.IPv4Address(self.ip(slot)).packed
        return "06:00:" + ":".join(f"{x:02x}" for x in b)


def short_digest(data: bytes, n: int = 16) -> str:
    """The first ``n`` hex digits of SHA-256(``data``): names for cache keys. CPython's built-in SHA-256
    module when it has one (importing hashlib loads OpenSSL: ~2.5 ms on a `vm create`'s critical path)."""
    try:
        from _sha256 import sha256  # CPython <= 3.11
    except ImportError:
        try:
            from _sha2 import sha256  # CPython >= 3.12
        except ImportError:
            from hashlib import sha256
    return sha256(data).hexdigest()[:n]
