"""The ways an image comes into being: one module each, one line here.

A source module builds a root filesystem in a private staging dir and publishes it through
banger.images.service (``new_staging``, ``single_flight``, ``publish``; banger.images.finalize for
the guest setup and packing). It exposes ``KIND`` (the ``kind`` its image rows carry). A source
that the image catalog (banger/data/images.json, ``"kind"``) can name also exposes
``from_catalog(ctx, name, entry) -> row`` (what ``vm create`` auto-pulls) and
``catalog_hint(name, entry) -> str`` (the command a user would type).

Adding a source = its module here + one line in SOURCES (+ its verb in banger/cli/image.py, and
catalog entries of that kind if the catalog should name it). Importing this module imports no
source; ``source(kind)`` imports only that one.
"""

from __future__ import annotations

SOURCES: dict[str, str] = {
    "debootstrap": "banger.images.sources.debootstrap",
    "oci": "banger.images.sources.oci.pull",
    "registered": "banger.images.sources.register",
    "promoted": "banger.images.sources.promote",
}


def source(kind: str):
    import importlib

    if kind not in SOURCES:
        from banger.errors import UsageError

        raise UsageError(f"unknown image source {kind!r}", f"use one of: {', '.join(SOURCES)}")
    return importlib.import_module(SOURCES[kind])


def catalog_source(kind, name: str):
    """The source module a catalog entry of ``kind`` is fetched with."""
    mod = source(kind) if kind in SOURCES else None
    if mod is None or not hasattr(mod, "from_catalog"):
        from banger.errors import UsageError

        raise UsageError(f"catalog entry {name!r} has an unknown kind {kind!r}", "this is a bug in banger's catalog")
    return mod
