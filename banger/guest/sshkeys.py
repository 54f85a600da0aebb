"""banger's own SSH client key pair and per-VM host keys.

The client key is created on first use under $BANGER_HOME/ssh (0600). Host keys
are generated per VM on the host and injected into the VM's overlay disk, so the
key is known (and pinned) before the first connection; no VM shares one.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from banger.host.fsutil import atomic_write_bytes


def _gen_ed25519() -> tuple[bytes, str]:
    """Return (OpenSSH private key PEM, 'ssh-ed25519 AAAA...' public line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    k = Ed25519PrivateKey.generate()
    priv = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                           serialization.NoEncryption())
    pub = k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return priv, pub


def fingerprint(pub_line: str) -> str:
    """SHA256 fingerprint in OpenSSH's format."""
    blob = base64.b64decode(pub_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class ClientKey:
    def __init__(self, ssh_dir: Path):
        self.dir = Path(ssh_dir)
        self.private = self.dir / "id_ed25519"
        self.public = self.dir / "id_ed25519.pub"

    def ensure(self) -> ClientKey:
        if not self.private.exists() or not self.public.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir, 0o700)
            priv, pub = _gen_ed25519()
            # write private first; a concurrent creator's rename wins as a whole pair only if we
            # write public after private, so a reader that sees .pub also sees a matching key
            from filelock import FileLock

            with FileLock(str(self.dir / ".keygen.lock")):
                if not self.private.exists() or not self.public.exists():
                    atomic_write_bytes(self.private, priv, 0o600)
                    atomic_write_bytes(self.public, (pub + " banger\n").encode(), 0o600)
        return self

    @property
    def public_line(self) -> str:
        return " ".join(self.public.read_text().split()[:2])

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_line)


def client_key(cfg) -> ClientKey:
    return ClientKey(cfg.ssh_dir).ensure()


def new_host_key() -> tuple[bytes, str]:
    """A fresh ed25519 host key for one VM: (private PEM, public line)."""
    return _gen_ed25519()
