"""Templates: a snapshot of a freshly booted, SSH-ready VM, keyed by what went into it.

The key is a hash of its parts (``key_parts``): the image's content id (fingerprints of its rootfs and
work seed, and the client key the seed carries), the kernel's content id (the sha256 of its vmlinux /
bzImage / initrd from its manifest), the backend and its binary, vCPUs, memory, disk sizes, and the
version of banger's guest init (a hash of banger/data/guest/* and the initramfs init).  Change any of
them and the key changes: a template whose parts no longer hash to the key of its spec is stale, and
a clone is claimed only by a create whose current key equals the clone's (banger.vmpool), so a stale
template is never used.  A template whose files are missing or incomplete is damaged: never used,
rebuilt by the next ``ensure``.

Building (``ensure``) is single-flight per key under ``template/<key>``: one process builds, the
others wait and reuse its result.  The build is a plan edited from the boot plan (``build_plan``):
a builder VM boots cold (QEMU: its RAM in a memfd, see banger.vmm.qemu.driver), waits
for SSH, checks that banger-init answers the clone control line (banger.guest.control), is captured
paused (QEMU: device state + a copy of its shared RAM; Firecracker: vm.state + vm.mem) and discarded.  The
snapshot is published as a snapshot of kind ``template`` plus a ``templates`` row.

Lock order (ARCHITECTURE.md): vmpool -> template -> vm -> snapshot -> image/kernel -> pool -> hostnet.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path

from banger.errors import BangerError, NotFound, UsageError

KIND = "template"
FORMAT = 1                   # bump when what a template holds changes shape
READY_TIMEOUT_S = 30.0       # banger-init's answer to the readiness line
_GUEST_INIT: str | None = None


# ---------------------------------------------------------------- the key
def guest_init_version() -> str:
    """Hash of the guest-side code a template's memory holds: banger-init & co, and the initramfs init."""
    global _GUEST_INIT
    if _GUEST_INIT is None:
        from importlib import resources

        h = hashlib.sha256()
        data = resources.files("banger.data")
        for p in sorted(data.joinpath("guest").iterdir(), key=lambda x: x.name):
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
        h.update(b"initramfs-init.sh\0" + data.joinpath("initramfs-init.sh").read_bytes())
        _GUEST_INIT = h.hexdigest()[:16]
    return _GUEST_INIT


def _fp(path) -> list | None:
    try:
        st = os.stat(path)
    except (OSError, TypeError):
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _vmm_binary(ctx, backend: str) -> str | None:
    b = ctx.cfg.qemu_bin if backend == "qemu" else ctx.cfg.firecracker_bin
    return b if os.path.sep in b else shutil.which(b)


def key_parts(ctx, img: dict, ker: dict, backend: str, *, vcpu: int, memory_mib: int, overlay_size_mib: int,
              work_disk_size_mib: int) -> dict:
    files = (ker.get("manifest") or {}).get("files") or {}
    parts = {
        "format": FORMAT,
        "image": {"name": img["name"], "rootfs": _fp(img.get("rootfs")), "work_seed": _fp(img.get("work_seed")),
                  "client_key": img.get("key_fingerprint")},
        "kernel": {"name": ker["name"], "version": ker.get("version"),
                   "files": {k: (files.get(k) or {}).get("sha256") for k in ("vmlinux", "bzImage", "initrd.img")
                             if k in files}},
        "backend": backend, "vmm": _fp(_vmm_binary(ctx, backend)),
        "vcpu": vcpu, "memory_mib": memory_mib, "overlay_size_mib": overlay_size_mib,
        "work_disk_size_mib": work_disk_size_mib,
        "dns": ctx.cfg.extra.get("dns"),
        "guest_init": guest_init_version(),
    }
    if backend == "qemu":
        from banger.host.hostinfo import qemu_accel

        parts["accel"] = qemu_accel()
    return parts


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class Spec:
    """What a template (and each clone of it) is made of, resolved: image and kernel dicts, backend,
    sizes, and the key."""

    __slots__ = ("img", "ker", "backend", "vcpu", "memory_mib", "overlay_size_mib", "work_disk_size_mib",
                 "parts", "key")

    def __init__(self, ctx, img: dict, ker: dict, backend: str, *, vcpu: int, memory_mib: int,
                 overlay_size_mib: int, work_disk_size_mib: int):
        self.img, self.ker, self.backend = img, ker, backend
        self.vcpu, self.memory_mib = vcpu, memory_mib
        self.overlay_size_mib, self.work_disk_size_mib = overlay_size_mib, work_disk_size_mib
        self.parts = key_parts(ctx, img, ker, backend, vcpu=vcpu, memory_mib=memory_mib,
                               overlay_size_mib=overlay_size_mib, work_disk_size_mib=work_disk_size_mib)
        self.key = key_of(self.parts)

    def describe(self) -> dict:
        return {"image": self.img["name"], "kernel": self.ker["name"], "backend": self.backend, "vcpu": self.vcpu,
                "memory_mib": self.memory_mib, "overlay_size_mib": self.overlay_size_mib,
                "work_disk_size_mib": self.work_disk_size_mib}


def default_work_size(ctx, img: dict) -> int:
    seed = img.get("work_seed")
    seed_mib = -(-os.path.getsize(seed) // (1 << 20)) if seed and os.path.exists(seed) else 0
    return max(ctx.cfg.work_disk_size_mib, seed_mib)


def resolve_spec(ctx, *, image: str | None = None, kernel: str | None = None, backend: str | None = None,
                 vcpu: int | None = None, memory_mib: int | None = None) -> Spec:
    """The spec `template build` / `pool warm` mean (the defaults `vm create` would use); auto-pulls."""
    from banger.vms import lifecycle

    vcpu = vcpu or ctx.cfg.vcpu
    memory_mib = memory_mib or ctx.cfg.memory_mib
    if vcpu < 1 or memory_mib < 128:
        raise UsageError(f"--vcpu {vcpu} / --memory {memory_mib} MiB: vcpu must be >= 1, memory >= 128 MiB",
                         "e.g. --vcpu 1 --memory 1024")
    img, ker, be = lifecycle.resolve(ctx, image=image, kernel=kernel, backend=backend)
    return Spec(ctx, img, ker, be, vcpu=vcpu, memory_mib=memory_mib, overlay_size_mib=ctx.cfg.overlay_size_mib,
                work_disk_size_mib=default_work_size(ctx, img))


# ---------------------------------------------------------------- rows
def _row(ctx, key: str):
    from banger.state.records import TemplateRecord

    return TemplateRecord.from_row(ctx.store.one("SELECT * FROM templates WHERE key = ?", (key,)))


def _rows(ctx) -> list:
    from banger.state.records import TemplateRecord

    return [TemplateRecord.from_row(r) for r in ctx.store.query("SELECT * FROM templates ORDER BY created_at")]


def snapshot_name(key: str) -> str:
    return f"tpl-{key[:16]}"


def damage(ctx, t) -> str | None:
    """Why template ``t`` cannot be used (None: it is whole)."""
    from banger.snapshots import service as snapshots

    snap = snapshots._row(ctx, t["snapshot"])
    if snap is None:
        return "its snapshot row is gone"
    sdir = Path(snap["dir"])
    meta = snap["meta"]
    if not (sdir / snapshots.META).is_file():
        return f"{sdir} has no meta.json"
    vmm = meta.get("vmm") or {}
    need = [*(meta.get("disks") or snapshots.DISKS), *((vmm.get("files") or {}).values())]
    for f in need:
        if not (sdir / f).is_file():
            return f"{sdir / f} is missing"
    mem = vmm.get("memory_file")
    if mem and (sdir / mem).stat().st_size != t["memory_mib"] << 20:
        return f"{sdir / mem} is not {t['memory_mib']} MiB"
    o = meta.get("options") or {}
    for k in ("rootfs", "initrd"):
        if not o.get(k) or not os.path.exists(o[k]):
            return f"the {k} it was built from is gone ({o.get(k)})"
    return None


def usable(ctx, key: str):
    """The template row for ``key`` if it is whole, else None."""
    t = _row(ctx, key)
    if t is None or damage(ctx, t) is not None:
        return None
    return t


def snapshot_of(ctx, t) -> dict:
    from banger.snapshots import service as snapshots

    return snapshots.get(ctx, t["snapshot"])


def current_key(ctx, t) -> str | None:
    """The key template ``t``'s spec hashes to now (None: its image or kernel is gone)."""
    from banger.images import service as images
    from banger.kernels import service as kernels

    img = images.get(ctx, t["image"])
    try:
        ker = kernels.resolve(ctx, t["kernel"], auto_pull=False)
    except BangerError:
        return None
    if img is None:
        return None
    return key_of(key_parts(ctx, img, ker, t["backend"], vcpu=t["vcpu"], memory_mib=t["memory_mib"],
                            overlay_size_mib=t["overlay_size_mib"], work_disk_size_mib=t["work_disk_size_mib"]))


def view(ctx, t, *, stale: bool | None = None) -> dict:
    from banger.snapshots import service as snapshots

    snap = snapshots._row(ctx, t["snapshot"])
    clones = ctx.store.one("SELECT count(*) AS c FROM vms WHERE state = 'pooled' AND pool_key = ?",
                           (t["key"],))["c"]
    d = {"id": t["key"][:12], "key": t["key"], "snapshot": t["snapshot"], "image": t["image"], "kernel": t["kernel"],
         "backend": t["backend"], "vcpu": t["vcpu"], "memory_mib": t["memory_mib"],
         "overlay_size_mib": t["overlay_size_mib"], "work_disk_size_mib": t["work_disk_size_mib"],
         "created_at": t["created_at"], "build_ms": t["build_ms"],
         "size_bytes": (snap or {}).get("meta", {}).get("size_bytes"), "dir": (snap or {}).get("dir"),
         "pooled_clones": clones, "damaged": damage(ctx, t), "guest_init": (t["parts"] or {}).get("guest_init")}
    d["stale"] = (current_key(ctx, t) != t["key"]) if stale is None else stale
    return d


def list_templates(ctx) -> list[dict]:
    return [view(ctx, t) for t in _rows(ctx)]


def find(ctx, ref: str):
    """A template by key prefix (4+ hex digits) or by its snapshot name."""
    rows = [t for t in _rows(ctx) if t["snapshot"] == ref or (len(ref) >= 4 and t["key"].startswith(ref))]
    if not rows:
        raise NotFound(f"no template {ref!r}", "list them with: banger template list")
    if len(rows) > 1:
        from banger.errors import Conflict

        raise Conflict(f"{ref!r} matches {len(rows)} templates", "give more of the key")
    return rows[0]


# ---------------------------------------------------------------- build
def ensure(ctx, spec: Spec, *, wait_ssh: bool = True, rebuild: bool = False) -> dict:
    """The whole template for ``spec``: reused when there is one, else built (single-flight: concurrent
    callers wait for the one building and reuse its result). Returns its view plus ``built``."""
    if not rebuild:
        t = usable(ctx, spec.key)
        if t is not None:
            return {**view(ctx, t, stale=False), "built": False}
    t0 = time.monotonic()
    with ctx.locks.hold(f"template/{spec.key}", purpose="template build"):
        if not rebuild:
            t = usable(ctx, spec.key)
            if t is not None:  # another process built it while we waited
                return {**view(ctx, t, stale=False), "built": False,
                        "waited_ms": round((time.monotonic() - t0) * 1000, 1)}
        _drop(ctx, spec.key)  # damaged leftovers (or a forced rebuild)
        t = _build(ctx, spec, wait_ssh=wait_ssh)
    return {**view(ctx, t, stale=False), "built": True}


def _ready(run):
    """The guest answers the clone control line (an image built by an older banger would not), and no
    SSH session of ours is in the memory we capture."""
    from banger.errors import GuestTimeout
    from banger.guest import control
    from banger.vms import runtime as rt

    if run.transport is not None:
        run.transport.close()
        run.transport = None
    serial = rt.vm_dir(run.ctx, run.vm) / rt.SERIAL
    nonce = control.new_nonce()
    offset = control.log_size(serial)
    rt.vm_driver(run.ctx, run.vm).send_console(
        run.handles, control.set_line(nonce, clock=time.time(), rng=os.urandom(control.RNG_BYTES)))
    try:
        run.ready = control.wait_answer(serial, nonce, offset=offset, deadline=time.monotonic() + READY_TIMEOUT_S,
                                        alive=lambda: _alive(run))
    except GuestTimeout:
        raise GuestTimeout(f"image {run.image['name']!r}: banger-init did not answer the clone control line "
                           f"within {READY_TIMEOUT_S:g}s", "the image predates this banger's guest init: rebuild "
                           f"it (banger image delete {run.image['name']}, then build or pull it again)") from None
    from banger.templates.clone import prepare_standby

    run.standby = prepare_standby(run.ctx, run.vm, run.handles)  # each clone takes its own key without an sshd start


def _alive(run):
    from banger.errors import ExternalError
    from banger.vms import runtime as rt

    if not rt.vmm_alive(run.ctx, run.vm, run.handles):
        raise ExternalError(f"the template's builder VM died:\n{rt.serial_tail(run.ctx, run.vm)}",
                            "see the serial console above")


def _capture(run):
    from banger.snapshots import service as snapshots
    from banger.state.staging import new_dir

    run.staging = new_dir(run.ctx.cfg, f"template-{run.key[:12]}")
    run.meta = snapshots.capture(run.ctx, run.vm, run.handles, run.staging, resume=False, final=True)


def _uncapture(run):
    if getattr(run, "staging", None) is not None:
        shutil.rmtree(run.staging, ignore_errors=True)


def build_plan(*, wait_ssh: bool = True):
    """boot plan -> SSH -> guest.ready -> template.capture (QEMU: device state + the RAM, the booted VM's
    RAM being shared memory; Firecracker: vm.state + vm.mem)."""
    from banger.vms import plans
    from banger.vms.plan import Step

    plan = plans.boot_plan("template", wait_ssh=wait_ssh)
    return plan.insert_after(plan.names()[-1], Step("guest.ready", _ready, None, "checking the guest's init"),
                             Step("template.capture", _capture, _uncapture, "capturing the template"))


def _build(ctx, spec: Spec, *, wait_ssh: bool):
    from banger.host import procs
    from banger.names import Subnet
    from banger.snapshots import service as snapshots
    from banger.state.reservation import reserve_vm
    from banger.vms import plan
    from banger.vms import runtime as rt

    t0 = time.monotonic()
    img, ker = spec.img, spec.ker
    ctx.progress.step(f"building a template of {img['name']} ({spec.backend}, {spec.vcpu} vCPU, "
                      f"{spec.memory_mib} MiB)")
    options = {"rootfs": str(img["rootfs"]), "work_seed": bool(img.get("work_seed")), "init": img.get("init"),
               "vmlinux": str(ker["vmlinux"]) if ker.get("vmlinux") else None,
               "bzimage": str(ker["bzimage"]) if ker.get("bzimage") else None, "initrd": str(ker["initrd"]),
               "kernel_version": ker.get("version"), "role": "template",
               "creator": {"pid": os.getpid(), "start": procs.start_time(os.getpid())}}
    vm = reserve_vm(ctx.store, Subnet(ctx.cfg.subnet), name=f"tpl-{spec.key[:8]}-{secrets.token_hex(2)}",
                    image=img["name"], kernel=ker["name"], backend=spec.backend, vcpu=spec.vcpu,
                    memory_mib=spec.memory_mib, overlay_size_mib=spec.overlay_size_mib,
                    work_disk_size_mib=spec.work_disk_size_mib, nat=False, options=options, check_refs=True)
    name = snapshot_name(spec.key)
    try:
        with ctx.locks.hold(f"vm/{vm['id']}", purpose="template build"):
            run = plan.execute(ctx, vm, build_plan(wait_ssh=wait_ssh), success_state=None, delete_on_unwind=True,
                               image=img, work_size_mib=spec.work_disk_size_mib, use_seed=True,
                               overlay_size_mib=spec.overlay_size_mib, key=spec.key)
            try:
                meta = run.meta
                meta["template"] = {"key": spec.key, "ready": run.ready}
                with ctx.locks.hold(f"snapshot/{name}", purpose="template publish"):
                    if snapshots._row(ctx, name) is not None or (ctx.cfg.snapshots_dir / name).exists():
                        _drop_snapshot(ctx, name)
                    snapshots.publish(ctx, name, run.staging, meta, vm=vm, kind=KIND)
                    build_ms = round((time.monotonic() - t0) * 1000, 1)
                    ctx.store.execute(
                        "INSERT OR REPLACE INTO templates (key, snapshot, image, kernel, backend, vcpu, memory_mib, "
                        "overlay_size_mib, work_disk_size_mib, parts, build_ms, created_at) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        (spec.key, name, img["name"], ker["name"], spec.backend, spec.vcpu, spec.memory_mib,
                         spec.overlay_size_mib, spec.work_disk_size_mib, json.dumps(spec.parts, sort_keys=True),
                         build_ms, time.time()))
            finally:
                shutil.rmtree(run.staging, ignore_errors=True)  # gone already when published
    finally:
        cur = ctx.store.vm_by_id(vm["id"])
        if cur is not None:  # the builder is never kept: the template is its snapshot
            with ctx.locks.hold(f"vm/{vm['id']}", purpose="template builder clean-up"):
                rt.destroy_vm(ctx, cur)
    return _row(ctx, spec.key)


# ---------------------------------------------------------------- remove
def _drop_snapshot(ctx, name: str) -> None:
    """Remove snapshot ``name`` (caller holds snapshot/<name>): row, then its directory via a rename."""
    row = ctx.store.one("SELECT dir FROM snapshots WHERE name = ?", (name,))
    ctx.store.execute("DELETE FROM snapshots WHERE name = ?", (name,))
    d = Path(row["dir"]) if row else ctx.cfg.snapshots_dir / name
    trash = ctx.cfg.staging_dir / f"template-rm-{name}-{secrets.token_hex(3)}"
    ctx.cfg.staging_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(d, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _drop(ctx, key: str) -> None:
    """Remove template ``key``'s row and snapshot (caller holds template/<key>)."""
    name = snapshot_name(key)
    t = _row(ctx, key)
    with ctx.locks.hold(f"snapshot/{t['snapshot'] if t else name}", purpose="template rm"):
        ctx.store.execute("DELETE FROM templates WHERE key = ?", (key,))
        _drop_snapshot(ctx, t["snapshot"] if t else name)


def remove(ctx, ref: str) -> dict:
    """Remove one template (its pooled clones keep running: they hold what they need; they are still
    claimed while their key is current)."""
    t = find(ctx, ref)
    with ctx.locks.hold(f"template/{t['key']}", purpose="template rm"):
        _drop(ctx, t["key"])
    return {"id": t["key"][:12], "key": t["key"], "snapshot": t["snapshot"], "deleted": True}


def remove_stale(ctx) -> list[dict]:
    out = []
    for t in _rows(ctx):
        if current_key(ctx, t) != t["key"] or damage(ctx, t) is not None:
            with ctx.locks.hold(f"template/{t['key']}", purpose="template rm"):
                _drop(ctx, t["key"])
            out.append({"id": t["key"][:12], "key": t["key"], "snapshot": t["snapshot"], "deleted": True})
    return out
