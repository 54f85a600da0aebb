"""Benchmark the instant paths side by side: cold create, pooled create (a claim from the warm VM pool)
and fork, each to SSH-ready; `vm run --rm -- true` cold vs pooled; memory per clone (PSS) of 4 forked
clones vs 4 cold VMs.

    python bench/instant.py [-n 5] [--json]

Runs inside a throwaway network namespace with its own BANGER_HOME holding the default kernel and image
(pulled / built once into the test cache, like the e2e suite). Times are the CLI's whole wall time
(start-up to exit, what a user waits for) unless named otherwise; ``ssh_ready`` is banger's own
measure from the plan's first step to SSH answering. Pool refills (`pool warm --vms`) happen between
measurements and are not counted: a claim never waits for one. Needs root.

Targets (QEMU TCG): pooled create p50 <= 0.8 s and >= 5x faster than cold; `vm run --rm -- true` pooled
p50 <= 1.5 s; fork of 4 to all answering <= 2x one restore (`vm restore` of a snapshot to SSH-ready).
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

from bench.targets import installed_like  # noqa: E402
from tests.support.netns import banger_argv, create_netns, delete_netns, run_in_ns  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def stats(xs: list[float]) -> dict:
    return {"p50": round(pct(xs, 0.5), 1), "p95": round(pct(xs, 0.95), 1), "n": len(xs),
            "runs": [round(x, 1) for x in xs]}


class Env:
    def __init__(self, ns: str, env: dict):
        self.ns, self.env = ns, env

    def banger(self, *args, timeout=900) -> tuple[dict, float]:
        """(data, wall ms) of one banger command (--json goes before any `--`)."""
        i = args.index("--") if "--" in args else len(args)
        argv = banger_argv(*args[:i], "--json", *args[i:])
        t0 = time.monotonic()
        cp = run_in_ns(self.ns, argv, self.env, timeout=timeout)
        wall = (time.monotonic() - t0) * 1000
        doc = json.loads(cp.stdout or "{}")
        if not doc.get("ok"):
            raise SystemExit(f"banger {' '.join(map(str, args))} failed: {doc}\n{cp.stderr[-2000:]}")
        return doc["data"], wall


def seed_home(home: Path) -> None:
    from banger.config import load_config
    from tests.support.images import build_default_image_cached, install_image
    from tests.support.kernels import install_kernel, pull_default_kernel_cached

    cfg = load_config({"BANGER_HOME": str(home), "BANGER_RUN": str(home / "run")})
    install_kernel(cfg, pull_default_kernel_cached())
    install_image(cfg, build_default_image_cached())


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def vm_pss(e: Env, names: list[str], settle_s: float = 3.0) -> list[int]:
    time.sleep(settle_s)  # let the guests go idle (a fixed pause is right here: it is what is measured)
    out = []
    for n in names:
        v, _ = e.banger("vm", "show", n)
        out.append(pss_kib(v["pid"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=5, help="runs per measurement")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    installed_like(ROOT)
    n = max(1, a.n)

    home = Path(tempfile.mkdtemp(prefix="banger-bench-"))
    run = Path(tempfile.mkdtemp(prefix="bgi-", dir="/tmp"))
    env = {**os.environ, "BANGER_HOME": str(home), "BANGER_RUN": str(run),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ns = create_netns("bginst")
    e = Env(ns, env)
    res: dict = {}
    extra: dict = {}
    try:
        seed_home(home)
        e.banger("pool", "warm", "8")
        e.banger("vm", "run", "--rm", "--cold", "--", "true")  # warm caches once, not measured
        tpl, ms = e.banger("template", "build")
        extra["template_build_ms"] = round(ms, 1)

        def create_runs(label: str, cold: bool):
            walls, ssh = [], []
            if not cold:
                e.banger("pool", "warm", "--vms", str(n))
            for i in range(n):
                v, wall = e.banger("vm", "create", "--name", f"{label}-{i}", *(["--cold"] if cold else []))
                if v["made"]["how"] != ("cold" if cold else "pool"):
                    raise SystemExit(f"{label}: expected a {'cold' if cold else 'pooled'} create, got {v['made']}")
                walls.append(wall)
                ssh.append(v["timings"]["ssh_ready_s"] * 1000)
                e.banger("vm", "delete", "-f", f"{label}-{i}")
            res[f"{label}_create"] = stats(walls)
            res[f"{label}_create_ssh_ready"] = stats(ssh)

        create_runs("cold", True)
        create_runs("pooled", False)

        for label, cold in (("cold", True), ("pooled", False)):
            if not cold:
                e.banger("pool", "warm", "--vms", str(n))
            walls = []
            for _ in range(n):
                d, wall = e.banger("vm", "run", "--rm", *(["--cold"] if cold else []), "--", "true")
                if d["exit_status"] != 0 or d["vm"]["made"]["how"] != ("cold" if cold else "pool"):
                    raise SystemExit(f"vm run {label}: {d}")
                walls.append(wall)
            res[f"{label}_run_rm_true"] = stats(walls)

        # fork (a cold-booted source) vs one restore of a snapshot of the same source
        e.banger("vm", "create", "--name", "fsrc", "--cold")
        e.banger("snapshot", "create", "fsrc", "fsnap")
        walls = []
        for i in range(n):
            v, wall = e.banger("vm", "restore", "fsnap", "--name", f"rst-{i}")
            walls.append(wall)
            e.banger("vm", "delete", "-f", f"rst-{i}")
        res["restore"] = stats(walls)
        walls = []
        for i in range(n):
            f, wall = e.banger("vm", "fork", "fsrc", "--count", "1", "--name", f"f1-{i}")
            walls.append(wall)
            e.banger("vm", "delete", "-f", f"f1-{i}-1")
        res["fork1"] = stats(walls)
        walls, parts = [], []
        forks = max(1, (n + 1) // 2)
        for i in range(forks):
            f, wall = e.banger("vm", "fork", "fsrc", "--count", "4", "--name", f"f4-{i}")
            walls.append(wall)
            parts.append(f["timings"])
            extra["fork_memory"] = f["memory"]
            if i == forks - 1:  # memory of 4 forked clones (kept for the PSS measurement)
                extra["pss_kib_fork4"] = vm_pss(e, [c["name"] for c in f["clones"]])
            for c in f["clones"]:
                e.banger("vm", "delete", "-f", c["name"])
        res["fork4"] = stats(walls)
        extra["fork4_parts_ms"] = parts
        e.banger("vm", "delete", "-f", "fsrc")
        e.banger("snapshot", "rm", "fsnap")

        cold4 = [f"c4-{i}" for i in range(4)]
        for name in cold4:
            e.banger("vm", "create", "--name", name, "--cold")
        extra["pss_kib_cold4"] = vm_pss(e, cold4)
        for name in cold4:
            e.banger("vm", "delete", "-f", name)
        e.banger("pool", "warm", "--vms", "4")
        pooled4 = [f"p4-{i}" for i in range(4)]
        for name in pooled4:
            e.banger("vm", "create", "--name", name)
        extra["pss_kib_pooled4"] = vm_pss(e, pooled4)
        for name in pooled4:
            e.banger("vm", "delete", "-f", name)
    finally:
        run_in_ns(ns, banger_argv("pool", "drain", "--vms"), env)
        for v in json.loads(run_in_ns(ns, banger_argv("vm", "list", "--all", "--json"), env).stdout or "{}").get(
                "data") or []:
            run_in_ns(ns, banger_argv("vm", "delete", "-f", v["id"]), env)
        run_in_ns(ns, banger_argv("gc"), env)
        run_in_ns(ns, banger_argv("pool", "drain"), env)
        delete_netns(ns)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)

    def avg(xs):
        return round(sum(xs) / len(xs) / 1024, 1) if xs else float("nan")

    memory = {"pss_mib_per_vm": {"fork4": avg(extra["pss_kib_fork4"]), "cold4": avg(extra["pss_kib_cold4"]),
                                 "pooled4": avg(extra["pss_kib_pooled4"])},
              "fork_memory": extra.get("fork_memory")}
    cold, pooled = res["cold_create"]["p50"], res["pooled_create"]["p50"]
    speedup = round(cold / pooled, 2) if pooled else float("nan")
    ratio = round(res["fork4"]["p50"] / res["restore"]["p50"], 2)

    from bench.targets import target

    targets = [
        target("pooled create to SSH-ready p50", pooled, "<=", 800, "ms"),
        target("pooled create speed-up over cold (p50)", speedup, ">=", 5, "x"),
        target("vm run --rm -- true pooled p50", res["pooled_run_rm_true"]["p50"], "<=", 1500, "ms"),
        target("fork of 4 to all answering / one restore (p50)", ratio, "<=", 2, "x"),
    ]
    doc = {"n": n, "backend": tpl["backend"], "results_ms": res, "memory": memory,
           "template_build_ms": extra["template_build_ms"], "fork4_parts_ms": extra["fork4_parts_ms"],
           "targets": targets}
    if a.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"instant paths ({tpl['backend']}), n={n}; CLI wall time in ms, p50 / p95")
    for k, v in res.items():
        print(f"  {k:<26} {v['p50']:>9.1f} / {v['p95']:>9.1f}")
    print(f"  PSS per VM (MiB): fork of 4 {memory['pss_mib_per_vm']['fork4']}, 4 cold "
          f"{memory['pss_mib_per_vm']['cold4']}, 4 pooled {memory['pss_mib_per_vm']['pooled4']}; "
          f"{memory['fork_memory']}")
    for t in targets:
        print(f"  target {t['name']}: {t['value']} {t['unit']} {t['op']} {t['limit']}: "
              f"{'met' if t['met'] else 'MISSED'}")


if __name__ == "__main__":
    main()
