"""`vm promote`: a stopped VM's root changes (including deletions) and /root become a new image;
the VM's own host key and hostname do not; no loop device or mount is left."""

from __future__ import annotations

import subprocess

from tests.support.e2e import (  # noqa: F401  (fixtures)
    default_image,
    default_kernel,
    loops_under,
    netns,
    pulled_default_kernel,
    vmenv,
)


def test_promote_then_run_from_the_new_image(vmenv):  # noqa: F811
    env = vmenv
    env.banger_json("vm", "create", "--name", "promo-src", timeout=300)
    env.banger("vm", "exec", "promo-src", "--", "sh", "-c",
               "echo layered > /etc/promoted && rm /etc/issue && echo home > /root/kept && sync")
    env.banger_json("vm", "stop", "promo-src")
    img = env.banger_json("vm", "promote", "promo-src", "promoted-1", timeout=300)["data"]
    assert img["name"] == "promoted-1" and img["kind"] == "promoted"
    assert loops_under(env.home) == []
    mounts = open("/proc/mounts").read()
    assert str(env.home) not in mounts
    rootfs = env.home / "images" / "promoted-1" / "rootfs.ext4"
    ls = subprocess.run(["debugfs", "-R", "ls -l /etc/ssh", str(rootfs)], capture_output=True, text=True).stdout
    assert "ssh_host_ed25519_key" not in ls  # the source VM's private host key stayed behind
    cp = env.banger("vm", "run", "--rm", "--image", "promoted-1", "--name", "promo-new", "--",
                    "sh", "-c", "cat /etc/promoted /root/kept; test -e /etc/issue || echo no-issue; hostname",
                    timeout=300)
    assert cp.stdout.split() == ["layered", "home", "no-issue", "promo-new"]
    env.banger_json("vm", "delete", "promo-src")
