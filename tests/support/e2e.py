"""End-to-end VM fixtures: a throwaway netns + isolated banger env with the default kernel and image
installed, and a leak check that runs after every e2e test.

Every banger command runs inside the namespace (``ip netns exec``), so the host's
own network namespace is never touched; QEMU inherits the namespace from the
banger process that spawned it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.images import default_image, install_image  # noqa: F401  (fixture re-export)
from tests.support.kernels import default_kernel, install_kernel, pulled_default_kernel  # noqa: F401
from tests.support.netns import netns  # noqa: F401  (fixture re-export)


def processes_under(*roots: Path) -> list[dict]:
    """Processes whose command line mentions one of ``roots`` (VMMs, handlers), except banger CLIs."""
    marks = [str(r) for r in roots]
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = " ".join(a.decode(errors="replace") for a in argv)
        if "banger.guest.console" in text:  # a console pump names no path: it holds its VM dir open instead
            try:
                text += " " + " ".join(os.readlink(f"/proc/{d}/fd/{fd}") for fd in os.listdir(f"/proc/{d}/fd"))
            except OSError:
                pass
        if any(m in text for m in marks) and "banger.cli.main" not in text:
            out.append({"pid": int(d), "cmd": text[:200]})
    return out


def loops_under(root: Path) -> list[str]:
    cp = subprocess.run(["losetup", "--json", "--list", "--output", "NAME,BACK-FILE"], capture_output=True,
                        text=True)
    devs = json.loads(cp.stdout)["loopdevices"] if cp.stdout.strip() else []
    return [d["name"] for d in devs if (d.get("back-file") or "").startswith(str(root))]


def sockets_under(root: Path) -> list[str]:
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                if stat.S_ISSOCK(os.lstat(p).st_mode):
                    found.append(p)
            except FileNotFoundError:
                pass
    return found


def leaks(ns) -> dict:
    """Everything a VM could leave behind, checked independently of banger's own code."""
    db = ns.home / "state.db"
    rows, claimed, idle = [], [], set()
    if db.exists():
        with sqlite3.connect(db) as c:
            rows = [r[0] for r in c.execute("SELECT name FROM vms")]
            claimed = [r[0] for r in c.execute("SELECT name FROM taps WHERE state = 'claimed'")]
            idle = {r[0] for r in c.execute("SELECT name FROM taps WHERE state = 'idle'")}
    taps = [x["ifname"] for x in ns.links(details=True)
            if (x.get("linkinfo") or {}).get("info_kind") == "tun" and x["ifname"] not in idle]
    neigh = []
    bridge = ns.env.get("BANGER_BRIDGE", "banger0")
    if ns.link(bridge, details=False):
        neigh = [n for n in ns.neighbours(bridge) if "PERMANENT" in n.get("state", [])]
    vm_dirs = sorted(p.name for p in (ns.home / "vms").iterdir()) if (ns.home / "vms").exists() else []
    return {k: v for k, v in {
        "rows": rows, "claimed_taps": claimed, "taps": taps, "neighbours": neigh,
        "processes": processes_under(ns.home, ns.run_dir), "sockets": sockets_under(ns.run_dir),
        "loops": loops_under(ns.home), "vm_dirs": vm_dirs}.items() if v}


def assert_no_leaks(ns) -> None:
    found = leaks(ns)
    assert not found, f"left behind: {json.dumps(found, indent=1)}"


def wait_for(pred, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def vmenv(netns, default_image, default_kernel):  # noqa: F811
    """A netns + banger env holding the default kernel and image; leak-checked afterwards."""
    from banger.config import load_config

    cfg = load_config(netns.env)
    install_kernel(cfg, default_kernel)
    install_image(cfg, default_image)
    try:
        yield netns
    finally:
        # whatever the test left running is removed through the product, then checked independently
        left = netns.banger_json("vm", "list", "--all", check=False).get("data") or []
        for v in left:
            netns.banger_json("vm", "delete", "-f", v["id"], check=False)
        netns.banger_json("gc", check=False)
        assert_no_leaks(netns)
        assert not left, f"the test left VMs behind: {[v['name'] for v in left]}"
