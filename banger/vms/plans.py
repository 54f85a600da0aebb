"""The steps a VM is built and booted from, and the plans made of them.

The base list is ``boot_plan``: prepare -> disk.work -> disk.overlay -> net.tap -> vmm.launch
-> guest.ssh.  ``create_plan`` is that list (minus the boot when ``--no-start``), ``start_plan``
drops the three build steps (``--net none`` drops net.tap and guest.ssh; ``-p`` puts net.ports
first), and a snapshot restore (banger.snapshots.restore) replaces the disk
steps with a copy, the launch with a restore, and inserts the re-address step.  Inputs a step needs
are keyword arguments of ``plan.execute`` (``image``, ``work_size_mib``, ``use_seed``, ...).
"""

from __future__ import annotations

from banger.vms import runtime as rt
from banger.vms.plan import Plan, Step


# ---------------------------------------------------------------- build
def _prepare(run):
    rt.vm_dir(run.ctx, run.vm).mkdir(parents=True, exist_ok=False)


def _unprepare(run):
    import shutil

    shutil.rmtree(rt.vm_dir(run.ctx, run.vm), ignore_errors=True)
    shutil.rmtree(rt.run_dir(run.ctx, run.vm), ignore_errors=True)


def _work_disk(run):
    from banger.vms.disks import make_work_disk

    run.work_method = make_work_disk(run.ctx, rt.vm_dir(run.ctx, run.vm) / rt.WORK, run.image,
                                     run.work_size_mib, run.use_seed)


def _unwork_disk(run):
    (rt.vm_dir(run.ctx, run.vm) / rt.WORK).unlink(missing_ok=True)


def _overlay_disk(run):
    from banger.vms.disks import make_overlay_disk

    make_overlay_disk(run.ctx, run.vm, run.overlay_size_mib)


def _unoverlay_disk(run):
    for f in (rt.OVERLAY, rt.KNOWN_HOSTS):
        (rt.vm_dir(run.ctx, run.vm) / f).unlink(missing_ok=True)


def _claim_disks(run):
    """Take a ready-made disk set (banger.vms.diskpool); if another create took the last one
    meanwhile, build both disks here instead."""
    from banger.vms import diskpool

    if diskpool.claim(run.ctx, run.vm, run.diskset_key):
        run.work_method = "pool"
        return
    _work_disk(run)
    _overlay_disk(run)


def _unclaim_disks(run):
    _unwork_disk(run)
    _unoverlay_disk(run)


# ---------------------------------------------------------------- network
def _claim_ports(run):
    """Durable claims for the -p values (refused when another VM holds a host port or a host process
    has it bound); the DNAT rules go in with the policy at net.tap."""
    from banger.net import publish

    publish.publish(run.ctx, run.vm, run.ports)


def _unclaim_ports(run):
    from banger.net import ports

    ports.forget(run.ctx, run.vm["id"])


# ---------------------------------------------------------------- boot
def _net(run):
    """The TAP, held down until its policy is in; the policy's thread starts once the VMM is spawned
    (``launched``), and whoever needs the network first brings it up (``net_ready``)."""
    run.tap, run.net_pending = rt.net_up(run.ctx, run.vm, background=True)


def _unnet(run):
    pending = getattr(run, "net_pending", None)
    if pending is not None:
        pending.wait()  # the policy's removal must not race its apply
    rt.net_down(run.ctx, run.vm)


def net_ready(run) -> None:
    """The VM's network policy is in place and its TAP up (a no-op once done, or without a TAP)."""
    pending = getattr(run, "net_pending", None)
    if pending is not None:
        pending.ready()
        run.net_pending = None


def launched(run, start_vmm, *, net_now: bool = True) -> None:
    """Run ``start_vmm()`` (a driver's launch or restore, returning handles) with every process it
    spawns written down as it appears (runtime.recording_spawns), then publish the handles with those
    records in them. Every step that starts a VMM goes through here. ``net_now``: then bring the
    network up (policy in place, TAP up); False only for a fresh boot whose next step, the SSH wait,
    does it first (the guest spends seconds booting; its TAP stays down until then)."""
    with rt.recording_spawns(run.ctx, run.vm) as spawned:
        handles = start_vmm()
        handles["spawned"] = list(spawned)
        run.handles = handles
        rt.save_handles(run.ctx, run.vm, handles)
    (rt.vm_dir(run.ctx, run.vm) / rt.SPAWNED).unlink(missing_ok=True)
    pending = getattr(run, "net_pending", None)
    if pending is not None:
        pending.start()
    if net_now:
        net_ready(run)  # the policy went in while the VMM started; only now can a frame leave the TAP


def _start_vmm(run, *, net_now: bool = True):
    spec = rt.vm_spec(run.ctx, run.vm, run.tap)
    rt.run_dir(run.ctx, run.vm).mkdir(parents=True, exist_ok=True)
    launched(run, lambda: rt.vm_driver(run.ctx, run.vm).launch(spec, run.ctx.progress), net_now=net_now)


def _launch(run):
    _start_vmm(run, net_now=False)  # guest.ssh brings the network up: the policy overlaps the boot


def _launch_confirmed(run):
    """The launch of a boot nobody waits on over SSH: also wait until the VMM is up (its start-up
    errors fail the step, not some later command)."""
    _start_vmm(run)
    rt.vm_driver(run.ctx, run.vm).confirm_started(run.handles)




def unlaunch(run):
    """Undo of any step that started a VMM (launch, restore): kill it and its helpers, drop its files."""
    import shutil

    rt.kill_vmm(run.ctx, run.vm, run.handles or rt.load_handles(run.ctx, run.vm))
    for f in (rt.HANDLES, rt.SPAWNED):
        (rt.vm_dir(run.ctx, run.vm) / f).unlink(missing_ok=True)
    shutil.rmtree(rt.run_dir(run.ctx, run.vm), ignore_errors=True)


def _ssh(run):
    from banger.guest import ssh

    net_ready(run)  # (a fresh boot's policy went in while its VMM started; no-op when already up)
    ssh.preload()  # paramiko's import (~100 ms of CPU) while the guest boots: no host step waits on its GIL
    run.transport = rt.wait_for_ssh(run.ctx, run.vm, run.handles)


def _close_ssh(run):
    if run.transport is not None:
        run.transport.close()
        run.transport = None


PREPARE = Step("prepare", _prepare, _unprepare)
DISK_WORK = Step("disk.work", _work_disk, _unwork_disk, "work disk")
DISK_OVERLAY = Step("disk.overlay", _overlay_disk, _unoverlay_disk, "overlay disk")
DISK_CLAIM = Step("disk.claim", _claim_disks, _unclaim_disks, "disks (ready-made)")
NET_TAP = Step("net.tap", _net, _unnet, "network")
VMM_LAUNCH = Step("vmm.launch", _launch, unlaunch, lambda run: f"starting {run.vm['backend']}")
VMM_LAUNCH_CONFIRMED = Step("vmm.launch", _launch_confirmed, unlaunch, VMM_LAUNCH.message)
GUEST_SSH = Step("guest.ssh", _ssh, _close_ssh, "waiting for SSH")
NET_PORTS = Step("net.ports", _claim_ports, _unclaim_ports, "publishing ports")

BUILD_STEPS = ("prepare", "disk.work", "disk.overlay")
BOOT_STEPS = ("net.tap", "vmm.launch", "guest.ssh")


def boot_plan(op: str, *, wait_ssh: bool = True) -> Plan:
    """The base list every VM-making plan is edited from."""
    plan = Plan(op, [PREPARE, DISK_WORK, DISK_OVERLAY, NET_TAP, VMM_LAUNCH, GUEST_SSH])
    return plan if wait_ssh else without_ssh(plan)


def without_ssh(plan: Plan) -> Plan:
    """No SSH wait: the launch itself then confirms the VMM came up."""
    plan = plan.without("guest.ssh") if "guest.ssh" in plan.names() else plan
    if any(s is VMM_LAUNCH for s in plan.steps):
        plan = plan.replace("vmm.launch", VMM_LAUNCH_CONFIRMED)
    return plan


def without_network(plan: Plan) -> Plan:
    """``--net none``: no TAP, no network card, so nothing to wait for over SSH either."""
    return without_ssh(plan.without("net.tap") if "net.tap" in plan.names() else plan)


def create_plan(*, start: bool = True, wait_ssh: bool = True, ready_disks: bool = False, net: bool = True,
                ports: bool = False) -> Plan:
    """``ready_disks``: a ready-made disk set exists for this VM's image and sizes (banger.vms.diskpool);
    ``net`` False: ``--net none``; ``ports``: claim the -p values first (before anything is built)."""
    plan = boot_plan("create", wait_ssh=wait_ssh)
    if ready_disks:
        plan = plan.replace("disk.work", DISK_CLAIM).without("disk.overlay")
    if ports:
        plan = plan.insert_before("prepare", NET_PORTS)
    if not net:
        plan = without_network(plan)
    return plan if start else plan.without(*(n for n in BOOT_STEPS if n in plan.names()))


def start_plan(*, wait_ssh: bool = True, net: bool = True) -> Plan:
    plan = boot_plan("start", wait_ssh=wait_ssh).without(*BUILD_STEPS)
    return plan if net else without_network(plan)
