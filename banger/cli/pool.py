from __future__ import annotations

from typing import Annotated

import typer

from banger.cli.app import JsonOpt, emit, make_app, make_ctx, print_kv, print_table, say

app = make_app("Warm, inspect and drain the TAP device pool.")


@app.command(help="Make sure at least N idle TAP devices and N ready-made disk sets (default image, default "
                  "sizes) are ready (idempotent; safe to run from cron).")
def warm(n: Annotated[str, typer.Argument(metavar="N", help="How many idle TAPs to keep ready (0-1024).")],
         disks: Annotated[str | None, typer.Option("--disks", metavar="M", help="How many disk sets to keep ready "
                                                   "(default: N).")] = None,
         json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger import validate
        from banger.net import pool
        from banger.vms import lifecycle

        count = validate.integer(n, "N", "pool_size")
        out = pool.warm(ctx, count)
        out["disks"] = lifecycle.warm_disks(ctx, count if disks is None else validate.integer(disks, "--disks",
                                                                                              "pool_size"))
        return out

    def render(d):
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


@app.command(help="Show the bridge and every pooled TAP (idle or claimed by a VM).")
def status(json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger.net import pool
        from banger.vms import diskpool

        return {**pool.status(ctx), "disks": diskpool.status(ctx.cfg)}

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

    emit(go, json_out=json_out, render=render)


@app.command(help="Delete all idle TAPs and ready-made disk sets (claimed ones stay with their VMs).")
def drain(json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger.net import pool
        from banger.vms import diskpool

        return {**pool.drain(ctx), "disk_sets_drained": diskpool.drain(ctx)}

    def render(d):
        say(f"drained {len(d['drained'])} idle TAP(s) and {d['disk_sets_drained']} disk set(s); "
            f"{d['claimed_kept']} claimed kept")

    emit(go, json_out=json_out, render=render)
