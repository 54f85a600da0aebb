"""The bad-input table: flags, config.toml and the environment, through the real CLI (its own process).

Each row asserts the documented exit code, exactly one JSON envelope on stdout with the error code,
a message naming the field, and that nothing was reserved or written (no VM row, no VM dir, no staging
dir, no lock held in a VM's name). Every command fails before it reaches the network or a VMM; as a
guard, the environment names a default image and kernel that do not exist, so a row that slipped
through validation would end as not_found (exit 3), never build anything.
(Registry metadata is covered by the OCI tests: tests/integration/test_oci_pull.py.)
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

GUARD = {"BANGER_DEFAULT_IMAGE": "no-such-image-x", "BANGER_DEFAULT_KERNEL": "no-such-kernel-x"}


def run(env: dict, *args, input: str | None = None) -> tuple[int, dict, str]:
    args = list(args)
    at = args.index("--") if "--" in args else len(args)
    args[at:at] = ["--json"]
    cp = subprocess.run([sys.executable, "-m", "banger.cli.main", *args], env=env, capture_output=True,
                        text=True, timeout=120, input=input)
    lines = cp.stdout.splitlines()
    assert len(lines) == 1, f"want exactly one JSON envelope on stdout, got {cp.stdout!r}\nstderr: {cp.stderr}"
    assert "Traceback" not in cp.stderr, cp.stderr
    return cp.returncode, json.loads(lines[0]), cp.stderr


def nothing_reserved(home: Path) -> None:
    db = home / "state.db"
    if db.exists():
        with sqlite3.connect(db) as c:
            tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "vms" in tables:
                assert c.execute("SELECT name, state FROM vms").fetchall() == []
    for sub in ("vms", "staging", "snapshots"):
        d = home / sub
        assert not d.exists() or not any(d.iterdir()), f"{d} holds {list(d.iterdir())}"


@pytest.fixture
def env(banger_env):
    return {**banger_env["env"], **GUARD}


FLAG_ROWS = [
    # argv, error code, what the message must name
    (["vm", "create", "--memory", "1e9T"], "invalid_input", "--memory: invalid value '1e9T'"),
    (["vm", "create", "--memory", "inf"], "invalid_input", "--memory: invalid value 'inf'"),
    (["vm", "create", "--memory", "nan"], "invalid_input", "--memory: invalid value 'nan'"),
    (["vm", "create", "--memory", "-512M"], "invalid_input", "--memory"),
    (["vm", "create", "--memory", "0"], "invalid_input", "--memory"),
    (["vm", "create", "--vcpu", "0"], "invalid_input", "--vcpu: invalid value '0': a whole number from 1 to 64"),
    (["vm", "create", "--vcpu", "1000"], "invalid_input", "--vcpu"),
    (["vm", "create", "--backend", "xen"], "invalid_input", "one of: auto, firecracker, qemu"),
    (["vm", "create", "--name", ""], "invalid_input", "--name: invalid value ''"),
    (["vm", "create", "--name", "Bad_Name"], "invalid_input", "--name"),
    (["vm", "create", "--overlay-size", "17T"], "invalid_input", "--overlay-size"),
    (["vm", "create", "--work-disk-size", "1e9T"], "invalid_input", "--work-disk-size"),
    (["vm", "create", "--image", ""], "invalid_input", "--image"),
    (["vm", "run", "--vcpu", "0", "--rm", "--", "true"], "invalid_input", "--vcpu"),
    (["vm", "run", "--memory", "1e9T"], "invalid_input", "--memory"),
    (["vm", "set", "some-vm", "--vcpu", "0"], "invalid_input", "--vcpu"),
    (["vm", "stop", "some-vm", "--timeout", "inf"], "invalid_input", "--timeout"),
    (["vm", "stop", "some-vm", "--timeout", "nan"], "invalid_input", "--timeout"),
    (["vm", "restore", "snap", "--name", ""], "invalid_input", "--name"),
    (["snapshot", "restore", "snap", "--name", "UPPER"], "invalid_input", "--name"),
    (["snapshot", "create", "some-vm", "Bad_Name"], "invalid_input", "NAME"),
    (["image", "pull", "alpine", "--name", ""], "invalid_input", "--name: invalid value ''"),
    (["image", "pull", "alpine", "--name", "   "], "invalid_input", "--name"),
    (["kernel", "pull", "--sha256", "xyz"], "invalid_input", "--sha256"),
    (["kernel", "import", "/nonexistent", "--name", ""], "invalid_input", "--name"),
    (["pool", "warm", "100000"], "invalid_input", "N: invalid value '100000'"),
    (["pool", "warm", "-1"], "usage", "-1"),  # click reads it as an option: its own usage error, same envelope
    (["workspace", "import", "some-vm", ".", "--dest", ""], "invalid_input", "--dest"),
]


@pytest.mark.parametrize("argv,code,names", FLAG_ROWS, ids=[" ".join(r[0]) for r in FLAG_ROWS])
def test_bad_flags(env, banger_env, argv, code, names):
    rc, doc, _ = run(env, *argv)
    assert rc == 2, doc
    assert doc["ok"] is False and doc["error"]["code"] == code, doc
    assert names in doc["error"]["message"], doc
    assert doc["error"]["hint"]
    nothing_reserved(banger_env["home"])


def test_huge_disk_fails_before_the_name_is_reserved(env, banger_env):
    """Inside the per-field maximum but larger than the filesystem holding BANGER_HOME: refused up front;
    the name stays free (before: an `error` row held it)."""
    total_mib = os.statvfs(banger_env["home"]).f_blocks * os.statvfs(banger_env["home"]).f_frsize >> 20
    want = min(16 << 20, total_mib + 1024)
    rc, doc, _ = run(env, "vm", "create", "--name", "keep-me", "--overlay-size", str(want))
    assert rc == 2 and doc["error"]["code"] == "invalid_input", doc
    assert "--overlay-size" in doc["error"]["message"] and "filesystem holding" in doc["error"]["message"]
    nothing_reserved(banger_env["home"])
    # the name is still free: the guard (a missing default image) is the next thing to fail
    rc, doc, _ = run(env, "vm", "create", "--name", "keep-me", "--overlay-size", "4G")
    assert rc == 3 and doc["error"]["code"] == "not_found", doc
    nothing_reserved(banger_env["home"])


CONFIG_ROWS = [
    # config text, error code, message must contain (the line is the one holding the key)
    ('nat = "maybe"\n', "invalid_input", "config.toml line 1: nat: invalid value 'maybe': true or false"),
    ("vcpu = 0\n", "invalid_input", "line 1: vcpu"),
    ("# sizes\nmemory_mib = \"1e9T\"\n", "invalid_input", "line 2: memory_mib"),
    ("memory_mib = inf\n", "invalid_input", "memory_mib"),
    ("memory_mib = nan\n", "invalid_input", "memory_mib"),
    ("overlay_size_mib = -1\n", "invalid_input", "overlay_size_mib"),
    ('backend = "xen"\n', "invalid_input", "one of: auto, firecracker, qemu"),
    ("ssh_timeout_s = inf\n", "invalid_input", "ssh_timeout_s"),
    ('subnet = "10.0.0.0/31"\n', "invalid_input", "subnet"),
    ('bridge = "this-name-is-far-too-long"\n', "invalid_input", "bridge"),
    ("vcpu = 2\nmemroy_mib = 2048\n", "invalid_input", "line 2: memroy_mib"),
    ("nat =\n", "usage", "invalid config file"),
    ("vcpu = [1, 2]\n", "invalid_input", "vcpu"),
    ("[vcpu]\nx = 1\n", "invalid_input", "line 1: vcpu"),
    ('dns = "not-an-ip"\n', "invalid_input", "dns"),
]

COMMANDS = [["vm", "list"], ["vm", "show", "x"], ["image", "list"], ["kernel", "list"], ["snapshot", "list"],
            ["pool", "status"], ["gc", "--dry-run"], ["doctor"], ["vm", "create"]]


@pytest.mark.parametrize("text,code,names", CONFIG_ROWS, ids=[r[0].strip() for r in CONFIG_ROWS])
def test_bad_config_file(env, banger_env, text, code, names):
    conf = banger_env["home"] / "config.toml"
    conf.write_text(text)
    for argv in COMMANDS:  # on every command: the fast path, typer commands, doctor, create
        rc, doc, _ = run(env, *argv)
        assert rc == 2, (argv, doc)
        assert doc["error"]["code"] == code and names in doc["error"]["message"], (argv, doc)
        assert str(conf) in doc["error"]["message"] and doc["error"]["hint"]
    nothing_reserved(banger_env["home"])


def test_a_typo_names_the_key_it_resembles(env, banger_env):
    (banger_env["home"] / "config.toml").write_text("memroy_mib = 2048\n")
    rc, doc, _ = run(env, "vm", "list")
    assert rc == 2 and "did you mean 'memory_mib'" in doc["error"]["message"]
    assert "known keys:" in doc["error"]["message"] and "memory_mib" in doc["error"]["hint"]


def test_an_unknown_key_resembling_none_is_a_warning(env, banger_env):
    (banger_env["home"] / "config.toml").write_text("frobnicate_everything = 1\n")
    rc, doc, err = run(env, "vm", "list")
    assert rc == 0 and doc == {"ok": True, "data": []}
    assert "frobnicate_everything: unknown key ignored" in err and "known keys:" in err


def test_a_good_config_is_taken(env, banger_env):
    (banger_env["home"] / "config.toml").write_text('nat = true\nmemory_mib = "2G"\nvcpu = 2\n')
    from banger.config import load_config

    cfg = load_config({**env})
    assert cfg.nat is True and cfg.memory_mib == 2048 and cfg.vcpu == 2


ENV_ROWS = [
    ({"BANGER_BACKEND": "xen"}, "BANGER_BACKEND: invalid value 'xen'"),
    ({"BANGER_SUBNET": "300.1.1.0/24"}, "BANGER_SUBNET"),
    ({"BANGER_BRIDGE": "bad name"}, "BANGER_BRIDGE"),
    ({"BANGER_CONFIG": "/nonexistent/banger.toml"}, "BANGER_CONFIG"),
    ({"BANGER_UFFD": "maybe"}, "BANGER_UFFD: invalid value 'maybe': true or false"),
    ({"BANGER_HOME": "relative/home"}, "BANGER_HOME: invalid value 'relative/home': an absolute path"),
]


@pytest.mark.parametrize("extra,names", ENV_ROWS, ids=[next(iter(r[0])) + "=" + next(iter(r[0].values()))
                                                       for r in ENV_ROWS])
def test_bad_environment(env, banger_env, extra, names):
    for argv in (["vm", "list"], ["vm", "create"], ["image", "list"]):
        rc, doc, _ = run({**env, **extra}, *argv)
        assert rc == 2 and doc["error"]["code"] == "invalid_input" and names in doc["error"]["message"], doc
    nothing_reserved(banger_env["home"])


def test_banger_home_not_a_directory(env, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    for home in (f, f / "below"):
        for argv in (["vm", "list"], ["vm", "create"], ["doctor"]):
            rc, doc, _ = run({**env, "BANGER_HOME": str(home)}, *argv)
            assert rc == 2 and doc["error"]["code"] == "invalid_input", doc
            assert doc["error"]["message"].startswith(f"BANGER_HOME: invalid value '{home}'"), doc
    assert f.read_text() == "x"


def test_banger_home_read_only(env, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        for home in (ro, ro / "sub"):
            for argv in (["vm", "list"], ["vm", "create"], ["snapshot", "list"]):
                rc, doc, _ = run({**env, "BANGER_HOME": str(home)}, *argv)
                assert rc == 2 and doc["error"]["code"] == "invalid_input", doc
                assert "BANGER_HOME" in doc["error"]["message"] and "not writable" in doc["error"]["message"]
    finally:
        subprocess.run(["umount", str(ro)], check=True)
