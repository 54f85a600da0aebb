"""CLI start-up benchmark: `banger --help` and `banger vm list` with 100 rows.

Reports the median wall time of N runs of the installed entry point (a fresh
process each, as a user sees it). Target: <= 150 ms each on the build machine.

    python bench/startup.py [--runs 30] [--json] [--banger PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TARGET_MS = 150.0


def _seed(home: str, n: int) -> None:
    os.environ["BANGER_HOME"] = home
    from banger.config import load_config
    from banger.names import Subnet
    from banger.state.reservation import reserve_vm
    from banger.state.store import Store

    cfg = load_config()
    with Store(cfg.db_path) as s:
        for i in range(n):
            vm = reserve_vm(s, Subnet(cfg.subnet), name=f"bench-{i:03d}", image="debian-bookworm",
                            kernel="debian-6.1-cloud", backend="qemu", vcpu=1, memory_mib=1024,
                            overlay_size_mib=4096, work_disk_size_mib=2048)
            s.update_vm(vm["id"], state="stopped")


def _time(argv: list[str], env: dict, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        cp = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        dt = (time.perf_counter() - t0) * 1000
        if cp.returncode != 0:
            raise SystemExit(f"{argv} failed: {cp.stderr.decode()[-500:]}")
        out.append(dt)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--banger", default=os.environ.get("BENCH_BANGER") or shutil.which("banger"))
    a = ap.parse_args()
    if not a.banger:
        raise SystemExit("banger not found on PATH; pass --banger")
    home = tempfile.mkdtemp(prefix="bench-startup-")
    try:
        _seed(home, 100)
        env = dict(os.environ, BANGER_HOME=home, BANGER_RUN=tempfile.mkdtemp(prefix="bgr-"))
        cases = {"banger --help": [a.banger, "--help"], "banger vm list (100 rows)": [a.banger, "vm", "list"],
                 "banger vm list --json (100 rows)": [a.banger, "vm", "list", "--json"]}
        # check the list really has 100 rows
        doc = json.loads(subprocess.run([a.banger, "vm", "list", "--json"], env=env, capture_output=True,
                                        text=True).stdout)
        assert len(doc["data"]) == 100, len(doc["data"])
        results = {}
        for name, argv in cases.items():
            _time(argv, env, 3)  # warm the page cache
            ts = _time(argv, env, a.runs)
            results[name] = {"median_ms": statistics.median(ts), "p95_ms": sorted(ts)[int(0.95 * (len(ts) - 1))],
                             "min_ms": min(ts), "runs": len(ts), "target_ms": TARGET_MS,
                             "met": statistics.median(ts) <= TARGET_MS}
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if a.json:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        from bench.targets import target, with_targets

        targets = [target(f"{name} median", r["median_ms"], "<=", TARGET_MS, "ms") for name, r in results.items()]
        print(json.dumps(with_targets({"banger": a.banger, "results": results}, targets), indent=2))
    else:
        print(f"CLI start-up ({a.banger}, {a.runs} runs each, target <= {TARGET_MS:.0f} ms median)")
        for name, r in results.items():
            print(f"  {name:<34} median {r['median_ms']:6.1f} ms  p95 {r['p95_ms']:6.1f} ms  "
                  f"min {r['min_ms']:6.1f} ms  {'OK' if r['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
