from __future__ import annotations

from typing import Annotated

import typer

from banger.cli.app import JsonOpt, emit, make_ctx, say

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command(help="Remove what crashed or killed commands left behind (stuck rows, their processes, TAPs, network "
                  "rules, sockets, loop devices, staging dirs, partial downloads); resume guests left paused; delete "
                  "expired VMs (--ttl); refresh VM names.")
def gc(dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report what would be removed.")] = False,
       json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.gc import service as svc

    def render(r):
        verb = "would remove" if r["dry_run"] else "removed"
        labels = {"rows": "stuck VM", "processes": "stray process", "taps": "leaked TAP", "nat": "stale NAT rules of",
                  "sockets": "runtime dir", "loops": "loop device", "vm_dirs": "orphan VM dir",
                  "staging": "staging dir", "blobs": "partial download", "snapshots": "orphan snapshot dir",
                  "expired": "expired VM", "rules": "stale network rules"}
        for item in r.get("resumed", []):
            say(f"{'would resume' if r['dry_run'] else 'resumed'} paused guest: {item['name']}")
        for k, label in labels.items():
            for item in r.get(k, []):
                what = (item.get("name") or item.get("vm_id") or item.get("pid")) if isinstance(item, dict) else item
                say(f"{verb} {label}: {what}")
        for b in r.get("busy", []):
            say(f"skipped (in use): {b.get('lock') or b.get('name')}")
        for e in r["errors"]:
            say(f"[red]error:[/] {e}")
        if not r["total"]:
            say("nothing to clean up")

    emit(lambda: svc.collect(ctx, dry_run=dry_run), json_out=json_out, render=render,
         exit_code=lambda r: 1 if r["errors"] else 0)
