"""The kernel catalog: banger/data/kernels.json, or the file named by $BANGER_KERNEL_CATALOG.

Each entry names a kernel and its source (``{"type": "apt" | "url", ...}``, one of
banger.kernels.sources.CATALOG_TYPES)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from banger.errors import UsageError

CATALOG_ENV = "BANGER_KERNEL_CATALOG"


def catalog() -> dict[str, dict]:
    """Catalog entries by name: banger/data/kernels.json, or the file named by $BANGER_KERNEL_CATALOG."""
    from banger.kernels.sources import CATALOG_TYPES

    override = os.environ.get(CATALOG_ENV)
    try:
        if override:
            text = Path(override).read_text()
        else:
            from importlib import resources  # (~4 ms with typing: only when the catalog is read)

            text = resources.files("banger.data").joinpath("kernels.json").read_text()
        doc = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read the kernel catalog {override or 'banger/data/kernels.json'}: {e}",
                         f"fix the file or unset {CATALOG_ENV}") from e
    out = {}
    for entry in doc.get("kernels", []):
        src = entry.get("source") or {}
        if not entry.get("name") or src.get("type") not in CATALOG_TYPES:
            raise UsageError(f"kernel catalog entry {entry!r} needs a name and a source of type "
                             f"{' or '.join(CATALOG_TYPES)}",
                             f"fix the catalog file ({override or 'banger/data/kernels.json'})")
        out[entry["name"]] = entry
    return out


def hint(cat: dict | None = None) -> str:
    cat = catalog() if cat is None else cat
    names = ", ".join(sorted(cat)) or "(none)"
    return f"catalog kernels: {names}; or bring your own with banger kernel import PATH --name NAME"
