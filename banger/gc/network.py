"""The network and expiry part of `banger gc` (called from banger.gc.service.collect).

* ``expired``: VMs whose ``--ttl`` ran out are stopped and deleted, each under its own lock taken
  without waiting (a VM some command is working on is skipped and reported busy: the next gc
  gets it) and re-checked under that lock.
* ``stale_rules``: banger's nftables objects of VMs that are not running (crashed commands,
  a VM killed behind banger's back, rows deleted by hand) are reaped, each under that VM's lock
  after re-checking it is not running.
* ``names``: the hosts file and every running guest are brought up to date (pushed to all).
"""

from __future__ import annotations

from banger.errors import BangerError, LockTimeout


def _err(report: dict, what: str, e: BaseException) -> None:
    report["errors"].append(f"{what}: {e.message if isinstance(e, BangerError) else e}")


def expired(ctx, report: dict, *, dry_run: bool) -> None:
    """Stop and delete every VM whose expiry has passed (report["expired"], report["busy"])."""
    from banger.vms import expiry
    from banger.vms import runtime as rt

    report.setdefault("expired", [])
    report.setdefault("busy", [])
    for vm in ctx.store.list_vms():
        if not expiry.is_expired(vm) or (vm["state"] == rt.CREATING and rt.creator_alive(vm)):
            continue
        item = {"id": vm["id"], "name": vm["name"], "expired_at": expiry.expires_at(vm)}
        if dry_run:
            report["expired"].append(item)
            continue
        try:
            with ctx.locks.hold(f"vm/{vm['id']}", timeout=0, purpose="gc: expired"):
                cur = ctx.store.vm_by_id(vm["id"])
                if cur is None or not expiry.is_expired(cur):  # deleted, or extended with vm set --ttl meanwhile
                    continue
                rt.destroy_vm(ctx, cur)
            report["expired"].append(item)
        except LockTimeout:
            report["busy"].append({**item, "reason": "another command holds this VM"})
        except BangerError as e:
            _err(report, f"expired VM {vm['name']}", e)


def _live(ctx, vm) -> bool:
    """Its rules are in use: being built or claimed, pooled capacity, running (or left paused)."""
    from banger.vms import runtime as rt

    return (vm["state"] in (rt.CREATING, rt.POOLED, rt.CLAIMING)
            or rt.effective_state(ctx, vm) in (rt.RUNNING, rt.PAUSED))


def stale_rules(ctx, report: dict, *, dry_run: bool) -> None:
    """Reap nftables policy of VMs that are not running (report["rules"])."""
    from banger.host.runner import which
    from banger.net import policy

    report.setdefault("rules", [])
    if which("nft") is None:
        return
    try:
        live = {vm["id"] for vm in ctx.store.list_vms() if _live(ctx, vm)}
        stale = policy.stale_rules(ctx, live)
    except BangerError as e:
        _err(report, "network rules", e)
        return
    for item in stale:
        vm_id = item["vm_id"]
        entry = {"vm_id": vm_id, "ip": item["ip"], "tap": item["tap"], "ports": item["ports"],
                 "name": f"rules of VM {vm_id}"}
        if dry_run:
            report["rules"].append(entry)
            continue
        try:
            with ctx.locks.hold(f"vm/{vm_id}", timeout=0, purpose="gc: stale network rules"):
                cur = ctx.store.vm_by_id(vm_id)
                if cur is not None and _live(ctx, cur):
                    continue  # started meanwhile: its rules are live, not stale
                policy.reap_rules(ctx, [vm_id])
            report["rules"].append(entry)
        except LockTimeout:
            continue  # a command is working on this VM: it owns its rules
        except BangerError as e:
            _err(report, f"network rules of VM {vm_id}", e)


def names(ctx, report: dict, *, dry_run: bool) -> None:
    """Rewrite the hosts file block and push the names to every running guest (report["names"])."""
    if dry_run:
        return
    from banger.vms import hostnames

    try:
        report["names"] = hostnames.sync(ctx, force=True)
    except BangerError as e:
        _err(report, "VM names", e)
