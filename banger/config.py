"""Paths and configuration.

State lives in one directory (``BANGER_HOME``, default /var/lib/banger); runtime
files (sockets, pid files) under ``BANGER_RUN`` (default /run/banger).  Optional
settings come from ``$BANGER_HOME/config.toml`` (or ``BANGER_CONFIG``); every key
has a documented default below, so the file may be absent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import UsageError

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


@dataclass(frozen=True)
class Config:
    home: Path
    run: Path
    default_image: str = DEFAULTS["default_image"]
    default_kernel: str = DEFAULTS["default_kernel"]
    backend: str = DEFAULTS["backend"]
    vcpu: int = DEFAULTS["vcpu"]
    memory_mib: int = DEFAULTS["memory_mib"]
    overlay_size_mib: int = DEFAULTS["overlay_size_mib"]
    work_disk_size_mib: int = DEFAULTS["work_disk_size_mib"]
    bridge: str = DEFAULTS["bridge"]
    subnet: str = DEFAULTS["subnet"]
    nat: bool = DEFAULTS["nat"]
    ssh_timeout_s: float = DEFAULTS["ssh_timeout_s"]
    stop_timeout_s: float = DEFAULTS["stop_timeout_s"]
    lock_timeout_s: float = DEFAULTS["lock_timeout_s"]
    firecracker_bin: str = DEFAULTS["firecracker_bin"]
    qemu_bin: str = DEFAULTS["qemu_bin"]
    extra: dict = field(default_factory=dict)

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
    if typ in ("int", int):
        return int(value)
    if typ in ("float", float):
        return float(value)
    if typ in ("bool", bool):
        if isinstance(value, bool):
            return value
        return str(value).lower() in ("1", "true", "yes", "on")
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
    known = {f.name: f.type for f in fields(Config) if f.name not in ("home", "run", "extra")}
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
    if kwargs.get("backend", "auto") not in ("auto", "firecracker", "qemu"):
        raise UsageError(f"unknown backend {kwargs['backend']!r}", "use one of: auto, firecracker, qemu")
    return Config(home=home, run=run, extra=extra, **kwargs)
