from __future__ import annotations

from typing import Annotated

import typer

from banger.cli.app import JsonOpt, emit, make_app, make_ctx, print_kv, print_table, say

app = make_app("Warm, inspect and drain the TAP and VM pools.")


def _render_vms(d):
    if d.get("template") and d["template"]["built"]:
        say(f"built template {d['template']['id']} ({d['template']['build_ms'] / 1000:.1f}s)")
    for x in d["dropped"]:
        say(f"dropped pooled clone {x['name']} ({x['reason']})")
    if d["noop"]:
        say(f"VM pool already warm: {d['pooled']} paused clone(s) of {d['image']} ({d['elapsed_ms']} ms)")
    else:
        say(f"restored {len(d['created'])} clone(s); {d['pooled']} paused clone(s) of {d['image']} "
            f"[{d['key']}] ready ({d['elapsed_ms'] / 1000:.1f}s)")


@app.command(help="Make sure at least N idle TAP devices and N ready-made disk sets (default image, default "
                  "sizes) are ready, and with --vms M at least M paused clones of the template for "
                  "--image/--kernel/--vcpu/--memory (idempotent; safe to run from cron).")
def warm(n: Annotated[str | None, typer.Argument(metavar="[N]", help="How many idle TAPs to keep ready (0-1024).")]
         = None,
         disks: Annotated[str | None, typer.Option("--disks", metavar="M", help="How many disk sets to keep ready "
                                                   "(default: N).")] = None,
         vms: Annotated[str | None, typer.Option("--vms", metavar="M", help="How many paused VM clones to keep "
                                                 "ready (0-1024).")] = None,
         image: Annotated[str | None, typer.Option("--image", help="Image of the pooled VMs.")] = None,
         kernel: Annotated[str | None, typer.Option("--kernel", help="Kernel (default: the image's).")] = None,
         vcpu: Annotated[str | None, typer.Option("--vcpu", help="vCPUs of the pooled VMs (1-64).")] = None,
         memory: Annotated[str | None, typer.Option("--memory", help="Memory of the pooled VMs, e.g. 1G.")] = None,
         backend: Annotated[str | None, typer.Option("--backend", help="auto | qemu | firecracker.")] = None,
         json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    if n is None and vms is None:
        def usage():
            from banger.errors import UsageError

            raise UsageError("say how many TAPs (N) and/or VMs (--vms M) to keep warm",
                             "e.g. banger pool warm 8, or banger pool warm --vms 4")

        emit(usage, json_out=json_out)
        return
    if n is None:
        from banger.cli.vm import parse_mib

        def go_vms():
            from banger import validate
            from banger.cli.vm import parse_vcpu
            from banger.vmpool import service as vmpool

            return vmpool.warm(ctx, validate.integer(vms, "--vms", "pool_size"), image=image, kernel=kernel,
                               backend=backend, vcpu=parse_vcpu(vcpu), memory_mib=parse_mib(memory, "--memory"))

        emit(go_vms, json_out=json_out, render=_render_vms)
        return

    def go():
        from banger import validate
        from banger.net import pool
        from banger.vms import lifecycle

        count = validate.integer(n, "N", "pool_size")
        out = pool.warm(ctx, count)
        out["disks"] = lifecycle.warm_disks(ctx, count if disks is None else validate.integer(disks, "--disks",
                                                                                              "pool_size"))
        if vms is not None:
            from banger.cli.vm import parse_mib, parse_vcpu
            from banger.vmpool import service as vmpool

            out["vms"] = vmpool.warm(ctx, validate.integer(vms, "--vms", "pool_size"), image=image, kernel=kernel,
                                     backend=backend, vcpu=parse_vcpu(vcpu), memory_mib=parse_mib(memory, "--memory"))
        return out

    def render(d):
        if d.get("vms"):
            _render_vms(d["vms"])
        if d["noop"]:
            say(f"pool already warm: {d['idle']} idle, {d['claimed']} claimed ({d['elapsed_ms']} ms)")
        else:
            rep = d["repaired"]
            extra = ", ".join(f"{k.replace('_', ' ')}: {' '.join(v)}" for k, v in rep.items() if v)
            say(f"created {len(d['created'])} TAP(s); {d['idle']} idle, {d['claimed']} claimed "
                f"({d['elapsed_ms']} ms){'; ' + extra if extra else ''}")
        dk = d["disks"]
        say("disk sets: " + (dk.get("skipped") or f"{dk['ready']} ready, {dk['made']} made"))

    emit(go, json_out=json_out, render=render)


@app.command(help="Show the bridge, every pooled TAP (idle or claimed by a VM) and the warm VM pool.")
def status(json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger.net import pool
        from banger.vmpool import service as vmpool
        from banger.vms import diskpool

        return {**pool.status(ctx), "disks": diskpool.status(ctx.cfg), "vms": vmpool.status(ctx)}

    def render(d):
        b = d["bridge"]
        print_kv({"bridge": b["name"], "exists": b["exists"], "up": b["up"],
                  "address": f"{b['gateway']}/{b['prefixlen']}" + ("" if b["has_address"] else " (missing)"),
                  "idle": d["idle"], "claimed": d["claimed"], "disk sets": d["disks"]["sets"]})
        if d["taps"]:
            print_table(["tap", "state", "vm", "device", "up", "in use"],
                        [[t["name"], t["state"], t["vm_id"] or "", "yes" if t["device"] else "MISSING",
                          "yes" if t["up"] else "no", "yes" if t["in_use"] else "no"] for t in d["taps"]])
        if d["unknown_devices"]:
            say(f"devices without a row (banger gc removes them): {' '.join(d['unknown_devices'])}")
        rows = [[g["key"], g["image"], g["backend"], g["vcpu"], f"{g['memory_mib']}M",
                 "yes" if g["current"] else "STALE", v["name"], v["ip"], "paused" if v["alive"] else "DEAD"]
                for g in d["vms"]["groups"] for v in g["vms"]]
        if rows:
            print_table(["template", "image", "backend", "vcpu", "mem", "current", "vm", "ip", "state"], rows,
                        title="warm VM pool")
        else:
            say("warm VM pool: empty (banger pool warm --vms N fills it)")

    emit(go, json_out=json_out, render=render)


@app.command(help="Delete all idle TAPs (claimed ones stay with their VMs); with --vms, the pooled VM clones "
                  "instead (their TAPs go back to the TAP pool).")
def drain(vms: Annotated[bool, typer.Option("--vms", help="Remove the warm VM pool's clones.")] = False,
          json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        if vms:
            from banger.vmpool import service as vmpool

            return vmpool.drain(ctx)
        from banger.net import pool
        from banger.vms import diskpool

        return {**pool.drain(ctx), "disk_sets_drained": diskpool.drain(ctx)}

    def render(d):
        if vms:
            say(f"removed {len(d['drained'])} pooled VM clone(s)")
            return
        say(f"drained {len(d['drained'])} idle TAP(s) and {d['disk_sets_drained']} disk set(s); "
            f"{d['claimed_kept']} claimed kept")

    emit(go, json_out=json_out, render=render)
