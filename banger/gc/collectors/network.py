"""The network side of gc (banger.gc.network): VMs whose --ttl ran out (first, so what they leave is
no leak below), nftables policy of VMs that are not running, and the VM names (hosts file + guests)."""

from __future__ import annotations

KEYS = ("expired", "rules")  # the names sync is not a leak: reported beside the totals (out["names"])


def _run(ctx, rep, fn, key) -> None:
    d = {key: [], "busy": [], "errors": []}
    fn(ctx, d, dry_run=rep.dry_run)
    for x in d.get(key) or []:
        rep.add(key, x)
    for b in d["busy"]:
        rep.busy.append({"lock": f"vm/{b.get('id') or b.get('vm_id')}", **b})
    rep.errors += d["errors"]


def expired(ctx, rep) -> None:
    from banger.gc import network

    _run(ctx, rep, network.expired, "expired")


def rules(ctx, rep) -> None:
    from banger.gc import network

    _run(ctx, rep, network.stale_rules, "rules")


def names(ctx, rep) -> None:
    from banger.gc import network

    d = {"names": None, "busy": [], "errors": []}
    network.names(ctx, d, dry_run=rep.dry_run)
    rep.names = d.get("names")
    rep.errors += d["errors"]
