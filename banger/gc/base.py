"""What every gc collector shares: the report, the resource locks taken without waiting, and what
counts as capacity rather than a leak."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

from banger.errors import BangerError, LockTimeout

# VM states that are capacity, never leaks: the warm VM pool's clones (paused, holding a slot, a TAP,
# disks and a VMM) will have their own state. Every VM collector skips these rows as it skips idle
# pooled TAPs; the pool (`pool drain`) is what removes them.
CAPACITY_STATES = frozenset({"pooled"})
# States of a row an operation is building (a create, a pool claim): its owner's business while the
# owner (options.creator) lives; the vms collector settles it once the owner is dead.
IN_PROGRESS_STATES = frozenset({"creating", "claiming"})


def is_capacity(vm) -> bool:
    return vm is not None and vm["state"] in CAPACITY_STATES


def in_progress(vm) -> bool:
    return vm is not None and vm["state"] in IN_PROGRESS_STATES


class Report:
    """What gc found, per collector key; ``busy`` lists what it left alone because an operation held
    its lock (it is looked at again by the next run)."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.items: dict[str, list] = {}
        self.busy: list[dict] = []
        self.errors: list[str] = []

    def add(self, key: str, item) -> None:
        self.items.setdefault(key, []).append(item)

    def skip_busy(self, lock: str, why: str = "") -> None:
        self.busy.append({"lock": lock, **({"why": why} if why else {})})

    def error(self, what: str, e: BaseException) -> None:
        self.errors.append(f"{what}: {e.message if isinstance(e, BangerError) else f'{type(e).__name__}: {e}'}")

    def to_dict(self, keys) -> dict:
        out = {k: self.items.get(k, []) for k in keys}
        out["busy"] = self.busy
        out["errors"] = self.errors
        out["dry_run"] = self.dry_run
        out["total"] = sum(len(v) for v in (out[k] for k in keys))
        return out


@contextmanager
def locked(ctx, rep: Report, name: str):
    """Hold lock ``name`` for a decision, without waiting: yields True, or False (recorded as busy) when
    an operation holds it. A name no lock could have (not ours) yields False too."""
    with ExitStack() as stack:
        try:
            stack.enter_context(ctx.locks.hold(name, timeout=0, purpose="gc"))
        except LockTimeout:
            rep.skip_busy(name)
            yield False
            return
        except BangerError:
            yield False
            return
        yield True


def unmount_under(d) -> None:
    """Lazily unmount every mount point inside ``d`` (deepest first)."""
    from banger.host.runner import require, run

    root = str(d.resolve()) + "/"
    targets = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                target = line.split()[4].replace("\\040", " ")
                if target.startswith(root):
                    targets.append(target)
    except OSError:
        return
    for t in sorted(set(targets), key=len, reverse=True):
        run([require("umount"), "-l", t], check=False, timeout=60)
