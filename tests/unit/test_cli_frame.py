"""The CLI frame: lazy command table, --json envelope, exit codes, no heavy imports at start."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.cli import banger

GROUPS = ["vm", "image", "kernel", "pool", "snapshot", "workspace", "doctor", "gc"]
HEAVY = ("paramiko", "pyroute2", "requests", "zstandard", "cryptography")


def test_help_lists_groups(banger_env):
    out = banger("--help").stdout
    for g in GROUPS:
        assert f"\n  {g} " in out, g


def test_version(banger_env):
    assert banger("--version").stdout.startswith("banger ")


def test_doctor_json_has_one_entry_per_check(banger_env):
    cp = banger("doctor", "--json", check=False)
    doc = json.loads(cp.stdout)
    assert doc["ok"] is True
    names = [c["name"] for c in doc["data"]["checks"]]
    assert len(names) == len(set(names))
    for required in ("python", "kvm", "firecracker", "qemu", "debootstrap", "busybox", "nftables", "tun",
                     "userfaultfd", "reflink", "disk"):
        assert required in names
    for c in doc["data"]["checks"]:
        assert c["status"] in ("ok", "warn", "fail")
        if c["status"] != "ok":
            assert c["hint"], c
    assert doc["data"]["backend"] in ("qemu", "firecracker")
    assert cp.returncode == (0 if doc["data"]["ok"] else 6)


def test_usage_error_json_envelope(banger_env):
    cp = banger("doctor", "--json", "--no-such-flag", check=False)
    assert cp.returncode == 2
    doc = json.loads(cp.stdout)
    assert doc["ok"] is False and doc["error"]["code"] == "usage"


def test_unknown_command_exit_code(banger_env):
    cp = banger("frobnicate", check=False)
    assert cp.returncode == 2
    assert "No such command" in cp.stderr


def _imported_modules(args, env):
    # main() itself (the program's entry() leaves through os._exit, with no chance to print after it)
    code = ("import sys\nsys.argv=['banger', *sys.argv[1:]]\nfrom banger.cli.main import main\n"
            "try:\n    main()\n"
            "except SystemExit:\n    pass\n"
            "import json\nprint('\\n@@' + json.dumps(sorted(sys.modules)))")
    cp = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60)
    line = [ln for ln in cp.stdout.splitlines() if ln.startswith("@@")][-1]
    return set(json.loads(line[2:]))


@pytest.mark.parametrize("args", [["--help"], ["doctor", "--json"], ["vm", "list", "--json"],
                                  ["image", "list", "--json"], ["kernel", "list", "--json"]])
def test_no_heavy_imports_at_start(banger_env, args):
    mods = _imported_modules(args, banger_env["env"])
    heavy = sorted(m for m in mods if m.split(".")[0] in HEAVY)
    assert not heavy, f"{args} imported {heavy}"


def test_help_imports_no_command_module(banger_env):
    mods = _imported_modules(["--help"], banger_env["env"])
    loaded = sorted(m for m in mods if m.startswith("banger.cli.") and m not in ("banger.cli.main", "banger.cli.commands"))
    assert loaded == [], loaded
    assert "banger.state.store" not in mods and "rich.table" not in mods


def _seed_vms(n: int) -> None:
    from banger.config import load_config
    from banger.names import Subnet
    from banger.state.reservation import reserve_vm
    from banger.state.store import Store

    cfg = load_config()
    with Store(cfg.db_path) as s:
        for i in range(n):
            vm = reserve_vm(s, Subnet(cfg.subnet), name=f"fast-{i}", image="img", kernel="k", backend="qemu", vcpu=1,
                            memory_mib=256, overlay_size_mib=64, work_disk_size_mib=64)
            s.update_vm(vm["id"], state="stopped")


@pytest.mark.parametrize("flags", [[], ["-q"], ["--json"], ["-q", "--json"], ["--quiet"]])
def test_vm_list_fast_path_matches_the_typer_command(banger_env, flags):
    _seed_vms(3)
    fast = banger("vm", "list", *flags)
    slow = banger("--debug", "vm", "list", *flags)  # a leading option forces the typer path
    assert fast.stdout == slow.stdout and fast.returncode == slow.returncode == 0
    if "--json" in flags:
        assert len(json.loads(fast.stdout)["data"]) == 3
    else:
        assert len(fast.stdout.splitlines()) == (3 if flags else 4)  # ids, or header + rows


def test_vm_list_fast_path_imports_no_typer(banger_env):
    _seed_vms(1)
    mods = _imported_modules(["vm", "list", "--json"], banger_env["env"])
    assert "typer" not in mods and "rich" not in mods
    mods = _imported_modules(["vm", "list", "--help"], banger_env["env"])
    assert "typer" in mods  # anything else takes the typer path


def test_top_help_fast_path_matches_typer(banger_env):
    fast = banger("--help").stdout
    assert fast == banger("--debug", "--help").stdout  # typer renders the same root help
    assert banger().stdout == fast
    assert "typer" not in _imported_modules(["--help"], banger_env["env"])
