"""`vm create` and `vm run`: the bodies shared by the typer commands (banger/cli/vm.py, which define
every option) and the typer-free fast path (banger/cli/fast.py: the option table in fastspec.py is
generated from those typer commands), plus the flag parsers the other vm commands use too.
Typer-free: importing typer costs more than the rest of a `vm create` on the host."""

from __future__ import annotations

import io
import sys
import time

from banger.cli.output import emit, make_ctx, print_kv, print_table, say


def parse_mib(value: str | None, flag: str) -> int | None:
    """'1024' / '512M' / '2G' / '1.5G' -> MiB, through banger/validate.py (limits per field)."""
    if value is None:
        return None
    from banger import validate

    key = {"--memory": "memory_mib", "--overlay-size": "overlay_size_mib",
           "--work-disk-size": "work_disk_size_mib"}[flag]
    return validate.size_mib(value, flag, key)


def parse_vcpu(value: str | None) -> int | None:
    if value is None:
        return None
    from banger import validate

    return validate.integer(value, "--vcpu", "vcpu")


def _check_flags(name: str | None, backend: str | None) -> None:
    from banger import validate

    if name is not None:
        validate.name(name, "--name")
    if backend is not None:
        from banger.vmm.registry import choices

        validate.choice(backend, "--backend", choices())


def parse_bytes(value: str | None, flag: str) -> int | None:
    """'1048576' (bytes) / '512K' / '100M' / '2G' / '1.5T' (binary units) -> bytes."""
    from banger.errors import UsageError

    if value is None:
        return None
    v = value.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if v and v[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(v[-1]) + 1)
        v = v[:-1]
    try:
        n = float(v) * mult
    except ValueError:
        raise UsageError(f"{flag} {value!r} is not a size", f"e.g. {flag} 500M or {flag} 2G") from None
    if not 0 <= n < 2 ** 63 or n != int(n):
        raise UsageError(f"{flag} {value!r} must be a whole number of bytes, zero or more", f"e.g. {flag} 2G")
    return int(n)


def _render_vm(v: dict) -> None:
    keys = ["name", "id", "state", "image", "kernel", "backend", "vcpu", "memory_mib", "ip", "mac", "net",
            "work_disk_size_mib", "overlay_size_mib", "pid", "tap", "dir", "error"]
    kv = {k: v.get(k) for k in keys if v.get(k) is not None}
    if v.get("allow"):
        kv["allow"] = ", ".join(v["allow"])
    if v.get("ports"):
        kv["ports"] = ", ".join(p["spec"] + ("" if p.get("active") in (True, None) else " (not live)")
                                for p in v["ports"])
    if v.get("expires_at"):
        kv["expires"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["expires_at"])) + f" ({v['ttl']})"
    print_kv(kv, title=v["name"])
    if v.get("made"):
        print_kv({k: x for k, x in v["made"].items() if x is not None}, title="made")
    if v.get("timings"):
        print_kv(v["timings"], title="timings")
    if v.get("stages"):
        print_table(["op", "stage", "ms", "ok", "error"],
                    [[s["op"], s["stage"], s["duration_ms"], {True: "ok", False: "FAIL", None: ""}[s["ok"]],
                      (s["error"] or "")[:80]] for s in v["stages"]], title="stages")


def _pool_claim():
    """The warm VM pool's claim, which `vm create` asks before it boots (the pool sits above the lifecycle)."""
    from banger.vmpool import service as vmpool

    return vmpool.claim_for_create


def _create_kwargs(image, kernel, name, vcpu, memory, overlay_size, work_disk_size, nat, backend, no_work_seed,
                   publish=None, net=None, allow=None, ttl=None, cold=False):
    _check_flags(name, backend)
    for flag, val in (("--image", image), ("--kernel", kernel)):
        if val is not None:
            from banger import validate

            validate.text(val, flag, max_len=128)
    return dict(image=image, kernel=kernel, name=name, vcpu=parse_vcpu(vcpu), memory_mib=parse_mib(memory, "--memory"),
                overlay_size_mib=parse_mib(overlay_size, "--overlay-size"),
                work_disk_size_mib=parse_mib(work_disk_size, "--work-disk-size"), nat=nat or None,
                backend=backend, work_seed=not no_work_seed, publish=publish, net=net, allow=allow, ttl=ttl,
                cold=cold)


def create(image=None, kernel=None, name=None, vcpu=None, memory=None, overlay_size=None, work_disk_size=None,
           nat=False, backend=None, no_work_seed=False, publish=None, net=None, allow=None, ttl=None,
           cold=False, no_start=False, no_wait=False, from_snapshot=None, json_out=False):
    ctx = make_ctx(json_out)

    def go():
        from banger.vms import lifecycle as vms

        if from_snapshot:
            given = [f for f, v in (("--image", image), ("--kernel", kernel), ("--vcpu", vcpu), ("--memory", memory),
                                    ("--overlay-size", overlay_size), ("--work-disk-size", work_disk_size),
                                    ("--backend", backend), ("--no-work-seed", no_work_seed),
                                    ("--no-start", no_start), ("--nat", nat), ("--net", net), ("--allow", allow),
                                    ("--ttl", ttl), ("--cold", cold)) if v]
            if given:
                from banger.errors import UsageError

                raise UsageError(f"{', '.join(given)} cannot be combined with --from-snapshot",
                                 "a restored VM keeps the snapshot's image, kernel, size, backend and network; "
                                 "only --name, -p and --no-wait apply")
            from banger.snapshots import service as snapshots

            _check_flags(name, None)
            return snapshots.restore(ctx, from_snapshot, name=name, wait_ssh=not no_wait, publish=publish)
        kw = _create_kwargs(image, kernel, name, vcpu, memory, overlay_size, work_disk_size, nat, backend,
                            no_work_seed, publish, net, allow, ttl, cold)
        return vms.create(ctx, start=not no_start, wait_ssh=not no_wait, claim=_pool_claim(), **kw)

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


def run(cmd=None, image=None, kernel=None, name=None, vcpu=None, memory=None, overlay_size=None,
        work_disk_size=None, nat=False, backend=None, no_work_seed=False, publish=None, net=None,
        allow=None, ttl=None, cold=False, rm=False, json_out=False):
    ctx = make_ctx(json_out)

    def go():
        from banger.vms import lifecycle as vms

        if net == "none":
            from banger.errors import UsageError

            raise UsageError("vm run needs SSH, and --net none gives the VM no network card",
                             "use vm create --net none, or --net isolated")
        kw = _create_kwargs(image, kernel, name, vcpu, memory, overlay_size, work_disk_size, nat, backend,
                            no_work_seed, publish, net, allow, ttl, cold)
        made: dict = {}  # filled as soon as the row exists: --rm holds on every exit path from then on
        t = None
        try:
            v, t = vms.create(ctx, keep_ssh=True, remove=rm, reserved=made, claim=_pool_claim(), **kw)
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
