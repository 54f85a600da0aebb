"""The kernel command group is wired into the lazy command table."""

from __future__ import annotations

from tests.support.cli import banger


def test_kernel_group_lists_its_commands():
    out = banger("kernel", "--help").stdout
    for cmd in ("pull", "import", "list", "show", "rm"):
        assert cmd in out


def test_every_kernel_command_takes_json():
    for cmd in ("pull", "import", "list", "show", "rm"):
        assert "--json" in banger("kernel", cmd, "--help").stdout, cmd


def test_import_needs_a_name(tmp_path):
    cp = banger("kernel", "import", tmp_path / "x", "--json", check=False)
    assert cp.returncode == 2 and '"code": "usage"' in cp.stdout
