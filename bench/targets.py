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
