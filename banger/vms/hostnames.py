"""VM names, kept true with no daemon: ``<name>.<domain>`` of every running VM that has a network.

``sync(ctx)`` runs after each command that changes which VMs run (create, start, stop, restart,
delete, restore, gc), after that command released the VM's lock:
1. under the ``names`` lock (so the last list computed is the last one pushed), and inside it the
   ``hostnet`` lock, read which VMs run and rewrite banger's block of the hosts file
   (banger.net.hosts.sync: temp file + rename, the rest of the file byte for byte);
2. with ``hostnet`` released (no guest I/O under it), write the same names to the running guests
   as serial control lines (``@banger hosts <domain> name=ip ...``, banger.net.hosts.control_lines),
   which banger-init validates strictly and writes into the guest's /etc/hosts. All guests at once,
   each bounded by a short timeout: a guest that does not read its console delays nobody for long.
Only guests known to listen on their console are pushed to: those whose SSH banger saw come up
(``mark_ready``, under the VM's lock, by create/start/restore; banger-init opens the console before
sshd answers). A guest still booting does not read its console, and waiting for it would cost every
command the timeout. They are pushed to when the names changed, plus those in ``fresh`` (just
booted: no block yet); ``force`` (gc) pushes to every running guest, so a VM started with
``--no-wait`` gets the names from the next ``banger gc``.

Names are not secret: every guest with a network learns the names and addresses of the running VMs.
"""

from __future__ import annotations

from banger.errors import BangerError
from banger.vms.runtime import NET_NONE, RUNNING, effective_state, load_handles, net_mode, run_dir, vm_driver

PUSH_TIMEOUT_S = 1.0
LOCK_TIMEOUT_S = 60.0
READY = "names-ready"  # in the VM's runtime dir (gone with it at teardown)


def mark_ready(ctx, vm) -> None:
    """The guest's init listens on its console (its SSH answered): it gets names pushes from now on.
    Call under the VM's lock, right after the boot plan succeeded."""
    try:
        (run_dir(ctx, vm) / READY).touch(mode=0o600)
    except FileNotFoundError:  # no runtime dir: not running
        pass


def _running(ctx) -> list:
    out = []
    for vm in ctx.store.list_vms():
        if vm["state"] != RUNNING or net_mode(vm) == NET_NONE:
            continue
        h = load_handles(ctx, vm)
        if effective_state(ctx, vm, h) == RUNNING:
            out.append((vm, h, (run_dir(ctx, vm) / READY).exists()))
    return out


def _push(ctx, guests, lines: list[str]) -> dict:
    """Send ``lines`` to each guest's console, all guests in parallel; {vm name: error or None}."""
    import threading

    result: dict = {}

    def one(vm, h):
        try:
            drv = vm_driver(ctx, vm)
            for line in lines:
                drv.send_console(h, line, timeout=PUSH_TIMEOUT_S, wait=False)
            result[vm["name"]] = None
        except BangerError as e:
            result[vm["name"]] = e.message
        except OSError as e:
            result[vm["name"]] = str(e)

    threads = [threading.Thread(target=one, args=(vm, h), daemon=True) for vm, h in guests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PUSH_TIMEOUT_S * (len(lines) + 1) + 1)
    return result


def sync(ctx, *, fresh=(), force: bool = False) -> dict:
    """Make the hosts file and the running guests agree on the running VMs' names.
    Returns {"hosts_file", "changed", "names": [...], "pushed": {vm: error|None}, "hosts_ms", "push_ms"}.
    Raises BangerError only for the hosts file (``after_change`` is the best-effort form commands use)."""
    import time

    from banger.net import hosts

    t0 = time.monotonic()
    dom = hosts.domain(ctx.cfg)
    with ctx.locks.hold("names", timeout=LOCK_TIMEOUT_S, purpose="sync VM names"):
        with ctx.locks.hold("hostnet", purpose="update VM names in the hosts file"):
            guests = _running(ctx)
            pairs = [(vm["name"], vm["ip"]) for vm, _h, _r in guests]
            res = hosts.sync(ctx, pairs, dom=dom, lock_held=True)
        fresh = set(fresh)
        targets = [(vm, h) for vm, h, ready in guests
                   if force or (ready and (res["changed"] or vm["id"] in fresh))]
        t1 = time.monotonic()
        pushed = _push(ctx, targets, hosts.control_lines(pairs, dom)) if targets else {}
    t2 = time.monotonic()
    return {"hosts_file": res["path"], "changed": res["changed"], "names": [f"{n}.{dom}" for n, _ip in pairs],
            "pushed": pushed, "hosts_ms": round((t1 - t0) * 1000, 1), "push_ms": round((t2 - t1) * 1000, 1)}


def after_change(ctx, *, fresh=(), force: bool = False) -> dict:
    """``sync`` for the end of a command that already succeeded: a failure is reported (progress and
    the returned {"error"}), never raised, since the VM change itself is done."""
    try:
        return sync(ctx, fresh=fresh, force=force)
    except BangerError as e:
        ctx.progress.step(f"warning: VM names not updated: {e.message}")
        return {"error": e.message, "hint": e.hint}
