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

PRIVATE_UMASK = 0o077   # every command and helper process runs with it (banger/cli/main.py)
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600

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
    "max_image_size_mib": 16384,           # bound on an image's unpacked size (image pull)
    "pull_stall_timeout_s": 60.0,          # a registry transfer under 1 KiB/s for this long is dropped
    "console_log_max_kib": 1024,           # serial.log rotates to serial.log.1 at this size (2 files kept)
}

# Keys checked for type and range (key: (type, lowest, highest)).
RANGES = {
    "max_image_size_mib": (int, 1, 1 << 24),
    "pull_stall_timeout_s": (float, 0.5, 86400.0),
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


# one checker per key (banger/validate.py); the limits are shared with the flags
def _schema():
    from banger import validate as v
    from banger.vmm.registry import choices  # the registry imports no backend

    return {
        "default_image": lambda x, f: v.text(x, f, max_len=128),
        "default_kernel": lambda x, f: v.text(x, f, max_len=128),
        "backend": lambda x, f: v.choice(x, f, choices()),
        "vcpu": lambda x, f: v.integer(x, f, "vcpu"),
        "memory_mib": lambda x, f: v.size_mib(x, f, "memory_mib"),
        "overlay_size_mib": lambda x, f: v.size_mib(x, f, "overlay_size_mib"),
        "work_disk_size_mib": lambda x, f: v.size_mib(x, f, "work_disk_size_mib"),
        "bridge": v.ifname,
        "subnet": v.subnet,
        "nat": v.boolean,
        "ssh_timeout_s": lambda x, f: v.number(x, f, "ssh_timeout_s"),
        "stop_timeout_s": lambda x, f: v.number(x, f, "stop_timeout_s"),
        "lock_timeout_s": lambda x, f: v.number(x, f, "lock_timeout_s"),
        "firecracker_bin": lambda x, f: v.text(x, f),
        "qemu_bin": lambda x, f: v.text(x, f),
        "max_image_size_mib": lambda x, f: _check_range("max_image_size_mib", x, f),
        "pull_stall_timeout_s": lambda x, f: _check_range("pull_stall_timeout_s", x, f),
        "console_log_max_kib": lambda x, f: v.integer(x, f, lo=16, hi=1 << 20),
    }


# keys kept in Config.extra (read by the module that needs them), with their checker
def _extra_schema():
    from banger import validate as v

    def dns(x, f):  # one resolver or a list of them
        if isinstance(x, list):
            if not 1 <= len(x) <= 3:
                raise v.InvalidInput(f, repr(x), "1 to 3 IPv4 resolvers", 'e.g. dns = ["192.168.1.1"]')
            return [v.ipv4(i, f) for i in x]
        return [v.ipv4(x, f)]

    return {"dns": dns, "image_catalog": lambda x, f: v.text(x, f),
            "domain": lambda x, f: v.text(x, f, max_len=253), "hosts_file": lambda x, f: v.text(x, f),
            "dns_stub_upstreams": lambda x, f: [v.text(i, f) for i in (x if isinstance(x, list) else [x])]}


ENV_OVERRIDES = ("backend", "default_image", "default_kernel", "bridge", "subnet")


def _key_line(text: str, key: str) -> int | None:
    import re

    k = re.escape(key)
    pat = re.compile(rf"^\s*(?:(?:{k}|\"{k}\"|'{k}')\s*=|\[\[?\s*(?:{k}|\"{k}\")\s*[.\]])")
    for i, line in enumerate(text.splitlines(), 1):
        if pat.match(line):
            return i
    return None


def _check_dir_env(var: str, path: Path) -> None:
    """BANGER_HOME / BANGER_RUN: a directory banger can write (or a path it can create)."""
    if not path.is_absolute():
        from banger.validate import InvalidInput

        raise InvalidInput(var, str(path), "an absolute path", f"e.g. {var}={DEFAULT_HOME if var == 'BANGER_HOME' else DEFAULT_RUN}")
    p = path
    while True:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            if p.parent == p:
                return
            p = p.parent
            continue
        except OSError as e:
            from banger.validate import InvalidInput

            raise InvalidInput(var, str(path), f"a directory banger can use ({e.strerror})") from None
        import stat as _stat

        is_dir = _stat.S_ISDIR(st.st_mode)
        if is_dir and os.access(p, os.W_OK | os.X_OK):
            return
        from banger.validate import InvalidInput

        if not is_dir:
            what = "exists and is not a directory" if p == path else f"cannot be created: {p} is not a directory"
            raise InvalidInput(var, str(path), f"a writable directory; it {what}",
                               f"point {var} at a directory, or remove {p}")
        what = "is not writable" if p == path else f"cannot be created: {p} is not writable"
        raise InvalidInput(var, str(path), f"a writable directory; it {what} (read-only filesystem or "
                           "permissions)", f"point {var} at a writable directory")


def _check_range(name: str, value, where) -> int | float:
    import math

    typ, lo, hi = RANGES[name]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        number = number and (isinstance(value, int) or (math.isfinite(value) and value == int(value)))
    if number and math.isfinite(value) and lo <= value <= hi:
        return typ(value)
    kind = "a whole number" if typ is int else "a number"
    raise UsageError(f"config key {name} = {value!r} is not allowed (in {where})",
                     f"set {name} to {kind} from {lo:g} to {hi:g}")


def load_config(env: dict | None = None) -> Config:
    """Read config.toml and the environment; every value goes through banger/validate.py.

    A malformed file, a value of the wrong type or range, or an unknown key close to a known one
    (a typo: `memroy_mib` silently ignored would leave the user on the default without a word) is an
    InvalidInput naming the file, the line and the key. An unknown key that resembles none is a
    warning on stderr, not an error: a config written for a newer banger keeps working here.
    """
    env = os.environ if env is None else env
    home = Path(env.get("BANGER_HOME", DEFAULT_HOME))
    run = Path(env.get("BANGER_RUN", DEFAULT_RUN))
    _check_dir_env("BANGER_HOME", home)
    _check_dir_env("BANGER_RUN", run)
    explicit = env.get("BANGER_CONFIG")
    cfg_path = Path(explicit or str(home / "config.toml"))
    values: dict = {}
    text = ""
    if explicit and not cfg_path.is_file():
        from banger.validate import InvalidInput

        raise InvalidInput("BANGER_CONFIG", explicit, "the path of a TOML file; "
                           + ("it is not a regular file" if cfg_path.exists() else "it does not exist"),
                           "fix BANGER_CONFIG or unset it")
    if cfg_path.is_file():
        import tomllib

        try:
            text = cfg_path.read_bytes().decode("utf-8")
            values = tomllib.loads(text)
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read config file {cfg_path}: {e}", "fix its permissions/encoding or remove it",
                             details={"file": str(cfg_path)}) from e
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"invalid config file {cfg_path}: {e}", "fix the TOML syntax or remove the file",
                             details={"file": str(cfg_path)}) from e
    overrides = {k: env[f"BANGER_{k.upper()}"] for k in ENV_OVERRIDES if env.get(f"BANGER_{k.upper()}")}
    flags = [var for var in ("BANGER_UFFD", "BANGER_UFFD_PREFETCH") if var in env]
    if not values and not overrides and not flags and not env.get("BANGER_HOSTS_FILE"):
        return Config(home=home, run=run)  # nothing to check: no validate import on the common path
    from banger.validate import InvalidInput, boolean

    schema, extra_schema = _schema(), _extra_schema()
    kwargs: dict = {}
    extra: dict = {}
    warnings = []
    for k, val in values.items():
        line = _key_line(text, k)
        where = f"{cfg_path}{f' line {line}' if line else ''}: {k}"
        if k in schema:
            kwargs[k] = schema[k](val, where)
        elif k in extra_schema:
            extra[k] = extra_schema[k](val, where)
        else:
            import difflib

            known = sorted([*schema, *extra_schema])
            close = difflib.get_close_matches(k, known, n=1, cutoff=0.75)
            if close:
                raise InvalidInput(where, k, f"an unknown key; did you mean {close[0]!r}? known keys: "
                                   f"{', '.join(known)}", f"rename it to {close[0]} in {cfg_path}")
            warnings.append(f"warning: {where}: unknown key ignored (known keys: {', '.join(known)})")
            extra[k] = val
    for var in flags:  # read later (restore); checked before anything runs
        boolean(env[var], var)
    # environment overrides for a few keys tests and CI need
    for k, ev in overrides.items():
        kwargs[k] = schema[k](ev, f"BANGER_{k.upper()}")
    if env.get("BANGER_HOSTS_FILE"):  # where VM names go (tests: a per-netns or temporary hosts file)
        extra["hosts_file"] = extra_schema["hosts_file"](env["BANGER_HOSTS_FILE"], "BANGER_HOSTS_FILE")
    if warnings:
        import sys

        sys.stderr.write("\n".join(warnings) + "\n")
    return Config(home=home, run=run, extra=extra, **kwargs)


def tighten_top_dirs(cfg: Config) -> list[str]:
    """First use of an existing home: BANGER_HOME and BANGER_RUN wider than 0700 are made 0700 (two stats
    per command). Deeper offenders are reported by `banger doctor` and fixed by `doctor --fix`."""
    fixed = []
    for d in (cfg.home, cfg.run):
        try:
            mode = os.stat(d).st_mode
        except OSError:
            continue
        if mode & 0o077:
            try:
                os.chmod(d, PRIVATE_DIR)
                fixed.append(str(d))
            except OSError:
                pass
    return fixed
