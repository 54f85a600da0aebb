"""Phase 2 of create across real processes: names + IPs claimed in one BEGIN IMMEDIATE."""

from __future__ import annotations

import json

from banger.state.store import Store
from tests.support.procs import Barrier, spawn_py

RESERVE = """
import json, sys
from banger.config import load_config
from banger.names import Subnet
from banger.state.reservation import reserve_vm
from banger.state.store import Store
from banger.errors import BangerError
from tests.support.procs import barrier_wait
cfg = load_config()
store = Store(cfg.db_path)
name = sys.argv[1] or None
barrier_wait(sys.argv[2])  # all children are here, connected, before any of them reserves
try:
    vm = reserve_vm(store, Subnet(cfg.subnet), name=name, image="img", kernel="k", backend="qemu",
                    vcpu=1, memory_mib=256, overlay_size_mib=64, work_disk_size_mib=64)
    print(json.dumps({"ok": True, "name": vm["name"], "ip": vm["ip"], "mac": vm["mac"]}))
except BangerError as e:
    print(json.dumps({"ok": False, "code": e.code, "message": e.message}))
"""


def _run_all(names, banger_env, tmp_path):
    Store(banger_env["home"] / "state.db").close()  # schema first, so the race is about rows
    go = Barrier(tmp_path / "go", len(names))
    procs = [spawn_py(RESERVE, n, str(go.path)) for n in names]
    go.release()
    out = []
    for p in procs:
        so, se = p.communicate(timeout=120)
        assert p.returncode == 0, se
        out.append(json.loads(so.strip().splitlines()[-1]))
    return out


def test_sixteen_processes_reserve_distinct_names_and_ips(banger_env, tmp_path):
    results = _run_all([""] * 16, banger_env, tmp_path)
    assert all(r["ok"] for r in results), results
    assert len({r["name"] for r in results}) == 16
    assert len({r["ip"] for r in results}) == 16
    assert len({r["mac"] for r in results}) == 16
    with Store(banger_env["home"] / "state.db") as s:
        rows = s.list_vms()
    assert len(rows) == 16 and all(r["state"] == "creating" for r in rows)


def test_duplicate_name_race_has_exactly_one_winner(banger_env, tmp_path):
    results = _run_all(["dup"] * 8 + [f"other-{i}" for i in range(8)], banger_env, tmp_path)
    dup = [r for r in results[:8]]
    winners = [r for r in dup if r["ok"]]
    losers = [r for r in dup if not r["ok"]]
    assert len(winners) == 1
    assert len(losers) == 7 and all(r["code"] == "conflict" and "already exists" in r["message"] for r in losers)
    assert all(r["ok"] for r in results[8:])
    with Store(banger_env["home"] / "state.db") as s:
        assert len(s.list_vms()) == 9
        assert len({v["ip"] for v in s.list_vms()}) == 9


def test_check_refs_refuses_a_deleted_kernel(banger_env):
    import time

    import pytest

    from banger.config import load_config
    from banger.errors import NotFound
    from banger.names import Subnet
    from banger.state.reservation import reserve_vm

    cfg = load_config()
    with Store(cfg.db_path) as s:
        s.execute("INSERT INTO images (name, kind, rootfs, created_at) VALUES ('img', 'test', '/x', ?)", (time.time(),))
        kw = dict(image="img", backend="qemu", vcpu=1, memory_mib=256, overlay_size_mib=64, work_disk_size_mib=64,
                  check_refs=True)
        with pytest.raises(NotFound):
            reserve_vm(s, Subnet(cfg.subnet), name="a", kernel="gone", **kw)
        assert s.list_vms() == []
        s.execute("INSERT INTO kernels (name, dir, created_at) VALUES ('k', '/k', ?)", (time.time(),))
        assert reserve_vm(s, Subnet(cfg.subnet), name="a", kernel="k", **kw)["name"] == "a"
