"""`banger vm fork SRC --count N`: snapshot a running VM and start N clones of it at once.

1. Under the source's ``vm/<id>``: make sure its banger-init keeps a standby sshd waiting for a new host
   key (``clone.prepare_standby``: each clone then takes its own key without starting an sshd; a source
   keeps its standby for later forks), reserve the N rows (from the source's row:
   ``snapshots.vm_meta``) and start ``fork_plan`` (banger.templates.clone) for each clone in its own
   thread (each with its own Ctx: its own SQLite connection), under each clone's ``vm/<id>``: the plans
   make the clones' directories and TAPs while
2. the source is paused, its snapshot written and its disks copied into a private staging dir, and it
   is resumed (banger.snapshots.service.capture): the source keeps running.  ``fork.captured`` lets the
   plans go on to copy the disks.
3. The guest's RAM goes to a file on a tmpfs that every clone maps privately (copy-on-write).  QEMU: a
   booted source's RAM is a memfd, copied (sparse) while it is paused, beside a device-only state; a
   restored source's is a private mapping, so its full stream is loaded once by a loader QEMU into the
   file and the state rewritten device-only (``make_shareable``, in the main thread while the clone
   plans copy disks).  Firecracker writes its memory file there; its File backend maps it privately
   (``BANGER_UFFD=0``); with UFFD each clone's handler copies pages into the clone's own memory.
4. The clones restore (``fork.wait`` lets them past once 3 is done), take their own identity and
   answer SSH.  The staging dir and RAM file are removed at the end: a running clone keeps the pages
   it mapped, and nothing else needs them.

A clone that fails is unwound by its own plan (nothing of it is left); the others stay, and the fork
reports which failed.
"""

from __future__ import annotations

import secrets
import shutil
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from banger.errors import BangerError, ExternalError, InvalidState, UsageError
from banger.vms import runtime as rt

MAX_FORK = 32


def memory_sharing(backend: str, mem_backend: str | None) -> str:
    if backend == "qemu":
        return "shared copy-on-write (one RAM file on tmpfs, mapped privately by every clone)"
    if mem_backend == "File":
        return "shared copy-on-write (Firecracker File backend: the memory file mapped privately)"
    return "not shared (Firecracker UFFD: each clone's handler copies pages into its own memory)"


def _names(ctx, src, prefix: str | None, count: int) -> list[str]:
    from banger.names import validate_name

    prefix = prefix or f"{src['name'][:40].rstrip('-')}-fork-{secrets.token_hex(2)}"
    names = [f"{prefix}-{i}" for i in range(1, count + 1)]
    for n in names:
        validate_name(n)
        if ctx.store.vm_by_name(n) is not None:
            raise rt.name_taken(n)
    return names


def _loader_spec(ctx, src, staging: Path, fork_id: str):
    from banger.vmm.base import Drive

    spec = rt.vm_spec(ctx, src, None)
    spec.run_dir = ctx.cfg.vm_run_dir(fork_id)  # under $BANGER_RUN/vms: gc reaps a loader whose fork died
    spec.vm_dir = staging
    spec.serial_log = staging / "loader-serial.log"
    spec.drives = [Drive("rootfs", spec.drives[0].path, True), Drive("overlay", staging / rt.OVERLAY),
                   Drive("work", staging / rt.WORK)]
    return spec


def _clone(cfg, vm_id: str, staging: Path, meta: dict, captured: threading.Event, ready: threading.Event,
           shared: dict, wait_ssh: bool, results: dict) -> None:
    from banger.context import Ctx
    from banger.templates import clone
    from banger.vms import lifecycle, plan

    ctx = Ctx(cfg)
    try:
        vm = ctx.store.vm_by_id(vm_id)
        with ctx.locks.hold(f"vm/{vm_id}", purpose="fork"):
            run = plan.execute(ctx, vm, clone.fork_plan(wait_ssh=wait_ssh), delete_on_unwind=True,
                               sdir=staging, meta=meta, snap_lock=ExitStack(), timings={}, t0=time.monotonic(),
                               snapshot_captured=captured, snapshot_ready=ready, shared=shared)
        if run.transport is not None:
            run.transport.close()
        results[vm_id] = {"view": lifecycle.view(ctx, ctx.store.vm_by_id(vm_id), stages=True),
                          "ms": round((time.monotonic() - shared["t0"]) * 1000, 1)}
    except BaseException as e:  # noqa: BLE001 - reported per clone
        results[vm_id] = {"error": e.message if isinstance(e, BangerError) else f"{type(e).__name__}: {e}"}
    finally:
        ctx.close()


def _failed(shared: dict, e: BaseException) -> None:
    shared["error"] = e.message if isinstance(e, BangerError) else f"{type(e).__name__}: {e}"


def fork(ctx, src_ref: str, *, count: int = 1, prefix: str | None = None, wait_ssh: bool = True) -> dict:
    from banger.snapshots import service as snapshots
    from banger.state.staging import new_dir
    from banger.templates import clone, ram

    if not 1 <= count <= MAX_FORK:
        raise UsageError(f"--count {count} is out of range", f"fork 1 to {MAX_FORK} clones at once")
    src = rt.get(ctx, src_ref)
    names = _names(ctx, src, prefix, count)
    t0 = time.monotonic()
    timings: dict = {}
    staging = new_dir(ctx.cfg, "fork")
    fork_id = staging.name.rsplit("-", 1)[1] + secrets.token_hex(2)
    ram_path = None
    shared = {"error": None, "t0": t0}
    captured = threading.Event()  # fork.captured: the snapshot's files are written (or shared['error'] says why not)
    gate = threading.Event()  # fork.wait: the snapshot's memory is ready (or shared['error'] says why not)
    threads: list[threading.Thread] = []
    results: dict = {}
    rows = []
    meta: dict = {}
    try:
        with ctx.locks.hold(f"vm/{src['id']}", purpose="fork"):
            src = rt.get(ctx, src["id"])
            h = rt.load_handles(ctx, src)
            st = rt.effective_state(ctx, src, h)
            if st != rt.RUNNING:
                raise InvalidState(f"VM {src['name']} is {st}; only a running VM can be forked",
                                   f"start it first: banger vm start {src['name']}")
            ts = time.monotonic()
            ctx.progress.step(f"preparing {src['name']}'s standby sshd")
            timings["standby"] = clone.prepare_standby(ctx, src, h)
            timings["standby_ms"] = round((time.monotonic() - ts) * 1000, 1)
            # the clones' rows, TAPs and directories are made while the source's snapshot is written (their
            # plans wait at fork.captured before copying its disks)
            meta.update(snapshots.vm_meta(src))
            made = {"how": "fork", "source": src["name"], "fork": fork_id}
            for n in names:
                rows.append(clone.reserve_clone(ctx, meta, backend=src["backend"], name=n, made=made))
            ctx.progress.step(f"starting {count} clone(s)")
            for vm in rows:
                t = threading.Thread(target=_clone, args=(ctx.cfg, vm["id"], staging, meta, captured, gate, shared,
                                                          wait_ssh, results), daemon=True)
                t.start()
                threads.append(t)
            ctx.progress.step(f"snapshotting {src['name']}")
            ram_path = ram.new_path(ctx.cfg, "fork")  # (a booted QEMU VM's RAM is copied here, on a tmpfs)
            try:
                meta.update(snapshots.capture(ctx, src, h, staging, memory_path=ram_path))
            except BaseException as e:
                _failed(shared, e)
                raise
            finally:
                captured.set()
        timings["snapshot_ms"] = round((time.monotonic() - t0) * 1000, 1)
        if meta["vmm"].get("snapshot_timings"):
            timings["snapshot_vmm_ms"] = meta["vmm"]["snapshot_timings"]  # paused, state written, RAM copied
        try:
            if src["backend"] == "qemu" and not meta["vmm"].get("memory_file"):  # a full stream (a restored VM)
                ts = time.monotonic()
                meta["vmm"] = rt.vm_driver(ctx, src).make_shareable(_loader_spec(ctx, src, staging, fork_id),
                                                                    staging, meta["vmm"], memory_path=ram_path)
                timings["shareable_ms"] = round((time.monotonic() - ts) * 1000, 1)
        except BaseException as e:
            _failed(shared, e)
            raise
        finally:
            gate.set()
            for t in threads:
                t.join()
    finally:
        captured.set()
        gate.set()
        for t in threads:
            t.join()
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(ctx.cfg.vm_run_dir(fork_id), ignore_errors=True)
        if ram_path is not None:
            ram_path.unlink(missing_ok=True)  # the clones keep the pages they mapped
    timings["total_ms"] = round((time.monotonic() - t0) * 1000, 1)
    clones, failed = [], []
    for vm in rows:
        r = results.get(vm["id"], {"error": "did not finish"})
        if "error" in r:
            failed.append({"name": vm["name"], "error": r["error"]})
        else:
            clones.append({**r["view"], "ready_ms": r["ms"]})
    mem_backend = None
    if clones:
        mem_backend = rt.load_handles(ctx, ctx.store.vm_by_id(clones[0]["id"])).get("mem_backend")
    out = {"source": src["name"], "clones": clones, "failed": failed, "timings": timings,
           "memory": memory_sharing(src["backend"], mem_backend)}
    if failed:
        raise ExternalError(f"fork of {src['name']}: {len(clones)} of {count} clone(s) up"
                            f"{' (' + ', '.join(c['name'] for c in clones) + ')' if clones else ''}; "
                            + "; ".join(f"{f['name']}: {f['error']}" for f in failed),
                            "the failed clones left nothing behind; the others are running", details=out)
    return out
