from __future__ import annotations

import sys
from typing import Annotated

import typer

from banger.cli import vm_create
from banger.cli.app import JsonOpt, emit, make_app, make_ctx, print_table, say
from banger.cli.vm_create import (  # noqa: F401  (the flag parsers live there, typer-free; used here and by pool/template)
    _check_flags,
    _render_vm,
    _run_in_guest,
    parse_bytes,
    parse_mib,
    parse_vcpu,
)

app = make_app("Create, run, stop and manage microVMs.")

Ref = Annotated[str, typer.Argument(help="VM name or id (a unique id prefix works too).")]
Cmd = Annotated[list[str] | None, typer.Argument(help="Command to run in the guest (after --).")]
ImageOpt = Annotated[str | None, typer.Option("--image", help="Image name (default: config default_image).")]
KernelOpt = Annotated[str | None, typer.Option("--kernel", help="Kernel name (default: the image's kernel).")]
NameOpt = Annotated[str | None, typer.Option("--name", help="VM name (a DNS label); generated if absent.")]
VcpuOpt = Annotated[str | None, typer.Option("--vcpu", help="Virtual CPUs (1-64).")]
MemOpt = Annotated[str | None, typer.Option("--memory", help="Memory, e.g. 1024, 512M, 2G (MiB by default).")]
OverlayOpt = Annotated[str | None, typer.Option("--overlay-size", help="Copy-on-write root disk size, e.g. 4G.")]
WorkOpt = Annotated[str | None, typer.Option("--work-disk-size", help="/root disk size, e.g. 2G.")]
NatOpt = Annotated[bool, typer.Option("--nat", help="Give the guest outbound internet access (NAT).")]
BackendOpt = Annotated[str | None, typer.Option("--backend", help="auto | qemu | firecracker.")]
NoSeedOpt = Annotated[bool, typer.Option("--no-work-seed", help="Build /root from scratch (mkfs) instead of "
                                                                "cloning the image's work seed.")]
PublishOpt = Annotated[list[str] | None, typer.Option(
    "-p", "--publish", metavar="[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]",
    help="Publish a guest port on the host (repeatable), e.g. -p 8080:80 -p 5353:53/udp.")]
NetModeOpt = Annotated[str | None, typer.Option(
    "--net", metavar="nat|isolated|none",
    help="Network: nat (outbound through the host), isolated (host only; the default unless --nat or "
         "config nat = true), none (no network card).")]
AllowOpt = Annotated[list[str] | None, typer.Option(
    "--allow", metavar="CIDR[:PORT][/tcp|/udp]",
    help="Let the guest reach this destination (repeatable): outside the host for an isolated VM, "
         "or a host service, e.g. --allow 10.0.0.0/8 --allow 172.30.0.1:5432.")]
TtlOpt = Annotated[str | None, typer.Option(
    "--ttl", metavar="DURATION", help="Expire after this long (30m, 90s, 2h, 1d): banger gc deletes it.")]
ColdOpt = Annotated[bool, typer.Option("--cold", help="Boot a new VM even when the warm VM pool has a matching "
                                                      "clone (banger pool warm --vms N keeps some).")]


@app.command(help="Create a VM (and start it, waiting for SSH, unless --no-start).")
def create(image: ImageOpt = None, kernel: KernelOpt = None, name: NameOpt = None, vcpu: VcpuOpt = None,
           memory: MemOpt = None, overlay_size: OverlayOpt = None, work_disk_size: WorkOpt = None,
           nat: NatOpt = False, backend: BackendOpt = None, no_work_seed: NoSeedOpt = False,
           publish: PublishOpt = None, net: NetModeOpt = None, allow: AllowOpt = None, ttl: TtlOpt = None,
           cold: ColdOpt = False,
           no_start: Annotated[bool, typer.Option("--no-start", help="Only build the disks.")] = False,
           no_wait: Annotated[bool, typer.Option("--no-wait", help="Do not wait for SSH.")] = False,
           from_snapshot: Annotated[str | None, typer.Option(
               "--from-snapshot", help="Restore this snapshot instead of booting (same as vm restore).")] = None,
           json_out: JsonOpt = False):
    vm_create.create(**locals())


@app.command(help="Create + start + wait for SSH, then open a shell or run `-- CMD...` and exit with its status.")
def run(cmd: Cmd = None, image: ImageOpt = None, kernel: KernelOpt = None, name: NameOpt = None,
        vcpu: VcpuOpt = None, memory: MemOpt = None, overlay_size: OverlayOpt = None, work_disk_size: WorkOpt = None,
        nat: NatOpt = False, backend: BackendOpt = None, no_work_seed: NoSeedOpt = False,
        publish: PublishOpt = None, net: NetModeOpt = None, allow: AllowOpt = None, ttl: TtlOpt = None,
        cold: ColdOpt = False,
        rm: Annotated[bool, typer.Option("--rm", help="Delete the VM afterwards.")] = False,
        json_out: JsonOpt = False):
    vm_create.run(**locals())


@app.command(help="Start a stopped VM and wait for SSH.")
def start(vm: Ref, no_wait: Annotated[bool, typer.Option("--no-wait", help="Do not wait for SSH.")] = False,
          json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import lifecycle as vms

    emit(lambda: vms.start(ctx, vm, wait_ssh=not no_wait), json_out=json_out,
         render=lambda v: say(f"{v['name']} {v['state']} {v['ip']}"))


@app.command(help="Stop a VM: ask the guest to power off, force it after the stop timeout.")
def stop(vm: Ref, force: Annotated[bool, typer.Option("-f", "--force", help="Kill at once.")] = False,
         timeout: Annotated[str | None, typer.Option("--timeout", help="Seconds before forcing "
                                                     "(default: config stop_timeout_s).")] = None,
         json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import lifecycle as vms

    def go():
        from banger import validate

        t = None if timeout is None else validate.number(timeout, "--timeout", "stop_timeout_s")
        return vms.stop(ctx, vm, force=force, timeout=t)

    emit(go, json_out=json_out,
         render=lambda v: say(f"{v['name']} {v['state']}" + (f" ({v['error']})" if v.get("error") else "")))


@app.command(help="Stop then start a VM.")
def restart(vm: Ref, json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import lifecycle as vms

    emit(lambda: vms.restart(ctx, vm), json_out=json_out, render=lambda v: say(f"{v['name']} {v['state']}"))


@app.command(help="Delete a VM and its disks (-f to delete a running one).")
def delete(vms_: Annotated[list[str], typer.Argument(metavar="VM...", help="VM names or ids.")],
           force: Annotated[bool, typer.Option("-f", "--force", help="Kill it if running.")] = False,
           json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import lifecycle as vms

    emit(lambda: [vms.delete(ctx, r, force=force) for r in vms_], json_out=json_out,
         render=lambda d: [say(f"deleted {x['name']}") for x in d])


@app.command(help="Delete all stopped, crashed and failed VMs.")
def prune(force: Annotated[bool, typer.Option("-f", "--force", help="Do not ask.")] = False,
          json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import lifecycle as vms

    def go():
        cands = vms.prunable(ctx)
        if not cands:
            return []
        if not force:
            if json_out or not sys.stdin.isatty():
                from banger.errors import UsageError

                raise UsageError(f"{len(cands)} VMs would be deleted; refusing without a terminal",
                                 "pass -f to confirm")
            names = ", ".join(v["name"] for v in cands)
            if not typer.confirm(f"Delete {len(cands)} VMs ({names})?"):
                return []
        return vms.prune(ctx)

    emit(go, json_out=json_out, render=lambda d: say(f"deleted {len(d)} VMs"))


@app.command("set", help="Change vCPUs, memory, the work disk size (grow only), --net or --allow of a stopped "
                         "VM (from its next start); --ttl (from now) also on a running one.")
def set_(vm: Ref, vcpu: VcpuOpt = None, memory: MemOpt = None, work_disk_size: WorkOpt = None,
         net: NetModeOpt = None,
         allow: Annotated[list[str] | None, typer.Option(
             "--allow", metavar="CIDR[:PORT][/tcp|/udp]", help="Replace the --allow list (repeatable).")] = None,
         no_allow: Annotated[bool, typer.Option("--no-allow", help="Empty the --allow list.")] = False,
         ttl: Annotated[str | None, typer.Option(
             "--ttl", metavar="DURATION", help="Expire this long from now (extends or shortens), e.g. 2h.")] = None,
         no_ttl: Annotated[bool, typer.Option("--no-ttl", help="Never expire.")] = False,
         json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import lifecycle as vms

    emit(lambda: vms.set_resources(ctx, vm, vcpu=parse_vcpu(vcpu), memory_mib=parse_mib(memory, "--memory"),
                                   work_disk_size_mib=parse_mib(work_disk_size, "--work-disk-size"),
                                   net=net, allow=allow, clear_allow=no_allow, ttl=ttl, clear_ttl=no_ttl),
         json_out=json_out, render=_render_vm)


@app.command("list", help="List VMs.")
def list_(quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only ids.")] = False,
          all_: Annotated[bool, typer.Option("-a", "--all", help="Also warm-pool clones and template builders.")]
          = False,
          json_out: JsonOpt = False):
    from banger.cli.vm_list import run

    run(quiet=quiet, json_out=json_out, all_=all_)


@app.command(help="Show one VM, with each create/start step's duration.")
def show(vm: Ref, json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import lifecycle as vms

    emit(lambda: vms.show(ctx, vm), json_out=json_out, render=_render_vm)


@app.command(help="Print the VM's serial console (-f to follow). On a terminal (and in --json) the control "
                  "and escape sequences the guest printed are removed; --raw gives the bytes as they are.")
def logs(vm: Ref, follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new output.")] = False,
         raw: Annotated[bool, typer.Option("--raw", help="Print the guest's bytes unfiltered, even on a terminal "
                                                         "(it can then drive your terminal).")] = False,
         json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import access, runtime

    def go():
        from banger.guest import console

        path = access.serial_log(ctx, vm)
        if json_out:
            data = console.read_all(path)
            return {"path": str(path), "log": data.decode(errors="replace") if raw else console.sanitize(data)}
        out = sys.stdout.buffer

        def write(b: bytes) -> None:
            out.write(b)
            out.flush()

        clean = console.Sanitizer() if not raw and sys.stdout.isatty() else None
        if not follow:
            data = console.read_all(path)
            write((clean.feed(data) + clean.flush()).encode() if clean else data)
            return None
        console.follow(path, write, sanitizer=clean,
                       keep_going=lambda: runtime.effective_state(ctx, runtime.get(ctx, vm)) == runtime.RUNNING)
        return None

    emit(go, json_out=json_out)


@app.command(help="Open a shell in the VM, or run `-- CMD...` with a terminal.")
def ssh(vm: Ref, cmd: Cmd = None, json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import access

    def go():
        from banger.guest import ssh as sshmod

        t = access.connect(ctx, vm)
        try:
            if json_out:
                return _run_in_guest(t, cmd, True)
            return {"exit_status": sshmod.interactive_shell(t, cmd or None)}
        finally:
            t.close()

    emit(go, json_out=json_out, exit_code=lambda d: d["exit_status"])


@app.command("exec", help="Run `-- CMD...` in the VM and exit with its status.")
def exec_(vm: Ref, cmd: Annotated[list[str], typer.Argument(help="Command (after --).")], json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import access

    def go():
        t = access.connect(ctx, vm)
        try:
            return _run_in_guest(t, cmd, json_out)
        finally:
            t.close()

    emit(go, json_out=json_out, exit_code=lambda d: d["exit_status"])


@app.command(help="Copy files or directories (recursively) between host and VM: `cp SRC VM:DST` or `cp VM:SRC DST`.")
def cp(src: Annotated[str, typer.Argument(help="Source (local path or VM:path).")],
       dst: Annotated[str, typer.Argument(help="Destination (local path or VM:path).")],
       max_size: Annotated[str | None, typer.Option(
           "--max-size", help="From a guest: stop (keeping nothing) after this much file content, e.g. 500M, 2G "
                              "(default: the destination's free space minus a margin).")] = None,
       json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import access

    def go():
        max_bytes = parse_bytes(max_size, "--max-size")
        kw = {} if max_bytes is None else {"max_bytes": max_bytes}  # access.copy() -> sftpcopy.get()
        return access.copy(ctx, src, dst, **kw)

    emit(go, json_out=json_out, render=lambda d: say(f"copied {d['files']} files"))


@app.command("ssh-config", help="Print an OpenSSH config stanza for this VM (for IDEs and plain ssh).")
def ssh_config(vm: Ref, json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import access

    emit(lambda: access.ssh_config(ctx, vm), json_out=json_out, render=lambda s: sys.stdout.write(s))


@app.command(help="Create a new running VM from a snapshot (it publishes no ports unless -p is given).")
def restore(snapshot: Annotated[str, typer.Argument(help="Snapshot name.")], name: NameOpt = None,
            no_wait: Annotated[bool, typer.Option("--no-wait", help="Do not wait for SSH.")] = False,
            publish: PublishOpt = None, json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger.snapshots import service as snapshots

        _check_flags(name, None)
        return snapshots.restore(ctx, snapshot, name=name, wait_ssh=not no_wait, publish=publish)

    emit(go, json_out=json_out, render=lambda v: say(f"{v.get('name')} {v.get('state')} {v.get('ip')}"))


@app.command(help="Snapshot a running VM and start N clones of it at once, each with its own name, address, "
                  "host key, machine-id, entropy and clock; the source keeps running.")
def fork(vm: Ref, count: Annotated[int, typer.Option("--count", "-n", help="How many clones.", min=1)] = 1,
         name: Annotated[str | None, typer.Option("--name", help="Name prefix: clones are PREFIX-1..N "
                                                  "(default SOURCE-fork-<random>).")] = None,
         no_wait: Annotated[bool, typer.Option("--no-wait", help="Do not wait for SSH.")] = False,
         json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger.templates import fork as svc

        return svc.fork(ctx, vm, count=count, prefix=name, wait_ssh=not no_wait)

    def render(d):
        for c in d["clones"]:
            say(f"{c['name']} {c['state']} {c['ip']}")
        say(f"forked {d['source']} x{len(d['clones'])} in {d['timings']['total_ms'] / 1000:.2f}s "
            f"(memory: {d['memory']})")

    emit(go, json_out=json_out, render=render)


@app.command(help="Turn a stopped VM into a new image (its root changes and /root become the image).")
def promote(vm: Ref, image_name: Annotated[str, typer.Argument(metavar="IMAGE", help="New image name.")],
            json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger.images.sources import promote as svc

        return svc.promote(ctx, vm, image_name)

    emit(go, json_out=json_out, render=lambda d: say(f"image {d.get('name')} published"))


# ---------------------------------------------------------------- vm port add|rm|list
port_app = make_app("Publish guest ports on the host: [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp].")
app.add_typer(port_app, name="port", help="Publish guest ports on the host (add, rm, list).")


def _render_ports(rows: list[dict]) -> None:
    if not rows:
        say("no published ports")
        return
    print_table(["VM", "HOST", "GUEST", "PROTO", "LIVE"],
                [[r.get("vm_name") or r.get("vm_id"), f"{r['host_ip'] or '*'}:{r['host_port']}", r["guest_port"],
                  r["proto"], {True: "yes", False: "no", None: "?"}[r.get("active")]] for r in rows])


@port_app.command("add", help="Publish guest ports (live at once on a running VM, else from its next start).")
def port_add(vm: Ref, specs: Annotated[list[str], typer.Argument(
        metavar="[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]...", help="e.g. 8080:80 127.0.0.1:5432:5432 5353:53/udp")],
        json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import lifecycle as vms

    emit(lambda: vms.port_add(ctx, vm, specs), json_out=json_out, render=lambda d: _render_ports(d["ports"]))


@port_app.command("rm", help="Stop publishing host ports (HOSTPORT removes both protocols, HOSTPORT/udp one).")
def port_rm(vm: Ref, refs: Annotated[list[str], typer.Argument(
        metavar="HOSTPORT[/tcp|/udp]...", help="Host ports (or full specs) to remove.")], json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import lifecycle as vms

    emit(lambda: vms.port_rm(ctx, vm, refs), json_out=json_out, render=lambda d: _render_ports(d["ports"]))


@port_app.command("list", help="List a VM's published ports and whether their rules are live.")
def port_list(vm: Ref, json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import lifecycle as vms

    emit(lambda: vms.port_list(ctx, vm), json_out=json_out, render=_render_ports)
