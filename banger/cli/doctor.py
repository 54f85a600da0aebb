from __future__ import annotations

from typing import Annotated

import typer

from banger.cli.app import JsonOpt, emit, make_ctx

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command(help="Check the host: KVM kind, VMM backends, tools, devices, disk. Each problem has a fix hint.")
def doctor(
    fix: Annotated[bool, typer.Option("--fix", help="apt-get install the missing Debian packages (root) and make "
                                                    "banger's files private (0600/0700).")] = False,
    json_out: JsonOpt = False,
):
    from banger.doctor import service as svc

    ctx = make_ctx(json_out, tighten=False)  # doctor reports a home left open; --fix tightens it

    def go():
        checks = svc.run_checks(ctx.cfg)
        installed, tightened = [], []
        if fix:
            tightened = svc.fix_modes(ctx.cfg)
            installed = svc.fix(checks, ctx.progress)
            if installed or tightened:
                checks = svc.run_checks(ctx.cfg)
        from banger.host.hostinfo import qemu_accel
        from banger.vmm import registry

        backend = registry.choose(ctx.cfg.backend, ctx.cfg)
        return {"checks": [c.to_dict() for c in checks], "installed": installed, "tightened": tightened,
                "backend": backend,
                "accel": qemu_accel() if backend == "qemu" else "kvm",
                "ok": all(c.status != "fail" for c in checks)}

    def render(d):
        from rich.console import Console
        from rich.markup import escape

        con = Console(highlight=False)
        style = {"ok": "green", "warn": "yellow", "fail": "red"}
        for c in d["checks"]:
            con.print(f"[{style[c['status']]}]{c['status']:>4}[/]  {c['name']:<20} {escape(c['detail'])}")
            if c["hint"] and c["status"] != "ok":
                con.print(f"      {'':<20} [dim]fix: {escape(c['hint'])}[/]")
        con.print(f"\nbackend: [bold]{d['backend']}[/] ({d['accel']})")
        if d["installed"]:
            con.print(f"installed: {' '.join(d['installed'])}")
        if d["tightened"]:
            con.print(f"made private: {len(d['tightened'])} paths")

    emit(go, json_out=json_out, render=render, exit_code=lambda d: 0 if d["ok"] else 6)
