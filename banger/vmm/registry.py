"""The VMM backends banger knows: one line each.

A backend is a package under banger/vmm/ whose ``BACKEND`` (a banger.vmm.base.Backend) says what
everyone else used to hard-code: its driver, whether this host can run it and why not, the kernel
arguments its device model needs, the helper processes it records in handles.json (so teardown and
gc know them positively), and its doctor checks.  Adding a VMM = one package + one line here.
Importing this module imports no backend; ``backend(name)`` imports only that one.
"""

from __future__ import annotations

BACKENDS: dict[str, str] = {
    "firecracker": "banger.vmm.firecracker",
    "qemu": "banger.vmm.qemu",
}
AUTO_ORDER = ("firecracker", "qemu")  # `backend = "auto"` takes the first one this host can run


def names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def choices() -> tuple[str, ...]:
    """What `--backend` and `backend =` in config accept."""
    return ("auto", *BACKENDS)


def backend(name: str):
    import importlib

    if name not in BACKENDS:
        from banger.errors import UsageError

        raise UsageError(f"unknown backend {name!r}", f"use one of: {', '.join(choices())}")
    return importlib.import_module(BACKENDS[name]).BACKEND


def driver(name: str, cfg):
    return backend(name).driver(cfg)


def choose(requested: str, cfg) -> str:
    """``auto`` -> the first backend in AUTO_ORDER this host can run; a named one is taken as asked
    (validated); its own launch says clearly if the host cannot run it."""
    if requested != "auto":
        backend(requested)
        return requested
    reasons = []
    for name in AUTO_ORDER:
        ok, why = backend(name).can_run(cfg)
        if ok:
            return name
        reasons.append(f"{name}: {why}")
    from banger.errors import HostError

    raise HostError("no VMM backend can run on this host (" + "; ".join(reasons) + ")", "run `banger doctor`")
