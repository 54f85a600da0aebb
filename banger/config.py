"""Paths and configuration.

State lives in one directory (``BANGER_HOME``, default /var/lib/banger); runtime
files (sockets, pid files) under ``BANGER_RUN`` (default /run/banger).  Optional
settings come from ``$BANGER_HOME/config.toml`` (or ``BANGER_CONFIG``); every key
has a documented default below, so the file may be absent.
"""

from __future__ import annotations

import os
from pathlib import Path

from banger.errors import UsageError

DEFAULT_HOME = "/var/lib/banger"
DEFAULT_RUN = "/run/banger"

# Documented defaults (README.md, "Configuration").
DEFAULTS = {
    "default_image": "debian-bookworm",   # image used when --image is not given
    "default_kernel": "debian-6.1-cloud",  # kernel used when --kernel is not given
    "backend": "auto",                     # auto | firecracker | qemu
    "vcpu": 1,
    "memory_mib": 1024,
    "overlay_size_mib": 4096,
    "work_disk_size_mib": 2048,
    "bridge": "banger0",
    "subnet": "172.30.0.0/24",             # gateway is the first host address
    "nat": False,
    "ssh_timeout_s": 120.0,
    "stop_timeout_s": 20.0,
    "lock_timeout_s": 600.0,
    "firecracker_bin": "firecracker",
    "qemu_bin": "qemu-system-x86_64",
}


class Config:
    """Settings + derived paths. A plain class (not a dataclass: importing dataclasses pulls in
    inspect, ~20 ms on every command's start-up). Treat it as immutable; ``replace`` copies."""

    __slots__ = ("home", "run", "extra", *DEFAULTS)

    def __init__(self, home: Path, run: Path, extra: dict | None = None, **settings):
        unknown = set(settings) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown config keys: {sorted(unknown)}")
        self.home, self.run, self.extra = Path(home), Path(run), dict(extra or {})
        for k, v in DEFAULTS.items():
            setattr(self, k, settings.get(k, v))

    def replace(self, **changes) -> Config:
        cur = {k: getattr(self, k) for k in DEFAULTS}
        base = {"home": self.home, "run": self.run, "extra": self.extra}
        for k in ("home", "run", "extra"):
            if k in changes:
                base[k] = changes.pop(k)
        return Config(**base, **{**cur, **changes})

    def __repr__(self) -> str:
        return f"Config(home={self.home!s}, run={self.run!s})"

    # ---- derived paths (one place, so no module invents its own) ----
    @property
    def db_path(self) -> Path:
        return self.home / "state.db"

    @property
    def locks_dir(self) -> Path:
        return self.home / "locks"

    @property
    def kernels_dir(self) -> Path:
        return self.home / "kernels"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def vms_dir(self) -> Path:
        return self.home / "vms"

    @property
    def snapshots_dir(self) -> Path:
        return self.home / "snapshots"

    @property
    def staging_dir(self) -> Path:
        return self.home / "staging"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def ssh_dir(self) -> Path:
        return self.home / "ssh"

    def vm_dir(self, vm_id: str) -> Path:
        return self.vms_dir / vm_id

    def vm_run_dir(self, vm_id: str) -> Path:
        return self.run / "vms" / vm_id


def _coerce(name: str, value, typ):
    if typ is bool:
        if isinstance(value, bool):
            return value
        return str(value).lower() in ("1", "true", "yes", "on")
    if typ is int:
        return int(value)
    if typ is float:
        return float(value)
    return str(value)


def load_config(env: dict | None = None) -> Config:
    env = os.environ if env is None else env
    home = Path(env.get("BANGER_HOME", DEFAULT_HOME))
    run = Path(env.get("BANGER_RUN", DEFAULT_RUN))
    cfg_path = Path(env.get("BANGER_CONFIG", str(home / "config.toml")))
    values: dict = {}
    if cfg_path.is_file():
        import tomllib

        try:
            values = tomllib.loads(cfg_path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"invalid config file {cfg_path}: {e}", "fix the TOML syntax or remove the file") from e
    known = {k: type(v) for k, v in DEFAULTS.items()}
    kwargs = {}
    extra = {}
    for k, v in values.items():
        if k in known:
            kwargs[k] = _coerce(k, v, known[k])
        else:
            extra[k] = v
    # environment overrides for a few keys tests and CI need
    for k in ("backend", "default_image", "default_kernel", "bridge", "subnet"):
        ev = env.get(f"BANGER_{k.upper()}")
        if ev:
            kwargs[k] = ev
    if env.get("BANGER_HOSTS_FILE"):  # where VM names go (tests: a per-netns or temporary hosts file)
        extra["hosts_file"] = env["BANGER_HOSTS_FILE"]
    from banger.vmm.registry import choices  # the registry imports no backend

    if kwargs.get("backend", "auto") not in choices():
        raise UsageError(f"unknown backend {kwargs['backend']!r}", f"use one of: {', '.join(choices())}")
    return Config(home=home, run=run, extra=extra, **kwargs)
