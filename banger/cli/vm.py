from __future__ import annotations

import io
import sys
import time
from typing import Annotated

import typer

from banger.cli.app import JsonOpt, emit, make_app, make_ctx, print_kv, print_table, say

app = make_app("Create, run, stop and manage microVMs.")

Ref = Annotated[str, typer.Argument(help="VM name or id (a unique id prefix works too).")]
Cmd = Annotated[list[str] | None, typer.Argument(help="Command to run in the guest (after --).")]
ImageOpt = Annotated[str | None, typer.Option("--image", help="Image name (default: config default_image).")]
KernelOpt = Annotated[str | None, typer.Option("--kernel", help="Kernel name (default: the image's kernel).")]
NameOpt = Annotated[str | None, typer.Option("--name", help="VM name (a DNS label); generated if absent.")]
VcpuOpt = Annotated[int | None, typer.Option("--vcpu", help="Virtual CPUs.")]
MemOpt = Annotated[str | None, typer.Option("--memory", help="Memory, e.g. 1024, 512M, 2G (MiB by default).")]
OverlayOpt = Annotated[str | None, typer.Option("--overlay-size", help="Copy-on-write root disk size, e.g. 4G.")]
WorkOpt = Annotated[str | None, typer.Option("--work-disk-size", help="/root disk size, e.g. 2G.")]
NatOpt = Annotated[bool, typer.Option("--nat", help="Give the guest outbound internet access (NAT).")]
BackendOpt = Annotated[str | None, typer.Option("--backend", help="auto | qemu | firecracker.")]
NoSeedOpt = Annotated[bool, typer.Option("--no-work-seed", help="Build /root from scratch (mkfs) instead of "
                                                                "cloning the image's work seed.")]


def parse_mib(value: str | None, flag: str) -> int | None:
    """'1024' / '512M' / '2G' / '1.5G' -> MiB."""
    from banger.errors import UsageError

    if value is None:
        return None
    v = value.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if v and v[-1] in "MGT":
        mult = {"M": 1, "G": 1024, "T": 1024 * 1024}[v[-1]]
        v = v[:-1]
    try:
        n = float(v) * mult
    except ValueError:
        raise UsageError(f"{flag} {value!r} is not a size", f"e.g. {flag} 1024 or {flag} 2G") from None
    if n <= 0 or n != int(n):
        raise UsageError(f"{flag} {value!r} must be a positive whole number of MiB", f"e.g. {flag} 2G")
    return int(n)


def _render_vm(v: dict) -> None:
    keys = ["name", "id", "state", "image", "kernel", "backend", "vcpu", "memory_mib", "ip", "mac", "nat",
            "work_disk_size_mib", "overlay_size_mib", "pid", "tap", "dir", "error"]
    print_kv({k: v.get(k) for k in keys if v.get(k) is not None}, title=v["name"])
    if v.get("timings"):
        print_kv(v["timings"], title="timings")
    if v.get("stages"):
        print_table(["op", "stage", "ms", "ok", "error"],
                    [[s["op"], s["stage"], s["duration_ms"], {True: "ok", False: "FAIL", None: ""}[s["ok"]],
                      (s["error"] or "")[:80]] for s in v["stages"]], title="stages")


def _create_kwargs(image, kernel, name, vcpu, memory, overlay_size, work_disk_size, nat, backend, no_work_seed):
    return dict(image=image, kernel=kernel, name=name, vcpu=vcpu, memory_mib=parse_mib(memory, "--memory"),
                overlay_size_mib=parse_mib(overlay_size, "--overlay-size"),
                work_disk_size_mib=parse_mib(work_disk_size, "--work-disk-size"), nat=nat or None,
                backend=backend, work_seed=not no_work_seed)


@app.command(help="Create a VM (and start it, waiting for SSH, unless --no-start).")
def create(image: ImageOpt = None, kernel: KernelOpt = None, name: NameOpt = None, vcpu: VcpuOpt = None,
           memory: MemOpt = None, overlay_size: OverlayOpt = None, work_disk_size: WorkOpt = None,
           nat: NatOpt = False, backend: BackendOpt = None, no_work_seed: NoSeedOpt = False,
           no_start: Annotated[bool, typer.Option("--no-start", help="Only build the disks.")] = False,
           no_wait: Annotated[bool, typer.Option("--no-wait", help="Do not wait for SSH.")] = False,
           from_snapshot: Annotated[str | None, typer.Option(
               "--from-snapshot", help="Restore this snapshot instead of booting (same as vm restore).")] = None,
           json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger.vms import lifecycle as vms

        if from_snapshot:
            given = [f for f, v in (("--image", image), ("--kernel", kernel), ("--vcpu", vcpu), ("--memory", memory),
                                    ("--overlay-size", overlay_size), ("--work-disk-size", work_disk_size),
                                    ("--backend", backend), ("--no-work-seed", no_work_seed),
                                    ("--no-start", no_start), ("--nat", nat)) if v]
            if given:
                from banger.errors import UsageError

                raise UsageError(f"{', '.join(given)} cannot be combined with --from-snapshot",
                                 "a restored VM keeps the snapshot's image, kernel, size and backend; "
                                 "only --name and --no-wait apply")
            from banger.snapshots import service as snapshots

            return snapshots.restore(ctx, from_snapshot, name=name, wait_ssh=not no_wait)
        kw = _create_kwargs(image, kernel, name, vcpu, memory, overlay_size, work_disk_size, nat, backend,
                            no_work_seed)
        return vms.create(ctx, start=not no_start, wait_ssh=not no_wait, **kw)

    emit(go, json_out=json_out, render=lambda v: say(f"{v['name']} {v['state']} {v['ip']}"
                                                       f" (ssh ready in {v['timings'].get('ssh_ready_s', '-')}s)"
                                                       if v.get("timings") else f"{v['name']} {v['state']}"))


def _run_in_guest(t, cmd: list[str] | None, json_out: bool) -> dict:
    from banger.guest import ssh

    if json_out:
        out, err = io.BytesIO(), io.BytesIO()
        status = ssh.exec_command(t, cmd or ["true"], stdout=out, stderr=err,
                                  stdin=None if sys.stdin.isatty() else sys.stdin)
        return {"exit_status": status, "stdout": out.getvalue().decode(errors="replace"),
                "stderr": err.getvalue().decode(errors="replace")}
    if cmd:
        return {"exit_status": ssh.exec_command(t, cmd, stdin=None if sys.stdin.isatty() else sys.stdin)}
    return {"exit_status": ssh.interactive_shell(t)}


@app.command(help="Create + start + wait for SSH, then open a shell or run `-- CMD...` and exit with its status.")
def run(cmd: Cmd = None, image: ImageOpt = None, kernel: KernelOpt = None, name: NameOpt = None,
        vcpu: VcpuOpt = None, memory: MemOpt = None, overlay_size: OverlayOpt = None, work_disk_size: WorkOpt = None,
        nat: NatOpt = False, backend: BackendOpt = None, no_work_seed: NoSeedOpt = False,
        rm: Annotated[bool, typer.Option("--rm", help="Delete the VM afterwards.")] = False,
        json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger.vms import lifecycle as vms

        kw = _create_kwargs(image, kernel, name, vcpu, memory, overlay_size, work_disk_size, nat, backend,
                            no_work_seed)
        made: dict = {}  # filled as soon as the row exists: --rm holds on every exit path from then on
        t = None
        try:
            v, t = vms.create(ctx, keep_ssh=True, remove=rm, reserved=made, **kw)
            res = _run_in_guest(t, cmd, json_out)
        finally:
            if t is not None:
                t.close()
            if rm and made:
                _remove(ctx, made["id"])
        return {"vm": v, "deleted": rm, **res}

    emit(go, json_out=json_out, exit_code=lambda d: d["exit_status"])


def _remove(ctx, vm_id: str) -> None:
    """`vm run --rm`'s clean-up: delete the VM whatever happened (shielded: a second Ctrl-C or a SIGTERM
    cannot stop it half way); a create that failed already removed it itself."""
    from banger.errors import NotFound
    from banger.interrupts import shielded
    from banger.vms import lifecycle as vms

    with shielded():
        try:
            vms.delete(ctx, vm_id, force=True)
        except NotFound:
            pass


@app.command(help="Start a stopped VM and wait for SSH.")
def start(vm: Ref, no_wait: Annotated[bool, typer.Option("--no-wait", help="Do not wait for SSH.")] = False,
          json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import lifecycle as vms

    emit(lambda: vms.start(ctx, vm, wait_ssh=not no_wait), json_out=json_out,
         render=lambda v: say(f"{v['name']} {v['state']} {v['ip']}"))


@app.command(help="Stop a VM: ask the guest to power off, force it after the stop timeout.")
def stop(vm: Ref, force: Annotated[bool, typer.Option("-f", "--force", help="Kill at once.")] = False,
         timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds before forcing "
                                                       "(default: config stop_timeout_s).")] = None,
         json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import lifecycle as vms

    emit(lambda: vms.stop(ctx, vm, force=force, timeout=timeout), json_out=json_out,
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


@app.command("set", help="Change vCPUs, memory or the work disk size (grow only) of a stopped VM.")
def set_(vm: Ref, vcpu: VcpuOpt = None, memory: MemOpt = None, work_disk_size: WorkOpt = None,
        json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import lifecycle as vms

    emit(lambda: vms.set_resources(ctx, vm, vcpu=vcpu, memory_mib=parse_mib(memory, "--memory"),
                                   work_disk_size_mib=parse_mib(work_disk_size, "--work-disk-size")),
         json_out=json_out, render=_render_vm)


@app.command("list", help="List VMs.")
def list_(quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only ids.")] = False,
          json_out: JsonOpt = False):
    from banger.cli.vm_list import run

    run(quiet=quiet, json_out=json_out)


@app.command(help="Show one VM, with each create/start step's duration.")
def show(vm: Ref, json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import lifecycle as vms

    emit(lambda: vms.show(ctx, vm), json_out=json_out, render=_render_vm)


@app.command(help="Print the VM's serial console (-f to follow).")
def logs(vm: Ref, follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new output.")] = False,
         json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import access, runtime
    from banger.vms import lifecycle as vms

    def go():
        path = access.serial_log(ctx, vm)
        if json_out:
            return {"path": str(path), "log": path.read_text(errors="replace") if path.exists() else ""}
        out = sys.stdout.buffer
        pos = 0
        while True:
            if path.exists():
                with open(path, "rb") as f:
                    f.seek(pos)
                    data = f.read()
                    pos = f.tell()
                out.write(data)
                out.flush()
            if not follow or runtime.effective_state(ctx, runtime.get(ctx, vm)) != vms.RUNNING:
                if follow and path.exists() and path.stat().st_size > pos:
                    continue
                return None
            time.sleep(0.2)

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
       dst: Annotated[str, typer.Argument(help="Destination (local path or VM:path).")], json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import access

    emit(lambda: access.copy(ctx, src, dst), json_out=json_out, render=lambda d: say(f"copied {d['files']} files"))


@app.command("ssh-config", help="Print an OpenSSH config stanza for this VM (for IDEs and plain ssh).")
def ssh_config(vm: Ref, json_out: JsonOpt = False):
    ctx = make_ctx(json_out)
    from banger.vms import access

    emit(lambda: access.ssh_config(ctx, vm), json_out=json_out, render=lambda s: sys.stdout.write(s))


@app.command(help="Create a new running VM from a snapshot.")
def restore(snapshot: Annotated[str, typer.Argument(help="Snapshot name.")], name: NameOpt = None,
            no_wait: Annotated[bool, typer.Option("--no-wait", help="Do not wait for SSH.")] = False,
            json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger.snapshots import service as snapshots

        return snapshots.restore(ctx, snapshot, name=name, wait_ssh=not no_wait)

    emit(go, json_out=json_out, render=lambda v: say(f"{v.get('name')} {v.get('state')} {v.get('ip')}"))


@app.command(help="Turn a stopped VM into a new image (its root changes and /root become the image).")
def promote(vm: Ref, image_name: Annotated[str, typer.Argument(metavar="IMAGE", help="New image name.")],
            json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger.images.sources import promote as svc

        return svc.promote(ctx, vm, image_name)

    emit(go, json_out=json_out, render=lambda d: say(f"image {d.get('name')} published"))
