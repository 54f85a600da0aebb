"""QemuDriver.snapshot / restore on a real guest (the primitives the snapshot service builds on):
migration to a file handed over as an fd (device state; the RAM a sparse copy of the VM's memfd),
restore with -incoming defer mapping that copy privately, memory state intact,
and the serial-console control line reaching banger-init afterwards."""

from __future__ import annotations

from tests.support.e2e import (  # noqa: F401  (fixtures)
    default_image,
    default_kernel,
    netns,
    pulled_default_kernel,
    vmenv,
    wait_for,
)

SNIPPET = """
import json, sys, time
from pathlib import Path
from banger.guest import ssh
from banger.context import Ctx
from banger.vms import runtime as vms
ctx = Ctx()
vm = vms.get(ctx, sys.argv[1])
h = vms.load_handles(ctx, vm)
drv = vms.vm_driver(ctx, vm)
t = ssh.connect(vm["ip"], **vms.ssh_files(ctx, vm))
ssh.run_capture(t, ["mkdir -p /run/m && mount -t tmpfs none /run/m && echo in-memory > /run/m/marker"])
t.close()
meta = drv.snapshot(h, Path(sys.argv[2]))
paused = drv.status(h)
drv.kill(h)
h2 = drv.restore(vms.vm_spec(ctx, vm, h["tap"]), Path(sys.argv[2]), meta)
vms.save_handles(ctx, vm, h2)
t = ssh.connect(vm["ip"], **vms.ssh_files(ctx, vm))
rc, out, err = ssh.run_capture(t, ["cat /run/m/marker"])
t.close()
drv.send_console(h2, f"@banger net {vm['ip']}/24 172.30.0.1 {vm['mac']} {vm['name']}")
print(json.dumps({"meta": meta, "paused": paused, "old_pid": h["pid"], "new_pid": h2["pid"],
                  "status": drv.status(h2), "marker": out, "rc": rc}))
"""


def test_qemu_snapshot_restore_keeps_memory_and_console_control(vmenv, tmp_path):  # noqa: F811
    env = vmenv
    v = env.banger_json("vm", "create", "--name", "snap-1", timeout=300)["data"]
    r = env.py(SNIPPET, "snap-1", tmp_path / "snap")
    assert r["paused"] in ("paused", "postmigrate")  # not running
    assert (tmp_path / "snap" / "vmstate.bin").stat().st_size == r["meta"]["state_bytes"]
    # a booted VM's RAM is a memfd: the snapshot is device state plus a sparse copy of the RAM
    assert r["meta"]["memory_file"] == "memory.ram" and r["meta"]["ignore_shared"] is True
    ram = tmp_path / "snap" / "memory.ram"
    assert ram.stat().st_size == 1024 << 20 and (1 << 20) < ram.stat().st_blocks * 512 < ram.stat().st_size
    assert r["new_pid"] != r["old_pid"] and r["status"] == "running"
    assert (r["rc"], r["marker"]) == (0, "in-memory\n")  # a tmpfs file survives only in RAM
    serial = env.home / "vms" / v["id"] / "serial.log"
    wait_for(lambda: f"banger-init: net {v['ip']}/24" in serial.read_text(errors="replace"), 30,
             "banger-init applying the console control line")
    assert env.banger_json("vm", "show", "snap-1")["data"]["pid"] == r["new_pid"]
    env.banger_json("vm", "delete", "-f", "snap-1")
