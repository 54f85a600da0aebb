"""Shared fixtures: every test gets its own BANGER_HOME and BANGER_RUN.

Area-specific fixtures live in tests/support/<area>.py and are imported by the
test modules that need them (keeps one conftest, owned by nobody in particular).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        p = str(item.fspath)
        if f"{os.sep}integration{os.sep}" in p:
            item.add_marker(pytest.mark.integration)
        elif f"{os.sep}e2e{os.sep}" in p:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def banger_env(tmp_path, monkeypatch):
    """Isolated state + runtime dirs. Runtime dir is short (unix socket paths are limited to 107 bytes)."""
    home = tmp_path / "home"
    run = Path(tempfile.mkdtemp(prefix="bgr-", dir="/tmp"))
    home.mkdir()
    monkeypatch.setenv("BANGER_HOME", str(home))
    monkeypatch.setenv("BANGER_RUN", str(run))
    # VM names go to a hosts file of this test, never the real /etc/hosts (netns tests: /etc/netns/NS/hosts)
    monkeypatch.setenv("BANGER_HOSTS_FILE", str(tmp_path / "hosts"))
    yield {"home": home, "run": run, "env": dict(os.environ)}
    shutil.rmtree(run, ignore_errors=True)


@pytest.fixture
def cfg(banger_env):
    from banger.config import load_config

    return load_config()
