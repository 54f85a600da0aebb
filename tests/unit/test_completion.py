"""Shell completion: the generated bash script's own completion function, run in a real bash, offers
commands, verbs, flags and the live names from the state database (through `banger __complete`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from banger.names import Subnet
from banger.state.reservation import reserve_vm
from banger.state.store import Store

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def shell_env(tmp_path, cfg):
    """A `banger` on PATH running this checkout against the test's BANGER_HOME, plus the bash script."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "banger"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m banger.cli.main \"$@\"\n")
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "BANGER_HOME": str(cfg.home), "BANGER_RUN": str(cfg.run)}
    script = subprocess.run([str(shim), "completion", "bash"], env=env, capture_output=True, text=True, check=True)
    (tmp_path / "c.bash").write_text(script.stdout)
    return env, tmp_path / "c.bash"


def complete(shell_env, line: str) -> list[str]:
    env, script = shell_env
    words = line.split(" ")  # a trailing space leaves an empty current word, as a shell does
    import shlex

    quoted = " ".join(shlex.quote(w) for w in words)
    prog = (f"source {script}\nCOMP_WORDS=({quoted})\nCOMP_CWORD={len(words) - 1}\n_banger\n"
            + "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    cp = subprocess.run(["bash", "-c", prog], env=env, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    return [x for x in cp.stdout.splitlines() if x]


def test_completion_offers_live_vm_names_after_vm_ssh(shell_env, cfg):
    with Store(cfg.db_path) as s:
        for n in ("alpha", "beta"):
            reserve_vm(s, Subnet(cfg.subnet), name=n, image="i", kernel="k", backend="qemu", vcpu=1,
                       memory_mib=256, overlay_size_mib=64, work_disk_size_mib=64)
    assert complete(shell_env, "banger vm ssh ") == ["alpha", "beta"]
    assert complete(shell_env, "banger vm ssh al") == ["alpha"]
    assert complete(shell_env, "banger vm delete -f alpha ") == ["alpha", "beta"]  # repeated VM... argument


def test_completion_offers_nouns_verbs_flags_and_option_values(shell_env, cfg):
    assert {"vm", "image", "kernel", "snapshot", "pool", "gc", "completion"} <= set(complete(shell_env, "banger "))
    assert {"create", "run", "ssh", "list"} <= set(complete(shell_env, "banger vm "))
    assert {"--name", "--image", "--rm", "--json"} <= set(complete(shell_env, "banger vm run --"))
    assert sorted(complete(shell_env, "banger completion ")) == ["bash", "fish", "zsh"]
    with Store(cfg.db_path) as s:
        s.execute("INSERT INTO images (name, kind, rootfs, created_at) VALUES ('deb', 'x', '/r', 0)")
    assert complete(shell_env, "banger vm create --image ") == ["deb"]
    assert complete(shell_env, "banger vm create --name ") == []  # a free value: nothing to offer


def test_complete_names_is_typer_free_and_quiet_on_a_broken_home(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BANGER_HOME": str(tmp_path / "nohome")}
    code = ("import sys; from banger.cli.main import main; main(['__complete', 'vm']); "
            "assert 'typer' not in sys.modules and 'click' not in sys.modules")
    cp = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0 and cp.stdout == "" and cp.stderr == "", cp.stderr
