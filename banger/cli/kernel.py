"""banger kernel: pull, import, list, show, rm guest kernels."""

from __future__ import annotations

from typing import Annotated

import typer

from banger.cli.app import JsonOpt, emit, make_app, make_ctx, print_kv, print_table, say
from banger.cli.app import human_bytes as _human

app = make_app("Pull, import and manage guest kernels.")


def _summary(d: dict) -> dict:
    """The result without the bulky per-file manifest (show prints it in full)."""
    out = {k: v for k, v in d.items() if k != "manifest"}
    m = d.get("manifest") or {}
    if m:
        out["modules"] = m.get("modules", [])
        out["pvh_entry"] = m.get("pvh_entry")
        out["initrd_generated"] = (m.get("initrd") or {}).get("generated")
        out["timings"] = m.get("timings")
    return out


def _src(s) -> str:
    if not isinstance(s, dict):
        return str(s or "")
    t = s.get("type")
    if t == "apt":
        return f"apt:{s.get('resolved') or s.get('package')}" + (f"={s['version']}" if s.get("version") else "")
    if t == "url":
        return f"url:{s.get('url')}"
    if t == "import":
        return f"import:{s.get('path')}"
    return str(s)


@app.command("pull", help="Pull a kernel from the catalog (see `banger kernel list --all`).")
def pull_cmd(
    name: Annotated[str | None, typer.Argument(help="Catalog name (default: the configured default kernel).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Pull again even if it is already there.")] = False,
    sha256: Annotated[str | None, typer.Option("--sha256", help="Expected sha256 for URL kernels with no pinned digest.")] = None,
    json_out: JsonOpt = False,
):
    from banger.kernels import service as svc

    ctx = make_ctx(json_out)

    def render(d):
        verb = "pulled" if d.get("downloaded") else "already present:"
        say(f"{verb} kernel [bold]{d['name']}[/] ({d['version']}) in {d['dir']}")

    def go():
        from banger import validate

        if name is not None:
            validate.text(name, "NAME", max_len=63)
        digest = None if sha256 is None else validate.sha256_hex(sha256, "--sha256")
        return _summary(svc.pull(ctx, name or ctx.cfg.default_kernel, force=force, sha256=digest))

    emit(go, json_out=json_out, render=render)


@app.command("import", help="Import a local kernel (bzImage or ELF vmlinux); banger generates the initramfs.")
def import_cmd(
    kernel_path: Annotated[str, typer.Argument(help="A bzImage (vmlinuz) or an uncompressed ELF vmlinux.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name to store it under.")],
    initrd: Annotated[str | None, typer.Option("--initrd", help="Use this initramfs instead of generating one.")] = None,
    modules: Annotated[str | None, typer.Option("--modules", help="Module tree: lib/modules/<release> or a root holding it.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing kernel of that name.")] = False,
    json_out: JsonOpt = False,
):
    from banger.kernels import service as svc

    ctx = make_ctx(json_out)
    def go():
        from banger import validate

        validate.text(name, "--name", max_len=63)
        for flag, val in (("KERNEL_PATH", kernel_path), ("--initrd", initrd), ("--modules", modules)):
            if val is not None:
                validate.text(val, flag)
        return _summary(svc.import_kernel(ctx, name, kernel_path, initrd=initrd, modules=modules, force=force))

    emit(go, json_out=json_out,
         render=lambda d: say(f"imported kernel [bold]{d['name']}[/] ({d['version']}) in {d['dir']}"))


@app.command("list", help="List pulled kernels (--all adds catalog entries not pulled yet).")
def list_cmd(
    all_: Annotated[bool, typer.Option("--all", "-a", help="Include the catalog.")] = False,
    json_out: JsonOpt = False,
):
    from banger.kernels import service as svc

    ctx = make_ctx(json_out)

    def go():
        rows = svc.list_kernels(ctx)
        if not all_:
            return rows
        pulled = {r["name"] for r in rows}
        return rows + [{"name": e["name"], "pulled": False, "source": e["source"], "description": e["description"]}
                       for e in svc.available(ctx) if e["name"] not in pulled]

    def render(rows):
        if not rows:
            say("no kernels pulled; `banger kernel pull` fetches the default one")
            return
        print_table(["NAME", "VERSION", "SOURCE", "SIZE", "USED BY"],
                    [[r["name"], r.get("version") or "(not pulled)", _src(r.get("source")),
                      _human(r.get("size_bytes")) if "size_bytes" in r else "",
                      ", ".join((r.get("used_by") or {}).get("vms", []) + (r.get("used_by") or {}).get("images", []))]
                     for r in rows])

    emit(go, json_out=json_out, render=render)


@app.command("show", help="Show one kernel: files, version, source, modules, users.")
def show_cmd(
    name: Annotated[str, typer.Argument(help="Kernel name.")],
    json_out: JsonOpt = False,
):
    from banger.kernels import service as svc

    ctx = make_ctx(json_out)

    def render(d):
        if not d.get("pulled"):
            print_kv({"name": d["name"], "pulled": "no", "source": _src(d["catalog"]["source"]),
                      "hint": d.get("hint", "")})
            return
        m = d.get("manifest") or {}
        print_kv({"name": d["name"], "version": d["version"], "source": _src(d.get("source")), "dir": d["dir"],
                  "vmlinux": d["vmlinux"], "bzImage": d.get("bzimage") or "-", "initrd": d["initrd"],
                  "modules": " ".join(m.get("modules", [])) or "-",
                  "pvh entry": hex(m["pvh_entry"]) if m.get("pvh_entry") is not None else "none",
                  "size": _human(d.get("size_bytes")),
                  "used by": ", ".join(d["used_by"]["vms"] + d["used_by"]["images"]) or "-"})

    emit(lambda: svc.show(ctx, name), json_out=json_out, render=render)


@app.command("rm", help="Remove a kernel (refused while a VM or image uses it).")
def rm_cmd(
    name: Annotated[str, typer.Argument(help="Kernel name.")],
    json_out: JsonOpt = False,
):
    from banger.kernels import service as svc

    ctx = make_ctx(json_out)
    emit(lambda: svc.remove(ctx, name), json_out=json_out, render=lambda d: say(f"removed kernel {d['name']}"))
