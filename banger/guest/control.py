"""The serial-console control channel to banger-init (banger/data/guest/banger-init).

A clone restored from a template or forked from a running VM starts with its source's memory: the
same hostname, address, SSH host key, machine-id, CRNG state and a clock that stopped when the
source was paused.  banger gives it its own with one line on the guest's serial console input::

    @banger set NONCE rng=HEX clock=S.F net=IP/PREFIX,GW,MAC host=NAME mid=HEX32 key=B64 pub=B64 [standby=1]

banger-init validates every field strictly (it applies nothing from a line with one bad field),
applies them in a fixed order and answers on the console (serial.log)::

    banger-init: set NONCE ok rng=reseeded        (or rng=mixed: the image has no perl)
    banger-init: set NONCE ok rng=none standby=ready
    banger-init: set NONCE failed host key

``standby=1`` (asked of a VM about to be snapshotted for clones that get keys of their own: a fork's
source, a template's builder) makes banger-init keep a standby sshd waiting for the next host key, so
that a clone's new key costs no sshd start (banger-init's comments tell how).

``Identity`` is what one clone gets; ``set_line`` composes the line; ``wait_answer`` polls the
serial log (from where it stood before the line was sent) for the answer to NONCE.  The guest is
not trusted: its console output is only searched for the exact answer, bounded in size.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from banger.errors import ExternalError, GuestTimeout

ANSWER = "banger-init: set "
IGNORED = b"banger-init: ignored an invalid control line"  # what an older banger-init says to a new field
RNG_BYTES = 32
MAX_SCAN = 1 << 20        # bytes of console output searched for one answer


class Identity:
    """A clone's own identity: hostname, SSH host key (private PEM + public line), machine-id."""

    __slots__ = ("host", "key_pem", "pub_line", "machine_id")

    def __init__(self, host: str, key_pem: bytes, pub_line: str, machine_id: str):
        self.host, self.key_pem, self.pub_line, self.machine_id = host, key_pem, pub_line, machine_id

    @classmethod
    def new(cls, host: str) -> Identity:  # noqa: D102
        from banger.guest.sshkeys import new_host_key

        priv, pub = new_host_key()
        return cls(host, priv, pub, secrets.token_hex(16))


def pem_body(pem: bytes) -> str:
    """The base64 body of an OpenSSH PEM private key on one line (banger-init writes the markers back;
    OpenSSH reads a one-line body)."""
    lines = pem.decode().strip().splitlines()
    if len(lines) < 3 or not lines[0].startswith("-----BEGIN ") or not lines[-1].startswith("-----END "):
        raise ValueError("not a PEM private key")
    return "".join(x.strip() for x in lines[1:-1])


def new_nonce() -> str:
    return secrets.token_hex(8)


def set_line(nonce: str, *, identity: Identity | None = None, host: str | None = None,
             net: tuple[str, str, str] | None = None, clock: float | None = None, rng: bytes | None = None,
             standby: bool = False) -> str:
    """The ``@banger set`` line. ``net`` = (ip/prefix, gateway, mac); ``clock`` = host wall time
    (seconds); ``rng`` = host entropy; ``identity`` adds host name, machine-id and host key (``host``
    alone renames). Fields banger-init applies first come first here too (it sorts them anyway)."""
    fields = [f"set {nonce}"]
    if rng is not None:
        fields.append(f"rng={rng.hex()}")
    if clock is not None:
        fields.append(f"clock={clock:.6f}")
    if net is not None:
        fields.append("net=" + ",".join(net))
    name = identity.host if identity is not None else host
    if name is not None:
        fields.append(f"host={name}")
    if identity is not None:
        fields.append(f"mid={identity.machine_id}")
        fields.append("key=" + pem_body(identity.key_pem))
        fields.append("pub=" + identity.pub_line.split()[1])
    if standby:
        fields.append("standby=1")
    return "@banger " + " ".join(fields)


def log_size(path: Path | str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def wait_answer(serial_log: Path | str, nonce: str, *, offset: int, deadline: float, alive=None,
                ignored_ok: bool = False) -> dict:
    """Poll ``serial_log`` from byte ``offset`` for banger-init's answer to ``nonce``.
    Returns {"ok": True, "rng": ..., ["standby": ...]}; raises ExternalError on a "failed" answer,
    GuestTimeout at the deadline (``alive()`` is called between polls and should raise if the VMM died).
    ``ignored_ok``: an older banger-init refusing the line ("ignored ...") returns {"ok": False,
    "ignored": True} instead of waiting for the deadline."""
    mark = (ANSWER + nonce + " ").encode()
    buf = b""
    pos = offset
    interval = 0.002
    while True:
        try:
            with open(serial_log, "rb") as f:
                f.seek(pos)
                chunk = f.read(MAX_SCAN)
                pos = f.tell()
        except OSError:
            chunk = b""
        if chunk:
            buf = (buf + chunk)[-MAX_SCAN:]
            i = buf.find(mark)
            if i >= 0:
                end = buf.find(b"\n", i)
                if end >= 0:
                    words = buf[i + len(mark):end].decode(errors="replace").strip().split()
                    if words[:1] == ["ok"]:
                        out = {"ok": True}
                        for w in words[1:]:
                            k, _, v = w.partition("=")
                            if k == "rng" and v in ("reseeded", "mixed", "none"):
                                out["rng"] = v
                            elif k == "standby" and v in ("ready", "none"):
                                out["standby"] = v
                        return out
                    raise ExternalError(f"the guest could not apply {' '.join(words[1:3]) or 'the control line'}"
                                        f" (banger-init answered: {' '.join(words)[:80]})",
                                        "see the serial console: banger vm logs")
            if ignored_ok and IGNORED in buf:
                return {"ok": False, "ignored": True}
        if alive is not None:
            alive()
        if time.monotonic() >= deadline:
            raise GuestTimeout("the guest did not answer the console control line in time",
                               "its image may predate this banger (rebuild the image), or the host is overloaded; "
                               "see the serial console: banger vm logs")
        time.sleep(interval)
        interval = min(0.02, interval * 2)


def wait_text(serial_log: Path | str, text: str, *, offset: int, deadline: float) -> bool:
    """Best effort: poll ``serial_log`` from ``offset`` until a line holding ``text`` appears (True) or the
    deadline passes (False)."""
    mark = text.encode()
    buf = b""
    pos = offset
    interval = 0.002
    while True:
        try:
            with open(serial_log, "rb") as f:
                f.seek(pos)
                chunk = f.read(MAX_SCAN)
                pos = f.tell()
        except OSError:
            chunk = b""
        buf = (buf + chunk)[-MAX_SCAN:]
        if mark in buf:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
        interval = min(0.02, interval * 2)
