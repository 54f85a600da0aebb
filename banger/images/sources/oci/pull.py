"""Image source ``oci``: pull an OCI image (linux/amd64), flatten its layers safely, set it up for
banger (banger.images.finalize), pack and publish it. The registry client and the layer applier
are banger.images.sources.oci.registry and .layers."""

from __future__ import annotations

import re
import time
import uuid

from banger.errors import Conflict
from banger.images import finalize
from banger.images import service as images

KIND = "oci"


def catalog_hint(name: str, entry: dict) -> str:
    return f"banger image pull {entry['ref']} --name {name}"


def from_catalog(ctx, name: str, entry: dict) -> dict:
    return pull(ctx, entry["ref"], name, kernel=entry.get("kernel"), exist_ok=True)


def default_name(ref) -> str:
    base = ref.repository.rsplit("/", 1)[-1]
    if ref.tag and ref.tag != "latest":
        base += "-" + ref.tag
    elif ref.digest and not ref.tag:
        base += "-" + ref.digest[7:19]
    base = re.sub(r"[^a-z0-9_-]+", "-", base.lower()).strip("-_") or "image"
    return base[:63]


def pull(ctx, ref: str, name: str | None = None, *, insecure: bool | None = None, kernel: str | None = None,
         exist_ok: bool = True) -> dict:
    """Pull an OCI image (linux/amd64), flatten its layers safely, pack it, publish it as ``name``.

    If ``name`` already exists from the same reference it is returned as is ("existing": true).
    """
    from banger.guest.sshkeys import client_key
    from banger.images.sources.oci.layers import LayerApplier, apply_layer
    from banger.images.sources.oci.registry import Registry, parse_ref

    r = parse_ref(ref)
    name = images.validate_name(name or default_name(r))
    if kernel is None:
        kernel = images.catalog(ctx).get(name, {}).get("kernel") or ctx.cfg.default_kernel
    with images.single_flight(ctx, name):
        row = images.get(ctx, name)
        if row is not None:
            if exist_ok and row["source"] == str(r):
                return {**row, "existing": True}
            raise Conflict(f"image {name!r} already exists (from {row['source']})",
                           f"delete it first (banger image delete {name}) or pull with --name OTHER")
        key = client_key(ctx.cfg)
        staging = images.new_staging(ctx, name)
        try:
            t0 = time.monotonic()
            reg = Registry(r, insecure=insecure, progress=ctx.progress, stall_timeout=ctx.cfg.pull_stall_timeout_s)
            ctx.progress.step(f"resolving {r}")
            im = reg.image_manifest()
            layers = im["manifest"].get("layers", [])
            blobs_dir = ctx.cfg.cache_dir / "blobs"
            paths = []
            for layer in layers:
                paths.append(reg.fetch_blob(layer["digest"], blobs_dir, layer.get("size")))
            t_fetch = time.monotonic() - t0
            tree = staging / "tree"
            applier = LayerApplier(tree, max_bytes=ctx.cfg.max_image_size_mib * (1 << 20))
            with ctx.progress.task("applying layers", len(paths)) as t:
                for layer, p in zip(layers, paths, strict=True):
                    apply_layer(tree, p, applier=applier, layer=layer["digest"][:19])
                    t.advance(1)
            facts = finalize.finalize_tree(tree)
            packed = finalize.pack(ctx, staging, tree, key)
            cfg = (im["config"] or {}).get("config") or {}
            meta = {**facts, **packed, "pull_id": uuid.uuid4().hex, "ref": str(r),
                    "index_digest": im["index_digest"], "config_digest": im["config_digest"],
                    "layers": [{"digest": ly["digest"], "mediaType": ly["mediaType"], "size": ly.get("size")}
                               for ly in layers],
                    "blobs_downloaded": len(reg.fetched), "apply": applier.stats.to_dict(),
                    "skipped_devices": applier.stats.skipped_devices[:50],
                    "config": {k: cfg.get(k) for k in ("Env", "Entrypoint", "Cmd", "WorkingDir", "User")
                               if cfg.get(k) is not None},
                    "fetch_s": round(t_fetch, 2), "pull_s": round(time.monotonic() - t0, 2),
                    "key_fingerprint": key.fingerprint}
            return images.publish(ctx, name, staging, kind=KIND, source=str(r), digest=im["digest"], kernel=kernel,
                                  init=finalize.INIT_PATH, meta=meta)
        finally:
            finalize.rmtree(staging)
