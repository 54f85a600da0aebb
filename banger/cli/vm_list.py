"""`banger vm list`: the body shared by the typer command and main.py's typer-free fast path
(the hot command of scripts and shell prompts; typer's import alone costs ~110 ms here)."""

from __future__ import annotations

import sys

from banger.cli.output import emit, make_ctx, print_table

# the only flags `vm list` has: the fast path takes these, anything else goes through typer
FLAGS = {"-q": "quiet", "--quiet": "quiet", "--json": "json_out", "-a": "all_", "--all": "all_"}


def run(*, quiet: bool = False, json_out: bool = False, all_: bool = False) -> None:
    ctx = make_ctx(json_out)
    from banger.vms import lifecycle as vms

    def render(rows):
        if quiet:
            for r in rows:
                sys.stdout.write(r["id"] + "\n")
            return
        print_table(["NAME", "ID", "STATE", "IMAGE", "BACKEND", "IP", "NET", "VCPU", "MEM", "TTL"],
                    [[r["name"], r["id"], r["state"], r["image"], r["backend"], r["ip"], r.get("net"), r["vcpu"],
                      f"{r['memory_mib']}M", r.get("ttl") or "-"] for r in rows])

    emit(lambda: vms.list_vms(ctx, all=all_) if not (quiet and json_out)
         else [v["id"] for v in vms.list_vms(ctx, all=all_)],
         json_out=json_out, render=render)
