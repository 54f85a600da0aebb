"""NAT for VMs through nftables: one banger-owned table, per-VM rules tagged by comment.

Table ``ip banger`` holds two base chains:

* ``postrouting`` (nat, srcnat): ``ip saddr <vm ip> oifname != <bridge> masquerade``
* ``forward`` (filter): accept traffic from the VM out of the bridge, and
  established/related traffic back to it.

Every rule carries the comment ``banger vm=<id> ip=<ip> br=<bridge>``, so a VM's
rules are found and deleted by handle exactly, leaving other VMs' rules alone.
The table is removed when its last VM rule goes.  All changes happen under the
``hostnet`` lock, each as one atomic ``nft -j -f -`` transaction (JSON in, argv
lists only).  NAT also needs ``net.ipv4.ip_forward=1``, which ``enable_nat`` sets.
"""

from __future__ import annotations

import json
import re

from banger.errors import CommandFailed, HostError, UsageError

FAMILY = "ip"
TABLE = "banger"
_COMMENT = re.compile(r"^banger vm=(?P<vm_id>[A-Za-z0-9._-]+) ip=(?P<ip>[0-9.]+) br=(?P<br>\S+)$")


def _nft_bin() -> str:
    from banger.host.runner import require

    return require("nft", "nftables")


def _run(args: list[str], input: str | None = None):
    from banger.host.runner import run

    try:
        return run([_nft_bin(), *args], input=input, timeout=30)
    except CommandFailed as e:
        low = e.stderr.lower()
        if "operation not permitted" in low or "permission denied" in low:
            raise HostError("nftables refused the change: permission denied",
                            "run banger as root (NAT needs CAP_NET_ADMIN)",
                            details=e.details) from None
        if "protocol not supported" in low:
            raise HostError(f"nftables is not usable on this host: {e.stderr.strip()[-200:]}",
                            "load the nf_tables and nft_masq modules: modprobe nf_tables nft_masq nft_chain_nat",
                            details=e.details) from None
        e.hint = e.hint or "check `nft list ruleset`; banger gc removes stale banger NAT rules"
        raise


def _apply(commands: list[dict]) -> None:
    if commands:
        _run(["-j", "-f", "-"], input=json.dumps({"nftables": commands}))


def comment_for(vm_id: str, ip: str, bridge: str) -> str:
    return f"banger vm={vm_id} ip={ip} br={bridge}"


def _table_rules() -> list[dict] | None:
    """All rules of the banger table, or None if the table does not exist."""
    try:
        cp = _run(["-j", "list", "table", FAMILY, TABLE])
    except CommandFailed as e:
        if "no such file or directory" in e.stderr.lower():
            return None
        raise
    doc = json.loads(cp.stdout or "{}")
    return [item["rule"] for item in doc.get("nftables", []) if "rule" in item]


def _parse(rule: dict) -> dict | None:
    m = _COMMENT.match(rule.get("comment") or "")
    if not m:
        return None
    return {"vm_id": m["vm_id"], "ip": m["ip"], "bridge": m["br"], "chain": rule["chain"],
            "handle": rule["handle"], "comment": rule["comment"]}


def _ours() -> list[dict] | None:
    rules = _table_rules()
    if rules is None:
        return None
    return [p for p in (_parse(r) for r in rules) if p]


def list_nat(ctx=None) -> list[dict]:
    """One entry per VM with NAT rules: {vm_id, ip, bridge, rules: [{chain, handle}]} (for gc)."""
    by_vm: dict[str, dict] = {}
    for p in _ours() or []:
        e = by_vm.setdefault(p["vm_id"], {"vm_id": p["vm_id"], "ip": p["ip"], "bridge": p["bridge"], "rules": []})
        e["rules"].append({"chain": p["chain"], "handle": p["handle"]})
    return sorted(by_vm.values(), key=lambda e: e["vm_id"])


def _m(left: dict, right, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _saddr():
    return {"payload": {"protocol": "ip", "field": "saddr"}}


def _daddr():
    return {"payload": {"protocol": "ip", "field": "daddr"}}


def _meta(key: str):
    return {"meta": {"key": key}}


def _base() -> list[dict]:
    t = {"family": FAMILY, "table": TABLE}
    return [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": {"chain": {**t, "name": "postrouting", "type": "nat", "hook": "postrouting", "prio": 100,
                           "policy": "accept"}}},
        {"add": {"chain": {**t, "name": "forward", "type": "filter", "hook": "forward", "prio": 0,
                           "policy": "accept"}}},
    ]


def _vm_rules(vm_id: str, ip: str, bridge: str) -> list[dict]:
    t = {"family": FAMILY, "table": TABLE}
    c = comment_for(vm_id, ip, bridge)
    return [
        {"add": {"rule": {**t, "chain": "postrouting", "comment": c, "expr": [
            _m(_saddr(), ip), _m(_meta("oifname"), bridge, "!="), {"masquerade": None}]}}},
        {"add": {"rule": {**t, "chain": "forward", "comment": c, "expr": [
            _m(_meta("iifname"), bridge), _m(_saddr(), ip), {"accept": None}]}}},
        {"add": {"rule": {**t, "chain": "forward", "comment": c, "expr": [
            _m(_meta("oifname"), bridge), _m(_daddr(), ip),
            _m({"ct": {"key": "state"}}, ["established", "related"], "in"), {"accept": None}]}}},
    ]


def _delete(rules: list[dict]) -> list[dict]:
    return [{"delete": {"rule": {"family": FAMILY, "table": TABLE, "chain": r["chain"], "handle": r["handle"]}}}
            for r in rules]


def _vm_fields(vm_row: dict) -> tuple[str, str | None]:
    vm_id = vm_row.get("id") if isinstance(vm_row, dict) else None
    if not vm_id or not re.match(r"^[A-Za-z0-9._-]+$", vm_id):
        raise UsageError(f"invalid VM for NAT: {vm_row!r}", "pass the VM's row (with id and ip)")
    return vm_id, vm_row.get("ip")


def enable_nat(ctx, vm_row: dict) -> dict:
    """Masquerade ``vm_row``'s IP out of any interface but the bridge. Idempotent."""
    import ipaddress

    from banger.net.bridge import enable_ip_forward

    vm_id, ip = _vm_fields(vm_row)
    try:
        ipaddress.IPv4Address(ip or "")
    except ValueError:
        raise UsageError(f"VM {vm_id} has no valid IPv4 address ({ip!r})", "NAT needs the VM's guest IP") from None
    bridge = ctx.cfg.bridge
    with ctx.locks.hold("hostnet", purpose=f"enable NAT for {vm_id}"):
        fwd = enable_ip_forward(ctx, lock_held=True)
        current = [r for r in (_ours() or []) if r["vm_id"] == vm_id]
        want = comment_for(vm_id, ip, bridge)
        chains = sorted(r["chain"] for r in current)
        if all(r["comment"] == want for r in current) and chains == ["forward", "forward", "postrouting"]:
            return {"vm_id": vm_id, "ip": ip, "changed": False, "ip_forward_changed": fwd}
        # one transaction: (re)create table/chains, drop stale rules of this VM, add the fresh ones
        _apply(_base() + _delete(current) + _vm_rules(vm_id, ip, bridge))
    return {"vm_id": vm_id, "ip": ip, "changed": True, "ip_forward_changed": fwd}


def disable_nat(ctx, vm_row: dict) -> dict:
    """Remove exactly ``vm_row``'s NAT rules (matched by VM id); drop the table when it empties. Idempotent."""
    vm_id, _ip = _vm_fields(vm_row)
    with ctx.locks.hold("hostnet", purpose=f"disable NAT for {vm_id}"):
        ours = _ours()
        if ours is None:
            return {"vm_id": vm_id, "removed": 0, "table_removed": False}
        mine = [r for r in ours if r["vm_id"] == vm_id]
        others = [r for r in ours if r["vm_id"] != vm_id]
        drop_table = not others and len(_table_rules() or []) == len(mine)
        if drop_table:
            _apply([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}])
        else:
            _apply(_delete(mine))
    return {"vm_id": vm_id, "removed": len(mine), "table_removed": drop_table}
