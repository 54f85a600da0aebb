"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s bench`, `nox -s smoke`.

Tests need root (netns, TAP, loop devices, userfaultfd) and the Debian packages
that scripts/test.sh installs.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


def _bytecode_env(session) -> dict:
    """Every banger process a test starts imports the checkout: keep its bytecode outside the tree, so
    each of those thousands of processes does not recompile ~100 modules."""
    # (in the session's venv dir; not session.create_tmp(), which would also point TMPDIR, and so every
    # test's tmp_path, into the checkout: inside its git repository)
    return {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": os.path.join(session.virtualenv.location, "pycache")}


def _install(session):
    session.install("-q", ".[test]")
    # pytest runs from the checkout, so `import banger` resolves to the source tree: build the
    # C extension there too (the installed copy has its own).
    session.run("python", "setup.py", "-q", "build_ext", "--inplace", silent=True)


@nox.session
def tests(session):
    """Every tier: unit, integration (root, real host facilities), e2e (real QEMU guests)."""
    _install(session)
    args = session.posargs or ["tests", "-q", "-p", "no:cacheprovider", "--durations=15"]
    session.run("python", "-m", "pytest", *args, env=_bytecode_env(session))


@nox.session
def unit(session):
    """Fast tests only: no root facilities, no guests."""
    _install(session)
    session.run("python", "-m", "pytest", "tests/unit", "-q", *session.posargs)


@nox.session
def smoke(session):
    """User-level scenarios 4 at a time on one shared BANGER_HOME + one netns, then prune/gc/pool drain
    alone (tests/smoke/run.py; root, real QEMU guests; a few minutes). Pass --jobs N / --only NAME."""
    _install(session)
    session.run("python", "-m", "tests.smoke.run", *(session.posargs or ["--jobs", "4"]),
                env=_bytecode_env(session))


@nox.session
def lint(session):
    session.install("-q", "ruff")
    session.run("ruff", "check", "banger", "tests", "bench", "noxfile.py", "setup.py")


@nox.session
def bench(session):
    """Benchmarks with their targets (bench/README.md). Pass a name to run one: nox -s bench -- startup"""
    _install(session)
    which = session.posargs or ["startup", "uffd", "restore", "create"]
    for name in which:
        session.run("python", f"bench/{name}.py", env={"BENCH_BANGER": os.path.join(session.bin, "banger")})
