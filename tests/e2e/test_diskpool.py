"""Ready-made disk sets (banger.vms.diskpool) on real guests: `pool warm` builds them, `vm create`
claims one by rename (no disk work on the create path), each VM still gets its own pinned host key,
and an empty pool falls back to building the disks."""

from __future__ import annotations

from tests.support.e2e import default_image, default_kernel, netns, pulled_default_kernel, vmenv  # noqa: F401


def _key(env, name):
    return (env.home / "vms" / env.banger_json("vm", "show", name)["data"]["id"] / "known_hosts").read_text().split()[2]


def test_create_claims_ready_disks_and_each_vm_has_its_own_host_key(vmenv):  # noqa: F811
    env = vmenv
    warm = env.banger_json("pool", "warm", "2", timeout=300)["data"]
    assert warm["disks"]["ready"] == 2 and warm["disks"]["made"] == 2
    assert env.banger_json("pool", "warm", "2")["data"]["disks"]["made"] == 0  # idempotent
    a = env.banger_json("vm", "create", "--name", "dp-a", "--memory", "512", timeout=300)["data"]
    stages = [s["stage"] for s in a["stages"] if s["op"] == "create"]
    assert stages == ["prepare", "disk.claim", "net.tap", "vmm.launch", "guest.ssh"]
    assert a["work_disk_method"] == "pool"
    env.banger_json("vm", "create", "--name", "dp-b", "--memory", "512", "--no-wait", timeout=300)
    assert env.banger_json("pool", "status")["data"]["disks"]["sets"] == 0
    # the host key pinned for each VM is the one in its own overlay (exec verifies it), and they differ
    assert _key(env, "dp-a") != _key(env, "dp-b")
    cp = env.banger("vm", "exec", "dp-a", "--", "sh", "-c", "hostname; cat /etc/hostname; ls /root/.ssh")
    assert cp.stdout.split() == ["dp-a", "dp-a", "authorized_keys"], cp.stdout
    env.banger_json("vm", "delete", "-f", "dp-b")
    # an empty pool builds the disks as before
    c = env.banger_json("vm", "create", "--name", "dp-c", "--memory", "512", "--no-start")["data"]
    assert [s["stage"] for s in c["stages"] if s["op"] == "create"] == ["prepare", "disk.work", "disk.overlay"]
    for n in ("dp-a", "dp-c"):
        env.banger_json("vm", "delete", "-f", n)
