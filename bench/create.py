"""Benchmark `banger vm create` to SSH-ready: per-step p50/p95, four configurations side by side.

    python bench/create.py [-n 5] [--json]

Configurations: work seed clone vs --no-work-seed (mkfs from scratch), each with a
cold TAP pool (create makes its TAP) and a warm one (`pool warm`). Runs inside a
throwaway network namespace with its own BANGER_HOME holding the default kernel and
image (pulled / built once into the test cache, like the e2e suite), one VM at a
time, each deleted after it is measured. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.targets import cli_argv, installed_like  # noqa: E402
from tests.support.netns import banger_argv, create_netns, delete_netns, run_in_ns  # noqa: E402

HOST_STEPS = ["prepare", "disk.work", "disk.overlay", "disk.claim", "net.tap", "vmm.launch"]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def banger(ns, env, *args, timeout=600) -> dict:
    args = [*args[:2], "--json", *args[2:]]  # before any `--`
    cp = run_in_ns(ns, cli_argv(ROOT, *args), env, timeout=timeout)
    doc = json.loads(cp.stdout or "{}")
    if not doc.get("ok"):
        raise SystemExit(f"banger {' '.join(args)} failed: {doc}\n{cp.stderr[-2000:]}")
    return doc["data"]


def seed_home(home: Path) -> None:
    """The default kernel and image (pulled/built once into the test cache) published into ``home``."""
    from banger.config import load_config
    from tests.support.images import build_default_image_cached, install_image
    from tests.support.kernels import install_kernel, pull_default_kernel_cached

    cfg = load_config({"BANGER_HOME": str(home), "BANGER_RUN": str(home / "run")})
    install_kernel(cfg, pull_default_kernel_cached())
    install_image(cfg, build_default_image_cached())


def measure(ns, env, n: int, *, seed: bool, warm: bool) -> list[dict]:
    runs = []
    for i in range(n):
        if warm:
            banger(ns, env, "pool", "warm", "1")
        else:
            banger(ns, env, "pool", "drain")
        args = ["vm", "create", "--name", f"bench-{i}"] + ([] if seed else ["--no-work-seed"])
        t0 = time.monotonic()
        v = banger(ns, env, *args)
        wall = time.monotonic() - t0
        st = {s["stage"]: s["duration_ms"] for s in v["stages"] if s["op"] == "create"}
        st["host_side"] = sum(st.get(k, 0) for k in HOST_STEPS)
        st["vmm_ready"] = v["timings"]["vmm_ready_s"] * 1000
        st["ssh_ready"] = v["timings"]["ssh_ready_s"] * 1000
        st["cli_wall"] = wall * 1000
        # host side as the user pays it: the whole CLI (start-up, resolve, reserve, disks, network, launch,
        # exit) minus the guest's own part (VMM launched -> SSH answered, the guest.ssh step)
        st["host_cli"] = st["cli_wall"] - st.get("guest.ssh", 0)
        runs.append(st)
        banger(ns, env, "vm", "delete", "-f", f"bench-{i}")
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    installed_like(ROOT)

    home = Path(tempfile.mkdtemp(prefix="banger-bench-"))
    run = Path(tempfile.mkdtemp(prefix="bgb-", dir="/tmp"))
    env = {**os.environ, "BANGER_HOME": str(home), "BANGER_RUN": str(run), "BANGER_HOSTS_FILE": str(home / "hosts")}
    ns = create_netns("bgbench")
    results = {}
    try:
        seed_home(home)
        banger(ns, env, "vm", "run", "--rm", "--", "true")  # warm caches once, not measured
        for seed in (True, False):
            for warm in (False, True):
                key = f"{'seed' if seed else 'mkfs'}+{'warm' if warm else 'cold'}"
                results[key] = measure(ns, env, a.n, seed=seed, warm=warm)
    finally:
        run_in_ns(ns, banger_argv("gc"), env)
        run_in_ns(ns, banger_argv("pool", "drain"), env)
        delete_netns(ns)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)

    cols = ["disk.work", "disk.overlay", "disk.claim", "net.tap", "vmm.launch", "host_side", "vmm_ready",
            "guest.ssh", "ssh_ready", "cli_wall", "host_cli"]
    summary = {k: {c: {"p50": round(pct([r.get(c, 0) for r in rs], 0.5), 1),
                       "p95": round(pct([r.get(c, 0) for r in rs], 0.95), 1)} for c in cols}
               for k, rs in results.items()}
    from bench.targets import target, with_targets

    warm, naive = summary["seed+warm"]["host_cli"]["p50"], summary["mkfs+cold"]["host_cli"]["p50"]
    targets = [target("host-side cold create, warm TAP + disk pools (CLI wall - guest boot) p50", warm, "<=", 80, "ms"),
               target("naive path (mkfs, cold pools) / warm pools, host side p50", naive / warm if warm else 0.0, ">=",
                      3, "x")]
    if a.json:
        print(json.dumps(with_targets({"n": a.n, "summary_ms": summary, "runs_ms": results}, targets), indent=2))
        return
    print(f"vm create to SSH-ready, n={a.n} per configuration, milliseconds p50 / p95")
    print(f"{'step':<14}" + "".join(f"{k:>22}" for k in summary))
    for c in cols:
        print(f"{c:<14}" + "".join(f"{summary[k][c]['p50']:>12.1f} /{summary[k][c]['p95']:>8.1f}" for k in summary))
    for t in targets:
        print(f"target {t['name']}: {t['value']} {t['unit']} {t['op']} {t['limit']}: {'met' if t['met'] else 'MISSED'}")


if __name__ == "__main__":
    main()
