"""The pyroute2-free fast path of vm create: a warm pool + a correct bridge are verified through
sysfs/ioctl and the neighbour entry is one raw rtnetlink request; anything unexpected falls back
to the full netlink path. Real devices in a throwaway namespace."""

from __future__ import annotations

from tests.support.netns import netns  # noqa: F401

PROBE = """
import json, sys
from banger.context import Ctx
from banger.net import bridge as hostnet
from banger.net import pool
ctx = Ctx()
br = hostnet.ensure_bridge(ctx)
tap = pool.claim(ctx, sys.argv[1])
print(json.dumps({"tap": tap, "bridge_changed": br["changed"], "pyroute2": "pyroute2" in sys.modules}))
"""

NEIGH = """
import json, sys
from banger.net import fastnet
from banger.errors import BangerError
fastnet.set_neighbour(sys.argv[1], sys.argv[2], sys.argv[3])
fastnet.set_neighbour(sys.argv[1], sys.argv[2], sys.argv[3])  # replace is idempotent
try:
    fastnet.set_neighbour("no-such-dev", "10.9.9.9", "06:00:00:00:00:01")
    err = None
except BangerError as e:
    err = [e.code, e.hint]
print(json.dumps({"err": err, "pyroute2": "pyroute2" in sys.modules}))
"""


def test_warm_claim_needs_no_pyroute2(netns):
    netns.banger_json("pool", "warm", "2")
    r = netns.py(PROBE, "vm1")
    assert r["pyroute2"] is False and r["bridge_changed"] is False
    assert r["tap"].startswith("tap-pool-")
    # the TAP really is claimed by vm1 (and the same one comes back for vm1)
    again = netns.py(PROBE, "vm1")
    assert again["tap"] == r["tap"]


def test_fast_path_falls_back_and_repairs(netns):
    netns.banger_json("pool", "warm", "1")
    tap = netns.links(prefix="tap-pool-")[0]["ifname"]
    netns.run(["ip", "link", "set", tap, "nomaster"], check=True)
    r = netns.py(PROBE, "vm2")
    assert r["tap"] == tap and r["pyroute2"] is True  # netlink path re-attached it
    assert netns.link(tap)["master"] == "banger0"
    # a bridge that lost its address is repaired by the netlink path too
    netns.run(["ip", "addr", "flush", "dev", "banger0"], check=True)
    r = netns.py(PROBE, "vm3")
    assert r["bridge_changed"] is True and r["pyroute2"] is True
    assert any(a.startswith("172.30.0.1/") for a in netns.addrs("banger0"))


def test_raw_rtnetlink_neighbour(netns):
    netns.banger_json("pool", "warm", "1")
    r = netns.py(NEIGH, "banger0", "172.30.0.9", "06:00:ac:1e:00:09")
    assert r["pyroute2"] is False
    assert r["err"][0] == "not_found" and "pool warm" in r["err"][1]
    entries = [n for n in netns.neighbours("banger0") if n.get("dst") == "172.30.0.9"]
    assert len(entries) == 1
    assert entries[0]["lladdr"] == "06:00:ac:1e:00:09" and "PERMANENT" in entries[0]["state"]
