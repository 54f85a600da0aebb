"""Throwaway network namespaces for tests that touch real host networking.

Nothing here (and nothing a test runs through it) touches the host's own network
namespace: every banger process is started with ``ip netns exec <ns> ...``, and
independent checks (``ip -j``, ``nft -j``, /proc/sys) run inside the namespace too.

General enough for whole-product tests (VM e2e): ``run_in_ns(ns, argv, env)`` runs
any argv in the namespace; the ``netns`` fixture yields an object with the
namespace name, an isolated banger environment (BANGER_HOME / BANGER_RUN from the
``banger_env`` fixture) and helpers (banger(), banger_json(), py(), ip_json(), ...).

Usage::

    from tests.support.netns import netns  # noqa: F401  (the fixture)

    def test_x(netns):
        netns.banger_json("pool", "warm", "2")
        assert len(netns.links(prefix="tap-pool-")) == 2
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NETNS_DIR = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")


def create_netns(prefix: str = "bgt") -> str:
    """Create a uniquely named netns with loopback up; return its name."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, text=True)
    try:
        run_in_ns(name, ["ip", "link", "set", "lo", "up"], check=True)
    except BaseException:
        delete_netns(name)
        raise
    return name


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def delete_netns(name: str, timeout: float = 10.0) -> None:
    """Delete the namespace and verify it is gone (poll to a deadline)."""
    subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
    deadline = time.monotonic() + timeout
    while netns_exists(name):
        if time.monotonic() > deadline:
            raise AssertionError(f"network namespace {name} still present after ip netns del")
        time.sleep(0.05)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)


def ns_argv(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *map(str, argv)]


def run_in_ns(ns: str, argv: list[str], env: dict | None = None, *, check: bool = False, input: str | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``argv`` inside namespace ``ns`` (its own process) and capture its output."""
    cp = subprocess.run(ns_argv(ns, argv), env=env or os.environ.copy(), capture_output=True, text=True,
                        input=input, timeout=timeout)
    if check and cp.returncode != 0:
        raise AssertionError(f"in netns {ns}: {' '.join(map(str, argv))} exited {cp.returncode}\n"
                             f"stdout:\n{cp.stdout}\nstderr:\n{cp.stderr}")
    return cp


def spawn_in_ns(ns: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(ns_argv(ns, argv), env=env or os.environ.copy(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def banger_argv(*args) -> list[str]:
    return [sys.executable, "-m", "banger.cli.main", *map(str, args)]


def py_argv(code: str, *args) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]


_CALL = """
import json, sys, time
from banger.net import netlink
from banger.net import nft
from banger.context import Ctx
from banger.errors import BangerError
from banger.net import bridge as hostnet
from banger.net import pool
from banger.net import policy, ports, publish, hosts, dns  # noqa: F401
ctx = Ctx()
if len(sys.argv) > 2 and sys.argv[2]:
    from tests.support.procs import barrier_wait
    barrier_wait(sys.argv[2])
try:
    res = {"value": eval(sys.argv[1])}
except BangerError as e:
    res = {"error": e.code, "exit": e.exit_code, "message": e.message, "hint": e.hint}
print(json.dumps(res, default=str))
"""


def result(doc: dict):
    """The value of a call() result, or an AssertionError carrying the banger error."""
    if "error" in doc:
        raise AssertionError(f"banger error: {doc}")
    return doc["value"]


@dataclass
class NetNS:
    """A live throwaway namespace plus an isolated banger environment."""

    name: str
    env: dict
    home: Path
    run_dir: Path
    etc: Path | None = None  # /etc/netns/<name>: files here replace /etc/<file> inside the namespace
    _cleanups: list = field(default_factory=list)

    # ---- running things inside ----
    def run(self, argv: list[str], *, check: bool = False, input: str | None = None, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
        return run_in_ns(self.name, argv, env or self.env, check=check, input=input, timeout=timeout)

    def spawn(self, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        return spawn_in_ns(self.name, argv, env or self.env)

    def banger(self, *args, check: bool = True, timeout: float = 600, env: dict | None = None):
        cp = self.run(banger_argv(*args), timeout=timeout, env=env)
        if check and cp.returncode != 0:
            raise AssertionError(f"banger {' '.join(map(str, args))} (netns {self.name}) exited {cp.returncode}\n"
                                 f"stdout:\n{cp.stdout}\nstderr:\n{cp.stderr}")
        return cp

    def banger_json(self, *args, check: bool = True, timeout: float = 600, env: dict | None = None) -> dict:
        cp = self.run(banger_argv(*args, "--json"), timeout=timeout, env=env)
        try:
            doc = json.loads(cp.stdout)
        except json.JSONDecodeError as e:
            raise AssertionError(f"not JSON from banger {args}: {cp.stdout!r}\nstderr:{cp.stderr}") from e
        doc["_exit"] = cp.returncode
        if check and not doc.get("ok"):
            raise AssertionError(f"banger {args} failed (exit {cp.returncode}): {doc}\nstderr:{cp.stderr}")
        return doc

    def py(self, code: str, *args, check: bool = True, timeout: float = 600):
        """Run a Python snippet inside the namespace; returns the JSON on its last stdout line."""
        cp = self.run(py_argv(code, *args), timeout=timeout)
        if check and cp.returncode != 0:
            raise AssertionError(f"snippet failed in {self.name} (exit {cp.returncode}):\n{cp.stderr}")
        lines = cp.stdout.strip().splitlines()
        return json.loads(lines[-1]) if lines else None

    def spawn_py(self, code: str, *args) -> subprocess.Popen:
        return self.spawn(py_argv(code, *args))

    def call(self, expr: str, *, check: bool = True, timeout: float = 600):
        """Evaluate one banger service expression in a fresh process inside the namespace.

        ``ctx`` (a banger Ctx for this env), ``hostnet``, ``pool``, ``netlink``, ``nft``,
        ``policy``, ``ports``, ``hosts`` and ``dns`` are in scope.  Returns the JSON-able result,
        or {"error": code, "exit": n, ...} for a BangerError.
        """
        cp = self.run(py_argv(_CALL, expr), timeout=timeout)
        if check and cp.returncode != 0:
            raise AssertionError(f"{expr} crashed in {self.name} (exit {cp.returncode}):\n{cp.stderr}")
        return json.loads(cp.stdout.strip().splitlines()[-1])

    def spawn_call(self, expr: str, barrier=None) -> subprocess.Popen:
        """Like call() but in the background; with ``barrier`` (a tests.support.procs.Barrier) it waits,
        ready, until the barrier is released before evaluating (a real barrier, not a wall-clock time)."""
        return self.spawn(py_argv(_CALL, expr, "" if barrier is None else str(barrier.path)))

    # ---- independent checks (iproute2 / nft / procfs inside the namespace) ----
    def ip_json(self, *args) -> list:
        cp = self.run(["ip", "-j", *args], check=True)
        return json.loads(cp.stdout or "[]")

    def links(self, prefix: str | None = None, details: bool = False) -> list[dict]:
        out = self.ip_json(*(["-d"] if details else []), "link", "show")
        return [x for x in out if prefix is None or x["ifname"].startswith(prefix)]

    def link(self, name: str, details: bool = True) -> dict | None:
        return next((x for x in self.links(details=details) if x["ifname"] == name), None)

    def addrs(self, dev: str) -> list[str]:
        out = self.ip_json("-4", "addr", "show", "dev", dev)
        return [f"{a['local']}/{a['prefixlen']}" for x in out for a in x.get("addr_info", [])]

    def neighbours(self, dev: str) -> list[dict]:
        return self.ip_json("neigh", "show", "dev", dev)

    def nft_ruleset(self) -> list[dict]:
        cp = self.run(["nft", "-j", "list", "ruleset"], check=True)
        return json.loads(cp.stdout or '{"nftables": []}')["nftables"]

    def sysctl(self, key: str) -> str:
        cp = self.run(["cat", "/proc/sys/" + key.replace(".", "/")], check=True)
        return cp.stdout.strip()

    def set_sysctl(self, key: str, value: str) -> None:
        self.run(["sh", "-c", f"echo {value} > /proc/sys/{key.replace('.', '/')}"], check=True)


@pytest.fixture
def netns(banger_env):
    """A throwaway netns (deleted and verified gone afterwards) + an isolated banger env."""
    if os.geteuid() != 0:
        pytest.fail("network namespace tests need root (the integration tier runs as root)")
    name = create_netns()
    env = dict(banger_env["env"])
    # `ip netns exec` bind-mounts /etc/netns/<ns>/* over /etc/*: VM names that banger writes there are
    # what the namespace's resolver sees as /etc/hosts (the real /etc/hosts is never touched)
    etc = NETNS_ETC / name
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    env["BANGER_HOSTS_FILE"] = str(etc / "hosts")
    ns = NetNS(name=name, env=env, home=banger_env["home"], run_dir=banger_env["run"], etc=etc)
    try:
        yield ns
    finally:
        delete_netns(name)
        shutil.rmtree(etc, ignore_errors=True)
        assert not netns_exists(name)
