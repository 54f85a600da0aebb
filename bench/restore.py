"""Snapshot restore through the Firecracker driver, against the contract double: UFFD vs File backend.

    python bench/restore.py [-n 5] [--memory 256] [--json]

Firecracker cannot run on the build machines, so this measures banger's side of a
restore with the strict double standing in for the VMM (its own start-up is a
Python process, ~100 ms, which real Firecracker does in ~12 ms): handler spawn ->
VMM API up -> PUT /snapshot/load (real UFFD handshake + faults served during the
load) -> resume, then the time for the "guest" to touch every page once (each a
real page fault served by banger's handler; File: a MAP_PRIVATE read).  UFFD runs
twice per round: the first restore records the access log, the next replays it.
Runs in a throwaway network namespace (TAPs live there). Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.targets import target  # noqa: E402
from tests.support.netns import create_netns, delete_netns, run_in_ns  # noqa: E402

INNER = r"""
import json, os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from banger.config import load_config
from banger.host.fsutil import reflink_or_sparse_copy
from banger.vmm.firecracker.driver import FirecrackerDriver
from tests.support.fc import FAKE_FC, make_spec, make_tap, wait_event

n, mem = int(sys.argv[2]), int(sys.argv[3])
tmp = Path(tempfile.mkdtemp(prefix="bench-restore-"))
rec = tmp / "rec"; rec.mkdir()
os.environ.update(BANGER_HOME=str(tmp / "home"), BANGER_RUN=tempfile.mkdtemp(prefix="bgr-", dir="/tmp"),
                  FAKE_FIRECRACKER_RECORD=str(rec))
(tmp / "config.toml").write_text(f'firecracker_bin = "{FAKE_FC}"\n')
os.environ["BANGER_CONFIG"] = str(tmp / "config.toml")
cfg = load_config()
d = FirecrackerDriver(cfg)
taps = [make_tap("bbr") for _ in range(2)]
src = make_spec(cfg, tmp, taps[0], memory_mib=mem)
h = d.launch(src)
t = time.monotonic(); meta = d.snapshot(h, tmp / "snap"); snap_ms = (time.monotonic() - t) * 1000
d.kill(h)
out = {"snapshot_ms": snap_ms, "memory_mib": mem, "runs": []}
for i in range(n):
    for mode in ("uffd-record", "uffd-replay", "file"):
        os.environ["BANGER_UFFD"] = "0" if mode == "file" else "1"
        if mode == "uffd-record":
            (tmp / "snap" / "access.log").unlink(missing_ok=True)
        spec = make_spec(cfg, tmp, taps[1], memory_mib=mem)
        for dd in meta["drives"]:
            if not Path(dd["path_on_host"]).is_absolute():
                reflink_or_sparse_copy(Path(src.vm_dir) / dd["path_on_host"], Path(spec.vm_dir) / dd["path_on_host"])
        r = d.restore(spec, tmp / "snap", meta)
        v = wait_event(rec, r["pid"], "memory_verified", timeout=300)
        assert v["mismatched_vs_pattern"] == 0, v
        if mode == "uffd-record":
            deadline = time.monotonic() + 60
            while not (tmp / "snap" / "access.log").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        d.kill(r)
        out["runs"].append({"mode": mode, **r["restore_timings"], "touch_all_ms": v["ms"]})
import shutil
shutil.rmtree(tmp, ignore_errors=True)
shutil.rmtree(os.environ["BANGER_RUN"], ignore_errors=True)
print(json.dumps(out))  # the TAPs go with the namespace
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=5)
    ap.add_argument("--memory", type=int, default=256, help="guest memory (MiB)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    ns = create_netns("bbr")
    try:
        cp = run_in_ns(ns, [sys.executable, "-c", INNER, str(ROOT), str(a.n), str(a.memory)],
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        delete_netns(ns)
    if cp.returncode != 0:
        sys.stderr.write(cp.stderr)
        return 1
    data = json.loads(cp.stdout.strip().splitlines()[-1])
    summary = {}
    for mode in ("uffd-record", "uffd-replay", "file"):
        runs = [r for r in data["runs"] if r["mode"] == mode]
        summary[mode] = {k: round(statistics.median(r[k] for r in runs), 1)
                         for k in ("total_ms", "load_ms", "resume_ms", "touch_all_ms")}
    rec, rep, fil = summary["uffd-record"], summary["uffd-replay"], summary["file"]
    targets = [
        # a replayed access log makes the guest's first pass over its memory much faster than on demand
        target("uffd_replay_touch_all_speedup_vs_record", rec["touch_all_ms"] / rep["touch_all_ms"], ">=", 2.0, "x"),
        # the UFFD handler's start-up and handshake add little to a restore over the File backend
        target("uffd_replay_restore_vs_file", rep["total_ms"] / fil["total_ms"], "<=", 1.5, "x"),
    ]
    if a.json:
        print(json.dumps({"memory_mib": a.memory, "snapshot_ms": round(data["snapshot_ms"], 1), "n": a.n,
                          "median": summary, "targets": targets}))
    else:
        print(f"guest memory {a.memory} MiB, snapshot create {data['snapshot_ms']:.0f} ms, medians of {a.n}:")
        print(f"{'mode':<12} {'restore':>9} {'load':>8} {'resume':>8} {'touch all':>10}")
        for mode, s in summary.items():
            print(f"{mode:<12} {s['total_ms']:>7.1f}ms {s['load_ms']:>6.1f}ms {s['resume_ms']:>6.1f}ms "
                  f"{s['touch_all_ms']:>8.1f}ms")
        for t in targets:
            print(f"target {t['name']} {t['op']} {t['limit']}{t['unit']}: {t['value']}{t['unit']} "
                  f"{'MET' if t['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
