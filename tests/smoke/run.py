"""The smoke suite: user-level scenarios run 4 at a time against ONE shared BANGER_HOME and ONE network
namespace (as several users' scripts and cron jobs share a host), then the global ones (prune, gc,
pool drain, the leak and private-files checks) alone, in a serial phase.

    python -m tests.smoke.run [--jobs 4] [--only NAME ...] [--list]     (root; `nox -s smoke`)

Each scenario is a plain function marked with ``@scenario("parallel" | "serial")``; it drives the real
CLI (its own process per command, inside the namespace) and asserts on what the CLI prints and on the
guest. The last line is ``N passed, M failed``; the exit code is 1 if anything failed.
Real QEMU guests (TCG here): the default kernel and image come from the test cache
(/var/tmp/banger-test-cache), built once if missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCENARIOS: list[tuple[str, str, object]] = []


def scenario(phase: str = "parallel"):
    """The marker: ``parallel`` scenarios share the home 4 at a time; ``serial`` ones run alone, after."""
    assert phase in ("parallel", "serial")

    def mark(fn):
        SCENARIOS.append((fn.__name__.replace("_", "-"), phase, fn))
        return fn

    return mark


class Smoke:
    """The shared world: one netns, one banger home, a local OCI registry; thread-safe log."""

    def __init__(self, ns, work: Path, registry):
        self.ns, self.work, self.registry = ns, work, registry
        self._lock = threading.Lock()

    def say(self, who: str, msg: str) -> None:
        with self._lock:
            print(f"[{time.strftime('%H:%M:%S')}] {who}: {msg}", flush=True)

    def b(self, *args, ok: bool = True, timeout: float = 900, host_ns: bool = False, env: dict | None = None):
        """``banger ARGS --json`` in the namespace; returns the envelope (+ ``_exit``)."""
        from tests.support.netns import banger_argv

        if host_ns:  # registry traffic stays on the host's loopback, where the registry listens
            import json
            import subprocess

            cp = subprocess.run(banger_argv(*args, "--json"), env=env or self.ns.env, capture_output=True,
                                text=True, timeout=timeout)
            doc = json.loads(cp.stdout)
            doc["_exit"] = cp.returncode
            if ok and not doc.get("ok"):
                raise AssertionError(f"banger {' '.join(args)} failed (exit {cp.returncode}): {doc}\n{cp.stderr}")
            return doc
        return self.ns.banger_json(*args, check=ok, timeout=timeout, env=env)

    def sh(self, vm: str, script: str, *args, ok: bool = True) -> str:
        cp = self.ns.banger("vm", "exec", vm, "--", "sh", "-c", script, "sh", *args, check=ok, timeout=300)
        return cp.stdout

    def diagnose(self) -> str:
        """What the bridge had learned when a scenario failed (MAC -> port), the neighbours, the VMs."""
        out = []
        for argv in (["bridge", "fdb", "show", "br", "banger0"], ["ip", "neigh", "show", "dev", "banger0"],
                     ["ip", "-br", "link"]):
            cp = self.ns.run(argv)
            out.append(f"$ {' '.join(argv)}\n{cp.stdout}{cp.stderr}")
        try:
            rows = self.b("vm", "list", ok=False).get("data") or []
            out.append("vms: " + ", ".join(f"{v['name']} {v['state']} {v['ip']} {v['mac']} {v['tap']}" for v in rows))
        except Exception as e:  # noqa: BLE001 - diagnostics only
            out.append(f"vm list failed: {e}")
        return "\n--- diagnostics ---\n" + "\n".join(out)

    def tmp(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.work))


def wide_modes(s: Smoke) -> list[str]:
    """Paths under the home or run dir that group/other can reach (an independent walk; other scenarios
    run meanwhile, so vanishing paths are fine; a staging dir's contents are a guest tree in the making)."""
    import stat

    wide = []
    for root in (s.ns.home, s.ns.run_dir):
        for d, dirs, files in os.walk(root):
            for p in [d, *(os.path.join(d, f) for f in files)]:
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    continue
                if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                    wide.append(f"{p} {stat.S_IMODE(st.st_mode):04o}")
            if d == str(s.ns.home / "staging"):
                dirs[:] = []
    return wide


# ---------------------------------------------------------------------------------------------- parallel
@scenario()
def create_exec_cp_stop_start(s: Smoke, t: str):
    v = s.b("vm", "create", "--name", f"s-life{t}", "--memory", "512")["data"]
    assert v["state"] == "running", v
    assert s.sh(f"s-life{t}", "cat /etc/hostname; hostname").split() == [f"s-life{t}", f"s-life{t}"]
    local = s.tmp("cp") / "payload.bin"
    local.write_bytes(os.urandom(300_000))
    s.b("vm", "cp", str(local), f"s-life{t}:/root/payload.bin")
    assert s.sh(f"s-life{t}", "sha256sum /root/payload.bin").split()[0] == __import__("hashlib").sha256(
        local.read_bytes()).hexdigest()
    back = local.parent / "back.bin"
    s.b("vm", "cp", f"s-life{t}:/root/payload.bin", str(back))
    assert back.read_bytes() == local.read_bytes()
    assert s.b("vm", "stop", f"s-life{t}")["data"]["state"] == "stopped"
    s.b("vm", "set", f"s-life{t}", "--vcpu", "2")
    assert s.b("vm", "start", f"s-life{t}")["data"]["state"] == "running"
    assert s.sh(f"s-life{t}", "nproc; cat /root/payload.bin | wc -c").split() == ["2", "300000"]  # /root persisted
    s.b("vm", "delete", "-f", f"s-life{t}")


@scenario()
def run_rm(s: Smoke, t: str):
    from tests.support.netns import banger_argv

    cp = s.ns.run(banger_argv("vm", "run", "--name", f"s-run{t}", "--memory", "512", "--rm", "--",
                              "sh", "-c", "echo smoke-ran; exit 3"), timeout=900)
    assert cp.returncode == 3 and "smoke-ran" in cp.stdout, (cp.returncode, cp.stdout, cp.stderr[-2000:])
    assert f"s-run{t}" not in {v["name"] for v in s.b("vm", "list")["data"]}


@scenario()
def snapshot_restore(s: Smoke, t: str):
    s.b("vm", "create", "--name", f"s-snap{t}", "--memory", "512")
    s.sh(f"s-snap{t}", "echo disk > /root/d.txt; echo mem > /tmp/m.txt; sync")
    snap = s.b("snapshot", "create", f"s-snap{t}", f"s-snap-1{t}")["data"]
    assert snap["backend"] == "qemu"
    meta = s.b("snapshot", "show", f"s-snap-1{t}")["data"]["meta"]
    assert meta["files"], meta  # the manifest restore verifies
    s.sh(f"s-snap{t}", "echo later > /root/d.txt")
    clone = s.b("vm", "restore", f"s-snap-1{t}", "--name", f"s-clone{t}")["data"]
    src = s.b("vm", "show", f"s-snap{t}")["data"]
    # the bridge must not have learned the source's MAC on the clone's TAP (the clone's memory still held
    # the source's address when it resumed): traffic to the running source would go to the clone
    fdb = s.ns.run(["bridge", "fdb", "show", "br", "banger0"]).stdout.splitlines()
    assert not [ln for ln in fdb if ln.startswith(src["mac"] + " ") and f" dev {clone['tap']} " in ln], fdb
    assert clone["state"] == "running" and "verify_s" in clone["restore"], clone["restore"]
    assert wide_modes(s) == []  # while a clone runs and the snapshot (guest memory, disks) exists
    out = s.sh(f"s-clone{t}", "cat /root/d.txt /tmp/m.txt; hostname; cat /etc/hostname").split()
    assert out == ["disk", "mem", f"s-clone{t}", f"s-clone{t}"], out
    assert s.sh(f"s-snap{t}", "cat /root/d.txt; hostname").split() == ["later", f"s-snap{t}"]
    s.b("vm", "delete", "-f", f"s-clone{t}", f"s-snap{t}")
    s.b("snapshot", "rm", f"s-snap-1{t}")


@scenario()
def workspace_roundtrip(s: Smoke, t: str):
    from tests.support.workspace import make_repo, refs

    repo = make_repo(s.tmp("ws"))
    s.b("vm", "create", "--name", f"s-ws{t}", "--memory", "512")
    d = s.b("workspace", "import", f"s-ws{t}", str(repo))["data"]
    assert d["fresh"] and d["dest"] == "/root/proj", d
    s.sh(f"s-ws{t}", "cd /root/proj && echo g > g.txt && git add g.txt && "
                 "git -c user.name=G -c user.email=g@example.invalid commit -q -m guest")
    e = s.b("workspace", "export", f"s-ws{t}", "--dest-repo", str(repo))["data"]
    assert [b["ref"] for b in e["branches"]] == [f"refs/heads/banger/s-ws{t}/main"], e
    assert f"refs/heads/banger/s-ws{t}/main" in refs(repo, "refs/heads/banger/")
    s.b("vm", "delete", "-f", f"s-ws{t}")


@scenario()
def pull_single_flight(s: Smoke, t: str):
    """Two pulls of one reference at once (host namespace: the registry is on the host's loopback)."""
    from concurrent.futures import ThreadPoolExecutor as Pool

    from tests.support.registry import layer

    img = s.registry.push_image(f"smoke/tiny{t}", "v1", [layer([
        ("dir", "etc", 0o755, 0, 0), ("file", "etc/os-release", b"ID=smoke\n", 0o644, 0, 0),
        ("dir", "bin", 0o755, 0, 0), ("file", "bin/sh", b"#!fake\n", 0o755, 0, 0)])])
    ref = f"{s.registry.host}/smoke/tiny{t}:v1"
    with Pool(2) as p:
        docs = list(p.map(lambda _: s.b("image", "pull", ref, "--name", f"s-tiny{t}", host_ns=True), range(2)))
    assert all(d["data"]["name"] == f"s-tiny{t}" for d in docs), docs
    assert sum(1 for d in docs if d["data"].get("existing")) == 1, docs  # one pulled, the other found it
    assert s.b("image", "show", f"s-tiny{t}")["data"]["digest"] == img["digest"]
    s.b("image", "delete", f"s-tiny{t}")


@scenario()
def name_race(s: Smoke, t: str):
    from tests.support.netns import banger_argv

    procs = [s.ns.spawn(banger_argv("vm", "create", "--name", f"s-race{t}", "--no-start", "--json")) for _ in range(2)]
    codes = sorted(p.wait(timeout=600) for p in procs)
    for p in procs:
        p.communicate()
    assert codes == [0, 4], codes  # exactly one wins the name, the other is a conflict
    s.b("vm", "delete", f"s-race{t}")


@scenario()
def bad_input_reserves_nothing(s: Smoke, t: str):
    for args in (["--vcpu", "0"], ["--memory", "1e9T"], ["--backend", "xen"], ["--name", f"Bad{t}"],
                 ["--name", f"s-bad{t}", "--overlay-size", "16T"]):
        r = s.b("vm", "create", *args, ok=False)
        assert r["_exit"] == 2 and r["error"]["code"] == "invalid_input", r
    rows = s.b("vm", "list")["data"]
    assert not [v for v in rows if v["name"] == f"s-bad{t}" or v["state"] == "error"], rows


# ---------------------------------------------------------------------------------------------- serial
@scenario("serial")
def prune(s: Smoke, t: str = ""):
    s.b("vm", "create", "--name", "s-prune", "--no-start")
    keep = s.b("vm", "create", "--name", "s-keep", "--memory", "512")["data"]
    gone = {x["name"] for x in s.b("vm", "prune", "-f")["data"]}
    assert "s-prune" in gone and "s-keep" not in gone, gone
    assert s.b("vm", "show", "s-keep")["data"]["state"] == "running"
    assert s.sh("s-keep", "echo alive").strip() == "alive"
    s.b("vm", "delete", "-f", keep["id"])


@scenario("serial")
def gc_finds_nothing(s: Smoke, t: str = ""):
    r = s.b("gc")["data"]
    assert r["errors"] == [] and r["total"] == 0, r  # every scenario cleaned up after itself


@scenario("serial")
def pool_drain(s: Smoke, t: str = ""):
    d = s.b("pool", "drain")["data"]
    assert d["claimed_kept"] == 0, d
    st = s.b("pool", "status")["data"]
    assert st["idle"] == 0 and st["claimed"] == 0, st


@scenario("serial")
def nothing_left_and_private(s: Smoke, t: str = ""):
    from tests.support.e2e import leaks

    assert s.b("vm", "list")["data"] == []
    found = leaks(s.ns)
    assert not found, found
    assert wide_modes(s) == []


# ---------------------------------------------------------------------------------------------- runner
def _run_one(s: Smoke, name: str, fn, tag: str = "") -> tuple[str, bool, float, str]:
    t0 = time.monotonic()
    name = f"{name}{'#' + tag if tag else ''}"
    s.say(name, "start")
    try:
        fn(s, tag)
        ok, err = True, ""
    except BaseException as e:  # noqa: BLE001 - reported, the suite goes on
        ok, err = False, "".join(traceback.format_exception(e))[-4000:] + s.diagnose()
    dt = time.monotonic() - t0
    s.say(name, f"{'ok' if ok else 'FAILED'} in {dt:.1f}s" + (f"\n{err}" if err else ""))
    return name, ok, dt, err


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="run each parallel scenario this many times at once")
    ap.add_argument("--only", nargs="*", default=None, help="scenario names")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        for name, phase, _ in SCENARIOS:
            print(f"{phase:8} {name}")
        return 0
    if os.geteuid() != 0:
        print("the smoke suite needs root (netns, TAPs, loop devices)", file=sys.stderr)
        return 2
    os.umask(0o077)  # as every banger command: the private-files check covers what this runner installs too
    from banger.config import load_config
    from tests.support.images import build_default_image_cached, install_image
    from tests.support.kernels import install_kernel, pull_default_kernel_cached
    from tests.support.netns import NetNS, create_netns, delete_netns
    from tests.support.registry import Registry, start_registry, stop_registry

    chosen = [(n, ph, f) for n, ph, f in SCENARIOS if a.only is None or n in a.only]
    t_all = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="banger-smoke-", dir="/var/tmp"))
    home, run = work / "home", Path(tempfile.mkdtemp(prefix="bgr-smoke-", dir="/tmp"))
    home.mkdir()
    env = {**os.environ, "BANGER_HOME": str(home), "BANGER_RUN": str(run),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("BANGER_CONFIG", "BANGER_BACKEND", "BANGER_DEFAULT_IMAGE", "BANGER_DEFAULT_KERNEL"):
        env.pop(k, None)
    nsname = create_netns("bsm")
    reg_proc = None
    results = []
    try:
        print("smoke: preparing the default kernel and image (cached in /var/tmp/banger-test-cache)", flush=True)
        cfg = load_config(env)
        install_kernel(cfg, pull_default_kernel_cached())
        install_image(cfg, build_default_image_cached())
        reg_proc, url = start_registry(work / "registry")
        s = Smoke(NetNS(name=nsname, env=env, home=home, run_dir=run), work, Registry(url))
        s.b("pool", "warm", str(a.jobs))
        # interleaved, so copies of one scenario overlap with each other and with every other one
        par = [(n, f, str(i + 1)) for i in range(a.repeat) for n, ph, f in chosen if ph == "parallel"]
        ser = [(n, f) for n, ph, f in chosen if ph == "serial"]
        print(f"smoke: {len(par)} scenarios, {a.jobs} at a time, on one home ({home}) and one netns ({nsname})",
              flush=True)
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            results += list(pool.map(lambda nft: _run_one(s, *nft), par))
        print(f"smoke: serial phase ({len(ser)})", flush=True)
        for n, f in ser:
            results.append(_run_one(s, n, f, ""))
    finally:
        try:
            from tests.support.netns import banger_argv, run_in_ns

            for v in (NetNS(name=nsname, env=env, home=home, run_dir=run)
                      .banger_json("vm", "list", check=False).get("data") or []):
                run_in_ns(nsname, banger_argv("vm", "delete", "-f", v["id"]), env)
            run_in_ns(nsname, banger_argv("gc"), env)
        finally:
            if reg_proc is not None:
                stop_registry(reg_proc)
            delete_netns(nsname)
            shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in results if not r[1]]
    print("\nsmoke results:")
    for name, ok, dt, _ in results:
        print(f"  {'ok    ' if ok else 'FAILED'} {name:<30} {dt:6.1f}s")
    print(f"smoke: {time.monotonic() - t_all:.0f}s in all")
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
