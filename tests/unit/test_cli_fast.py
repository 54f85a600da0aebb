"""The typer-free path of `vm create` / `vm run` (banger/cli/fast.py) takes exactly what typer takes:
its option table is generated from the typer commands (and must be current), and for every argv it
accepts it passes the body the same keyword arguments typer would; anything else goes to typer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from banger.cli import fast

ROOT = Path(__file__).resolve().parents[2]

CASES = [
    ["vm", "create"],
    ["vm", "create", "--name", "dev", "--json"],
    ["vm", "create", "--name=dev", "--vcpu", "2", "--memory", "2G", "--nat", "--no-wait"],
    ["vm", "create", "-p", "8080:80", "-p", "5353:53/udp", "--allow", "10.0.0.0/8", "--ttl", "30m", "--cold"],
    ["vm", "create", "--net", "none", "--no-start", "--work-disk-size", "8G", "--overlay-size", "4G"],
    ["vm", "run", "--rm"],
    ["vm", "run", "--rm", "--name", "x", "--", "uname", "-r"],
    ["vm", "run", "--json", "--image", "debian-bookworm", "--", "sh", "-c", "echo --name"],
    ["vm", "run", "--backend", "qemu", "--kernel", "k", "--no-work-seed", "--", "true"],
]
TYPER_ONLY = [
    ["vm", "create", "--help"],
    ["vm", "create", "--bogus"],
    ["vm", "create", "--name"],                  # missing value: typer's message
    ["vm", "run", "--rm=yes"],                    # a flag with a value
    ["vm", "create", "extra-positional"],
]


def test_the_generated_option_table_is_current():
    from banger.cli import fastspec

    assert fastspec.SPECS == fast.generate(), "run: python -m banger.cli.fast"


def _typer_kwargs(argv, monkeypatch):
    """What the typer command passes its body (the body is replaced by a recorder)."""
    import importlib

    from banger.cli import vm, vm_create
    from banger.cli.main import build_app

    importlib.reload(vm)  # build_app keeps only the invoked command of a noun's app: start from all of them
    got = {}
    verb = argv[1]
    monkeypatch.setattr(vm_create, verb, lambda **kw: got.update(kw))
    build_app(argv)(args=argv, prog_name="banger", standalone_mode=False)
    return got


@pytest.mark.parametrize("argv", CASES, ids=[" ".join(c[1:]) for c in CASES])
def test_fast_path_passes_what_typer_passes(argv, monkeypatch):
    from banger.cli.fastspec import SPECS

    assert fast.parse(SPECS[" ".join(argv[:2])], argv[2:]) == _typer_kwargs(argv, monkeypatch)


@pytest.mark.parametrize("argv", TYPER_ONLY, ids=[" ".join(c[1:]) for c in TYPER_ONLY])
def test_anything_else_takes_the_typer_path(argv):
    from banger.cli.fastspec import SPECS

    assert fast.parse(SPECS[" ".join(argv[:2])], argv[2:]) is None


def test_vm_create_never_imports_typer(tmp_path):
    """A bad create (so nothing is built) through the fast path: its JSON error, and no typer loaded."""
    code = ("import sys; from banger.cli.main import main\n"
            "try:\n    main(['vm', 'create', '--name', 'Bad_Name', '--json'])\n"
            "except SystemExit as e:\n    print('EXIT', e.code, 'typer' in sys.modules, file=sys.stderr)\n")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "BANGER_HOME": str(tmp_path / "h"),
           "BANGER_RUN": str(tmp_path / "r")}
    cp = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert '"ok": false' in cp.stdout and "EXIT 2 False" in cp.stderr, (cp.stdout, cp.stderr)
