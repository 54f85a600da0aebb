from __future__ import annotations

import time
from typing import Annotated

import typer

from banger.cli.app import JsonOpt, emit, human_bytes, make_app, make_ctx, print_table, say

app = make_app("Build, list and remove VM templates.")


@app.command(help="Build (or reuse) the template for --image/--kernel/--vcpu/--memory: a snapshot of a freshly "
                  "booted, SSH-ready VM that warm-pool clones are restored from.")
def build(image: Annotated[str | None, typer.Option("--image", help="Image (default: config default_image).")] = None,
          kernel: Annotated[str | None, typer.Option("--kernel", help="Kernel (default: the image's).")] = None,
          vcpu: Annotated[int | None, typer.Option("--vcpu", help="vCPUs.")] = None,
          memory: Annotated[str | None, typer.Option("--memory", help="Memory, e.g. 1G.")] = None,
          backend: Annotated[str | None, typer.Option("--backend", help="auto | qemu | firecracker.")] = None,
          rebuild: Annotated[bool, typer.Option("--rebuild", help="Build anew even if a whole one exists.")] = False,
          json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger.cli.vm import parse_mib
        from banger.templates import service as templates

        spec = templates.resolve_spec(ctx, image=image, kernel=kernel, backend=backend, vcpu=vcpu,
                                      memory_mib=parse_mib(memory, "--memory"))
        return templates.ensure(ctx, spec, rebuild=rebuild)

    def render(t):
        how = f"built in {t['build_ms'] / 1000:.1f}s" if t["built"] else "reused"
        say(f"template {t['id']} of {t['image']} ({t['backend']}, {t['vcpu']} vCPU, {t['memory_mib']} MiB): {how}")

    emit(go, json_out=json_out, render=render)


@app.command("list", help="List templates (stale: its image, kernel, backend or guest init changed since).")
def list_(json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger.templates import service as templates

        return templates.list_templates(ctx)

    def render(rows):
        print_table(["id", "image", "kernel", "backend", "vcpu", "mem", "size", "clones", "state", "age"],
                    [[t["id"], t["image"], t["kernel"], t["backend"], t["vcpu"], f"{t['memory_mib']}M",
                      human_bytes(t["size_bytes"] or 0), t["pooled_clones"],
                      "DAMAGED" if t["damaged"] else ("STALE" if t["stale"] else "ok"),
                      f"{(time.time() - t['created_at']) / 60:.0f}m"] for t in rows])

    emit(go, json_out=json_out, render=render)


@app.command(help="Remove templates by id (a key prefix) or snapshot name; --stale removes every stale or "
                  "damaged one.")
def rm(refs: Annotated[list[str] | None, typer.Argument(metavar="TEMPLATE...", help="Template ids.")] = None,
       stale: Annotated[bool, typer.Option("--stale", help="Remove all stale or damaged templates.")] = False,
       json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger.errors import UsageError
        from banger.templates import service as templates

        if not refs and not stale:
            raise UsageError("name the templates to remove, or pass --stale", "see: banger template list")
        out = [templates.remove(ctx, r) for r in refs or []]
        return out + (templates.remove_stale(ctx) if stale else [])

    emit(go, json_out=json_out, render=lambda d: [say(f"removed template {x['id']}") for x in d])
