"""Publishing guest ports on the host: the claim rows (banger.net.ports) and the DNAT rules of a live
VM's policy (banger.net.policy) changed together, under the `hostnet` lock."""

from __future__ import annotations

from banger.errors import Conflict, NotFound, UsageError
from banger.net import policy, ports


def publish(ctx, vm, specs) -> dict:
    """Claim ``specs`` (one -p value or a list) for ``vm`` (its row: id, ip, mac, name, net/nat);
    all or nothing. Refused (Conflict) when another VM holds a host port or a host process has
    it bound. If the VM's policy is live the DNAT rules go in at once; otherwise at its next
    policy.apply (start). Returns {"vm_id", "published": [...], "live": bool}."""
    specs = ports.parse_many([specs] if isinstance(specs, (str, ports.PortSpec)) else specs)
    vm_id, name = ports._vm_fields(vm)
    if not isinstance(vm, str) and policy.vm_net(vm, require_mac=False).mode == "none":
        raise UsageError(f"VM {name} has no network (--net none): it cannot publish ports",
                         "change its network with banger vm set --net nat|isolated while it is stopped")
    for p in specs:
        ports.check_host_ip(p)
    with ctx.locks.hold("hostnet", purpose=f"publish ports for {vm_id}"):
        obs = policy._read(policy._net(ctx))
        live = any(vm_id in policy._vm_objects(obs[fam]) for fam in obs)
        if not live:  # a live VM's apply below checks the host (once) before any rule goes in
            for p, user in ports.host_port_users(specs).items():
                raise Conflict(f"host port {p.host_port}/{p.proto} is in use on the host ({user})",
                               "stop that process or publish on another host port", details={"port": str(p)})
        ports._insert(ctx, vm_id, specs)
        if live:
            try:
                policy._apply_locked(ctx, policy.vm_net(vm, require_mac=False), policy.KEEP, ports.claims(ctx, vm_id),
                                     obs)
            except BaseException:
                ports._delete(ctx, vm_id, specs)
                raise
    return {"vm_id": vm_id, "published": [str(p) for p in specs], "live": live}


def precheck(ctx, specs) -> None:
    """Fail fast, before a VM is reserved: Conflict if another VM claims one of these host ports or a
    host process has it bound. No lock and nothing written (the claim itself re-checks atomically)."""
    specs = ports.parse_many(specs)
    for p in specs:
        ports.check_host_ip(p)
        held = ctx.store.one("SELECT p.vm_id, v.name FROM published_ports p LEFT JOIN vms v ON v.id = p.vm_id "
                             "WHERE p.proto = ? AND p.host_port = ?", (p.proto, p.host_port))
        if held:
            who = held["name"] or held["vm_id"]
            raise Conflict(f"host port {p.host_port}/{p.proto} is already published by VM {who}",
                           f"pick another host port, or free it: banger vm port rm {who} {p.host_port}/{p.proto}",
                           details={"port": str(p), "vm_id": held["vm_id"]})
    for p, user in ports.host_port_users(specs).items():
        raise Conflict(f"host port {p.host_port}/{p.proto} is in use on the host ({user})",
                       "stop that process or publish on another host port", details={"port": str(p)})


def unpublish(ctx, vm, refs) -> dict:
    """Remove publications of ``vm`` by ``HOSTPORT[/proto]`` or full spec (one or a list);
    HOSTPORT alone removes both protocols. NotFound if a ref matches nothing."""
    vm_id, name = ports._vm_fields(vm)
    refs = [refs] if isinstance(refs, (str, ports.PortSpec)) else list(refs)
    mine = ports.claims(ctx, vm_id)
    gone: list[ports.PortSpec] = []
    for ref in refs:
        proto, port = ports.parse_ref(ref) if not isinstance(ref, ports.PortSpec) else (ref.proto, ref.host_port)
        hit = [p for p in mine if p.host_port == port and (proto is None or p.proto == proto)]
        if not hit:
            raise NotFound(f"VM {name} does not publish host port {port}" + (f"/{proto}" if proto else ""),
                           f"see banger vm port list {name}")
        gone += [p for p in hit if p not in gone]
    with ctx.locks.hold("hostnet", purpose=f"unpublish ports of {vm_id}"):
        ports._delete(ctx, vm_id, gone)
        live = policy._is_live(ctx, vm_id)
        if live:
            policy._apply_locked(ctx, policy.vm_net(vm, require_mac=False), policy.KEEP, ports.claims(ctx, vm_id))
    return {"vm_id": vm_id, "removed": [str(p) for p in gone], "live": live}


def list_ports(ctx, vm=None) -> list[dict]:
    """Publications (of one VM, or all), each with "active": the DNAT rule is live now."""
    vm_id = None if vm is None else ports._vm_fields(vm)[0]
    if vm_id is None:
        rows = ctx.store.query("SELECT p.*, v.name FROM published_ports p LEFT JOIN vms v ON v.id = p.vm_id "
                               "ORDER BY p.host_port, p.proto")
    else:
        rows = ctx.store.query("SELECT p.*, v.name FROM published_ports p LEFT JOIN vms v ON v.id = p.vm_id "
                               "WHERE p.vm_id = ? ORDER BY p.host_port, p.proto", (vm_id,))
    live = {(v["vm_id"], s) for v in policy.active(ctx) for s in v["ports"]}
    return [{**ports._row_spec(r).to_dict(), "vm_id": r["vm_id"], "vm_name": r["name"],
             "active": (r["vm_id"], str(ports._row_spec(r))) in live} for r in rows]


