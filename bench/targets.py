"""The shape every benchmark's --json ends with, so targets can be checked by script:
``"targets": [{"name", "value", "op" ("<=" or ">="), "limit", "unit", "met"}]``."""

from __future__ import annotations

import math


def target(name: str, value: float, op: str, limit: float, unit: str) -> dict:
    """One entry of the ``targets`` list (a NaN value never counts as met)."""
    if op not in ("<=", ">="):
        raise ValueError(f"op must be <= or >=, not {op!r}")
    value = round(float(value), 2)
    met = not math.isnan(value) and (value <= limit if op == "<=" else value >= limit)
    return {"name": name, "value": value, "op": op, "limit": limit, "unit": unit, "met": bool(met)}


def with_targets(doc: dict, targets: list[dict]) -> dict:
    """``doc`` with ``targets`` as its last key."""
    out = {k: v for k, v in doc.items() if k != "targets"}
    out["targets"] = targets
    return out


def installed_like(root) -> None:
    """Byte-compile the checkout's banger package, as `pip install` does for an installed one: with
    PYTHONDONTWRITEBYTECODE set (common in CI and dev shells), every run of a source checkout would
    otherwise recompile each module it imports (~100 ms per `vm create`), which no installed banger pays."""
    import compileall
    from pathlib import Path

    compileall.compile_dir(str(Path(root) / "banger"), quiet=1)


def cli_argv(root, *args) -> list[str]:
    """banger as its console script runs it (``entry()``; no ``-m``, whose runpy costs a few ms that no
    installed banger pays), from the checkout at ``root``."""
    import sys

    code = f"import sys; sys.path.insert(0, {str(root)!r}); sys.argv[0] = 'banger'; " \
           "from banger.cli.main import entry; entry()"
    return [sys.executable, "-c", code, *map(str, args)]
