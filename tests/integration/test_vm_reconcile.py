"""Reconciliation: a VM whose recorded VMM process died (or whose pid was reused) never shows as running."""

from __future__ import annotations

import json
import os
import signal
import sys

from banger.config import load_config
from banger.host import procs
from banger.host.fsutil import atomic_write_json
from banger.names import Subnet
from banger.state.reservation import reserve_vm
from banger.state.store import Store
from tests.support.cli import banger, banger_json


def _running_vm(cfg, name: str, handles: dict) -> dict:
    with Store(cfg.db_path) as st:
        vm = reserve_vm(st, Subnet(cfg.subnet), name=name, image="img", kernel="k", backend="qemu", vcpu=1,
                        memory_mib=256, overlay_size_mib=64, work_disk_size_mib=64, state="running")
    cfg.vm_dir(vm["id"]).mkdir(parents=True)
    atomic_write_json(cfg.vm_dir(vm["id"]) / "handles.json", handles)
    return vm


def _state(name):
    return banger_json("vm", "show", name)["data"]["state"]


def test_killed_vmm_shows_as_crashed(banger_env):
    cfg = load_config()
    # a real detached process standing in for the VMM (reconciliation only looks at pid + start time)
    pid, start = procs.spawn_detached([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        _running_vm(cfg, "alive-1", {"backend": "qemu", "pid": pid, "pid_start": start})
        assert _state("alive-1") == "running"
        listed = {v["name"]: v for v in banger_json("vm", "list")["data"]}
        assert listed["alive-1"]["state"] == "running" and listed["alive-1"]["pid"] == pid
        os.kill(pid, signal.SIGKILL)
        assert procs.kill(pid, start, wait=10)  # reaped by init; gone
        show = banger_json("vm", "show", "alive-1")["data"]
        assert show["state"] == "crashed" and show["pid"] is None and "gone" in show["error"]
        assert {v["name"]: v["state"] for v in banger_json("vm", "list")["data"]} == {"alive-1": "crashed"}
        # a crashed VM is not "running" for commands that need a live guest
        cp = banger("vm", "exec", "--json", "alive-1", "--", "true", check=False)
        assert cp.returncode == 4 and json.loads(cp.stdout)["error"]["code"] == "invalid_state"
    finally:
        procs.kill(pid, start)


def test_reused_pid_is_not_mistaken_for_the_vmm(banger_env):
    cfg = load_config()
    me = os.getpid()  # alive, but its start time is not the recorded one
    _running_vm(cfg, "reused-1", {"backend": "qemu", "pid": me, "pid_start": procs.start_time(me) + 12345})
    assert _state("reused-1") == "crashed"


def test_guest_poweroff_shows_as_stopped(banger_env):
    cfg = load_config()
    pid, start = procs.spawn_detached([sys.executable, "-c", "pass"])
    procs.kill(pid, start, wait=10)
    vm = _running_vm(cfg, "off-1", {"backend": "qemu", "pid": pid, "pid_start": start})
    (cfg.vm_dir(vm["id"]) / "serial.log").write_text("banger-init: stopping\n[   9.1] reboot: Power down\n")
    assert _state("off-1") == "stopped"
