"""banger image: build, pull, register, promote, list, show, delete root filesystem images."""

from __future__ import annotations

from typing import Annotated

import typer

from banger.cli.app import JsonOpt, emit, make_app, make_ctx, print_kv, print_table, say
from banger.cli.app import human_bytes as _human

app = make_app("Build, pull, register and manage root filesystem images.")


def _summary(row: dict) -> dict:
    return {k: row.get(k) for k in ("name", "kind", "source", "digest", "kernel", "rootfs", "work_seed",
                                    "key_fingerprint", "size_bytes", "init", "has_sshd", "created_at", "meta")} | (
        {"existing": True} if row.get("existing") else {})


def _render_one(verb: str):
    def render(d):
        say(f"{verb} image [bold]{d['name']}[/] ({_human(d.get('size_bytes'))}, sshd: {'yes' if d.get('has_sshd') else 'no'})")
    return render


@app.command("build", help="Build an image with debootstrap (Debian minbase + openssh-server + tools).")
def build_cmd(
    name: Annotated[str, typer.Argument(help="Image name, e.g. debian-bookworm.")],
    suite: Annotated[str, typer.Option("--suite", help="Debian suite.")] = "bookworm",
    package: Annotated[list[str] | None, typer.Option("--package", "-p", help="Extra package (repeatable).")] = None,
    json_out: JsonOpt = False,
):
    from banger.images.sources import debootstrap as svc

    ctx = make_ctx(json_out)
    pkgs = None
    if package:
        pkgs = list(svc.DEFAULT_PACKAGES) + [p for p in package if p not in svc.DEFAULT_PACKAGES]
    emit(lambda: _summary(svc.build(ctx, name, suite=suite, packages=pkgs)), json_out=json_out,
         render=_render_one("built"))


@app.command("pull", help="Pull an OCI image (linux/amd64) from a registry and turn it into a banger image.")
def pull_cmd(
    ref: Annotated[str, typer.Argument(help="[REGISTRY/]REPO[:TAG][@sha256:DIGEST]")],
    name: Annotated[str | None, typer.Option("--name", "-n", help="Image name (default: from the reference).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plain http to the registry and its token service (automatic for 127.0.0.1/localhost).")] = False,
    json_out: JsonOpt = False,
):
    from banger.images.sources.oci import pull as svc

    ctx = make_ctx(json_out)

    def go():
        from banger import validate

        validate.text(ref, "REF", max_len=1024)
        if name is not None:
            validate.text(name, "--name", max_len=63)
        return _summary(svc.pull(ctx, ref, name, insecure=True if insecure else None))

    emit(go, json_out=json_out,
         render=_render_one("pulled"))


@app.command("register", help="Register an existing ext4 root filesystem image (it is copied).")
def register_cmd(
    name: Annotated[str, typer.Argument(help="Image name.")],
    rootfs: Annotated[str, typer.Argument(help="Path of an ext4 image file.")],
    kernel: Annotated[str | None, typer.Option("--kernel", help="Kernel to boot it with.")] = None,
    json_out: JsonOpt = False,
):
    from banger.images.sources import register as svc

    ctx = make_ctx(json_out)
    emit(lambda: _summary(svc.register(ctx, name, rootfs, kernel=kernel)), json_out=json_out,
         render=_render_one("registered"))


@app.command("promote", help="Turn a stopped VM's root filesystem into a new image.")
def promote_cmd(
    vm: Annotated[str, typer.Argument(help="VM name or id.")],
    name: Annotated[str, typer.Argument(help="New image name.")],
    json_out: JsonOpt = False,
):
    ctx = make_ctx(json_out)

    def go():
        from banger.images.sources import promote as svc

        return _summary(svc.promote(ctx, vm, name))

    emit(go, json_out=json_out, render=_render_one("promoted"))


@app.command("list", help="List images.")
def ls_cmd(json_out: JsonOpt = False):
    from banger.images import service as svc

    ctx = make_ctx(json_out)

    def render(rows):
        print_table(["NAME", "KIND", "SIZE", "SSHD", "KERNEL", "SOURCE"],
                    [[r["name"], r["kind"], _human(r["size_bytes"]), "yes" if r["has_sshd"] else "no",
                      r["kernel"], r["source"]] for r in rows])

    emit(lambda: [_summary(r) for r in svc.list_images(ctx)], json_out=json_out, render=render)


app.command("ls", help="List images (alias of list).", hidden=True)(ls_cmd)


@app.command("show", help="Show one image.")
def show_cmd(name: Annotated[str, typer.Argument(help="Image name.")], json_out: JsonOpt = False):
    from banger.images import service as svc

    ctx = make_ctx(json_out)

    def render(d):
        d = dict(d)
        meta = d.pop("meta", {})
        d["size_bytes"] = _human(d.get("size_bytes"))
        print_kv(d, title=d["name"])
        print_kv({k: v for k, v in meta.items() if k in ("os", "pull_id", "build_id", "layers", "config", "apply")})

    emit(lambda: _summary(svc.show(ctx, name)), json_out=json_out, render=render)


@app.command("delete", help="Delete an image (refused while a VM uses it).")
def rm_cmd(name: Annotated[str, typer.Argument(help="Image name.")], json_out: JsonOpt = False):
    from banger.images import service as svc

    ctx = make_ctx(json_out)
    emit(lambda: svc.delete(ctx, name), json_out=json_out, render=lambda d: say(f"deleted image {d['name']}"))


app.command("rm", help="Delete an image (alias of delete).", hidden=True)(rm_cmd)


@app.command("catalog", help="List the images banger can build or pull by name.")
def catalog_cmd(json_out: JsonOpt = False):
    from banger.images import service as svc

    ctx = make_ctx(json_out)

    def go():
        have = {r["name"] for r in svc.list_images(ctx)}
        return [{"name": n, "kind": e["kind"], "description": e.get("description", ""), "present": n in have,
                 "source": e.get("ref") or f"debootstrap:{e.get('suite')}"} for n, e in svc.catalog(ctx).items()]

    emit(go, json_out=json_out, render=lambda rows: print_table(
        ["NAME", "KIND", "PRESENT", "DESCRIPTION"],
        [[r["name"], r["kind"], "yes" if r["present"] else "no", r["description"]] for r in rows]))
