from __future__ import annotations

import time
from typing import Annotated

import typer

from banger.cli.app import JsonOpt, emit, make_app, make_ctx, print_kv, print_table, say

app = make_app("Snapshot VMs and manage snapshots.")

SnapArg = Annotated[str, typer.Argument(metavar="SNAPSHOT", help="Snapshot name.")]


def _size(n) -> str:
    if not n:
        return ""
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


@app.command(help="Snapshot a running VM (memory + disks). The guest pauses briefly and keeps running.")
def create(vm: Annotated[str, typer.Argument(metavar="VM", help="VM name or id.")],
           name: Annotated[str | None, typer.Argument(metavar="[NAME]",
                                                      help="Snapshot name (a DNS label); default VM-date-time.")]
           = None,
           json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger import validate
        from banger.snapshots import service as snapshots

        if name is not None:
            validate.name(name, "NAME", "snapshot name")
        return snapshots.create(ctx, vm, name)

    emit(go, json_out=json_out,
         render=lambda s: say(f"snapshot {s['name']} of {s['vm_name']} ({s['backend']}, {_size(s['size_bytes'])}, "
                              f"{s['create_ms'] / 1000:.2f}s)"))


@app.command("list", help="List snapshots.")
def list_(json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger.snapshots import service as snapshots

        return snapshots.list_snapshots(ctx)

    def render(rows):
        if not rows:
            say("no snapshots (create one: banger snapshot create VM [NAME])")
            return
        print_table(["name", "vm", "backend", "image", "memory", "size", "created"],
                    [[r["name"], r["vm_name"], r["backend"], r["image"], f"{r['memory_mib']}M",
                      _size(r["size_bytes"]), time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"]))]
                     for r in rows])

    emit(go, json_out=json_out, render=render)


@app.command(help="Show one snapshot.")
def show(snapshot: SnapArg, json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger.snapshots import service as snapshots

        return snapshots.show(ctx, snapshot)

    emit(go, json_out=json_out, render=lambda s: print_kv({k: v for k, v in s.items() if k != "meta"},
                                                           title=s["name"]))


@app.command(help="Remove snapshots (clones already restored from them keep running).")
def rm(snapshots_: Annotated[list[str], typer.Argument(metavar="SNAPSHOT...", help="Snapshot names.")],
       json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger.snapshots import service as snapshots

        return [snapshots.remove(ctx, s) for s in snapshots_]

    emit(go, json_out=json_out, render=lambda rows: [say(f"removed {r['name']}") for r in rows])


@app.command(help="Create a new running VM from a snapshot (same as `banger vm restore`).")
def restore(snapshot: SnapArg,
            name: Annotated[str | None, typer.Option("--name", help="Name of the new VM; generated if absent.")]
            = None,
            no_wait: Annotated[bool, typer.Option("--no-wait", help="Do not wait for SSH.")] = False,
            json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger import validate
        from banger.snapshots import service as snapshots

        if name is not None:
            validate.name(name, "--name")
        return snapshots.restore(ctx, snapshot, name=name, wait_ssh=not no_wait)

    def render(v):
        r = v.get("restore") or {}
        extra = f" in {r['vmm_restored_ms'] / 1000:.2f}s" if r.get("vmm_restored_ms") else ""
        say(f"{v['name']} {v['state']} {v['ip']} (from {snapshot}{extra})")

    emit(go, json_out=json_out, render=render)
