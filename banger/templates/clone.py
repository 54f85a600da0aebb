"""Clones: new VMs made from a snapshot's memory (a template's, or a running VM's for a fork), each
with an identity of its own.  The plans, all edited from the boot plan through the restore plan
(banger.snapshots.service.restore_plan):

* ``clone_plan``     = restore plan with ``guest.net`` replaced by ``guest.identity``: one console line
  gives the clone its address, hostname, SSH host key (pinned on the host first), machine-id, the
  host's clock and fresh entropy (RNDADDENTROPY + reseed), and banger waits for banger-init's answer;
* ``pool_fill_plan`` = clone plan + ``guest.release`` (close our SSH session) + ``vmm.pause``;
* ``claim_plan``     = the boot plan without the build steps and the TAP (a pooled clone holds them),
  with ``vmm.launch`` replaced by ``clone.check`` + ``vmm.resume`` + ``guest.identity`` (its new name,
  clock, entropy); a failed claim discards the clone (it cannot go back once resumed);
* ``fork_plan``      = clone plan without the snapshot row check, its disk copy moved after the TAP behind
  ``fork.captured`` (the clone's directory and TAP are made while the source's snapshot is written), and
  ``fork.wait`` before the restore (a restored source's memory may still be made shareable meanwhile).

A clone's host key and machine-id never come from its source: the disks copied from the snapshot
hold the source's, which the identity line replaces inside the guest (through the guest's own
filesystem, which stays consistent with the page cache in the copied memory; rewriting the disk
from the host under a mounted filesystem would not).
"""

from __future__ import annotations

import os
import time

from banger.guest import control
from banger.vms import runtime as rt
from banger.vms.plan import Step

IDENTITY_TIMEOUT_S = 30.0


def _serial(run):
    return rt.vm_dir(run.ctx, run.vm) / rt.SERIAL


def _alive(run):
    from banger.errors import ExternalError

    if not rt.vmm_alive(run.ctx, run.vm, run.handles):
        raise ExternalError(f"the clone's VMM exited:\n{rt.serial_tail(run.ctx, run.vm)}",
                            "see `banger vm logs` for the whole console")


def tell(run, line_for_nonce, what: str) -> dict:
    """Send one control line (built for a fresh nonce) and wait for banger-init's answer."""
    serial = _serial(run)
    nonce = control.new_nonce()
    offset = control.log_size(serial)
    rt.vm_driver(run.ctx, run.vm).send_console(run.handles, line_for_nonce(nonce))
    ans = control.wait_answer(serial, nonce, offset=offset, deadline=time.monotonic() + IDENTITY_TIMEOUT_S,
                              alive=lambda: _alive(run))
    run.answers = [*getattr(run, "answers", []), {"what": what, **ans}]
    # `vm show` says how the clone's entropy was renewed (reseeded: credited + CRNG reseeded; mixed: no perl)
    run.ctx.store.execute("UPDATE vms SET options = json_set(options, '$.made.rng', ?) WHERE id = ?",
                          (ans.get("rng"), run.vm["id"]))
    return ans


STANDBY_TIMEOUT_S = 30.0


def prepare_standby(ctx, vm, handles: dict) -> str:
    """Before a snapshot whose clones get keys of their own (a fork's source, a template's builder): ask
    banger-init for a standby sshd waiting for the next host key (banger.guest.control), so that each clone
    takes its key without starting an sshd. Returns "ready", "none" (no perl, no sshd, ...), "unsupported"
    (an image whose banger-init predates standbys) or "timeout"; the clones work either way (without a
    standby, sshd restarts)."""
    serial = rt.vm_dir(ctx, vm) / rt.SERIAL
    nonce = control.new_nonce()
    offset = control.log_size(serial)
    rt.vm_driver(ctx, vm).send_console(handles, control.set_line(nonce, standby=True))

    def alive():
        from banger.errors import ExternalError

        if not rt.vmm_alive(ctx, vm, handles):
            raise ExternalError(f"the VMM of {vm['name']} exited:\n{rt.serial_tail(ctx, vm)}",
                                "see `banger vm logs` for the whole console")

    from banger.errors import GuestTimeout

    try:
        ans = control.wait_answer(serial, nonce, offset=offset, deadline=time.monotonic() + STANDBY_TIMEOUT_S,
                                  alive=alive, ignored_ok=True)
    except GuestTimeout:
        return "timeout"  # a busy guest: its clones restart sshd for their keys, as without a standby
    return "unsupported" if ans.get("ignored") else ans.get("standby", "unsupported")


# ---------------------------------------------------------------- steps
def _identity(run):
    """Address, hostname, host key, machine-id, clock and entropy of a new clone."""
    import logging

    from banger.names import Subnet

    # the guest's standby sshd (or, without one, a restarted sshd) takes the new key: SSH attempts meanwhile
    # are refused and retried; paramiko's transport thread would print each refusal on stderr (Python's
    # last-resort log handler)
    logging.getLogger("paramiko").addHandler(logging.NullHandler())

    vm = run.vm
    ident = control.Identity.new(vm["name"])
    (rt.vm_dir(run.ctx, vm) / rt.KNOWN_HOSTS).write_text(f"{vm['ip']} {ident.pub_line}\n")  # pinned first
    sn = Subnet(run.ctx.cfg.subnet)
    net = (f"{vm['ip']}/{sn.prefixlen}", sn.gateway, vm["mac"])
    tell(run, lambda n: control.set_line(n, identity=ident, net=net, clock=time.time(),
                                          rng=os.urandom(control.RNG_BYTES)), "identity")


def _claim_identity(run):
    """A claimed clone's new name (kernel hostname and /etc/hostname), the host's clock, fresh entropy."""
    tell(run, lambda n: control.set_line(n, host=run.vm["name"], clock=time.time(),
                                          rng=os.urandom(control.RNG_BYTES)), "claim")


def _release_ssh(run):
    if run.transport is not None:
        run.transport.close()
        run.transport = None


def _pause(run):
    rt.vm_driver(run.ctx, run.vm).pause(run.handles)


def _check(run):
    """The claimed clone's VMM still lives and is paused (a dead one is discarded: the undo)."""
    from banger.errors import ExternalError

    run.handles = rt.load_handles(run.ctx, run.vm)
    if not rt.vmm_alive(run.ctx, run.vm, run.handles):
        raise ExternalError("the pooled clone's VMM is gone", "banger pool warm --vms N refills the pool")


def _resume(run):
    rt.vm_driver(run.ctx, run.vm).resume(run.handles)
    run.timings["resumed_ms"] = round((time.monotonic() - run.t0) * 1000, 1)


def discard(run):
    """Undo of a claim once it touched the clone: it cannot go back to the pool, so everything it holds
    goes (VMM, helpers, TAP, files); the row goes with delete_on_unwind."""
    rt.teardown_runtime(run.ctx, run.vm)
    import shutil

    shutil.rmtree(rt.vm_dir(run.ctx, run.vm), ignore_errors=True)


def _fork_captured(run):
    """Fork: the source's snapshot (disks, state, RAM) is written; until then the clone made its directory
    and TAP."""
    from banger.errors import ExternalError

    if not run.snapshot_captured.wait(600):
        raise ExternalError("the fork's snapshot was not written in time", "try again")
    if run.shared.get("error"):
        raise ExternalError(f"the fork's snapshot failed: {run.shared['error']}", "see the source VM's logs")


def _fork_wait(run):
    """Fork: the snapshot's memory may still be being made shareable (QEMU loader) while disks were copied."""
    from banger.errors import ExternalError

    if not run.snapshot_ready.wait(600):
        raise ExternalError("the fork's snapshot was not ready in time", "try again")
    if run.shared.get("error"):
        raise ExternalError(f"the fork's snapshot failed: {run.shared['error']}", "see the source VM's logs")


IDENTITY = Step("guest.identity", _identity, None, "giving the clone its own identity")


# ---------------------------------------------------------------- plans
def clone_plan(op: str, *, wait_ssh: bool = True):
    from banger.snapshots.service import restore_plan

    return restore_plan(wait_ssh=wait_ssh).renamed(op).replace("guest.net", IDENTITY)


def pool_fill_plan(*, wait_ssh: bool = True):
    plan = clone_plan("pool-fill", wait_ssh=wait_ssh)
    return plan.insert_after(plan.names()[-1], Step("guest.release", _release_ssh, None),
                             Step("vmm.pause", _pause, None, "pausing the clone"))


def claim_plan(*, wait_ssh: bool = True):
    from banger.vms import plans

    return (plans.boot_plan("claim", wait_ssh=wait_ssh)
            .without(*plans.BUILD_STEPS, "net.tap")
            .replace("vmm.launch", Step("clone.check", _check, discard),
                     Step("vmm.resume", _resume, discard, "resuming a pooled clone"),
                     Step("guest.identity", _claim_identity, None, "naming it")))


def fork_plan(*, wait_ssh: bool = True):
    plan = clone_plan("fork", wait_ssh=wait_ssh).without("snapshot.check")
    copy = plan.steps[plan.names().index("disk.copy")]
    return (plan.without("disk.copy")
            .insert_after("net.isolate", Step("fork.captured", _fork_captured, None), copy)
            .insert_before("vmm.restore", Step("fork.wait", _fork_wait, None)))


# ---------------------------------------------------------------- rows
def reserve_clone(ctx, meta: dict, *, backend: str, name: str | None, made: dict, role: str | None = None):
    """The row of a new clone of a snapshot with ``meta`` (state creating, this process its creator)."""
    from banger.host import procs
    from banger.names import Subnet
    from banger.state.reservation import reserve_vm

    o = dict(meta.get("options") or {})
    o["creator"] = {"pid": os.getpid(), "start": procs.start_time(os.getpid())}
    o["made"] = made
    if role:
        o["role"] = role
    return reserve_vm(ctx.store, Subnet(ctx.cfg.subnet), name=name, image=meta.get("image"),
                      kernel=meta.get("kernel"), backend=backend, vcpu=meta["vcpu"], memory_mib=meta["memory_mib"],
                      overlay_size_mib=meta["overlay_size_mib"], work_disk_size_mib=meta["work_disk_size_mib"],
                      nat=False, options=o)
