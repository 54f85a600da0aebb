"""Root filesystem images: the store (rows + image dirs), publish, delete, resolve, list/show.

Every way in (a module under banger/images/sources/, listed in banger/images/sources/__init__.py)
has the same shape (ARCHITECTURE.md):
1. slow work in a private staging dir (``new_staging``) with no name lock held (a per-name
   *single-flight* lock ``image/<name>..pull`` (``single_flight``) makes parallel pulls of the
   same name do the work once; it is never held together with anything but the name lock, and
   always taken before it);
2. ``publish``: under ``image/<name>`` re-check the name, rename the staging dir into
   ``cfg.images_dir/<name>`` and upsert the row. Failures remove the staging dir and
   leave no row.

Each image dir holds ``rootfs.ext4`` (read-only lower layer, e2fsck-clean),
``work-seed.ext4`` (the image's /root plus /root/.ssh/authorized_keys with banger's
client key; VMs clone and grow it) and ``meta.json`` (banger/images/finalize.py builds them).

Dependencies point one way: finalize <- service <- sources/* ; ``resolve`` reaches a catalog
entry's source through the sources registry (by name, like the VMM backend registry).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from banger.errors import Conflict, InvalidName, NotFound, UsageError
from banger.host import ext4, fsutil
from banger.images.finalize import INIT_PATH, ROOTFS_NAME, SEED_NAME, make_work_seed, reseed, rmtree

__all__ = ["INIT_PATH", "ROOTFS_NAME", "SEED_NAME", "validate_name", "catalog", "get", "list_images", "show",
           "new_staging", "single_flight", "publish", "delete", "ensure_seed_key", "resolve"]

_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9_-]|\.(?!\.)){0,62}$")


# ---------------------------------------------------------------- names, catalog, rows
def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith("."):
        raise InvalidName(f"invalid image name {name!r}",
                          "use 1-63 characters: lowercase letters, digits, '-', '_' and single dots")
    return name


def catalog(ctx=None) -> dict:
    """The embedded catalog, plus entries from ``image_catalog = "/path.json"`` in config.toml."""
    from importlib import resources

    cat = json.loads(resources.files("banger.data").joinpath("images.json").read_text())
    extra = ctx.cfg.extra.get("image_catalog") if ctx is not None else None
    if extra:
        try:
            cat.update(json.loads(Path(extra).read_text()))
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read image catalog {extra}: {e}", "fix or remove image_catalog in config.toml"
                             ) from e
    return cat


def _catalog_hint(name: str, entry: dict) -> str:
    from banger.errors import BangerError
    from banger.images import sources

    try:
        return f"it is in the catalog: {sources.catalog_source(entry.get('kind'), name).catalog_hint(name, entry)}"
    except BangerError:
        return "list images with: banger image list"


def _decode(row: dict | None) -> dict | None:
    if row is None:
        return None
    row = dict(row)
    row["meta"] = json.loads(row.get("meta") or "{}")
    row["init"] = row["meta"].get("init")
    row["has_sshd"] = bool(row["meta"].get("has_sshd"))
    return row


def get(ctx, name: str) -> dict | None:
    return _decode(ctx.store.one("SELECT * FROM images WHERE name = ?", (name,)))


def list_images(ctx) -> list[dict]:
    return [_decode(r) for r in ctx.store.query("SELECT * FROM images ORDER BY name")]


def show(ctx, name: str) -> dict:
    row = get(ctx, name)
    if row is None:
        hint = "list images with: banger image list"
        cat = catalog(ctx)
        if name in cat:
            hint = _catalog_hint(name, cat[name])
        raise NotFound(f"no image named {name!r}", hint)
    return row


# ---------------------------------------------------------------- what sources build with
def new_staging(ctx, label: str) -> Path:
    """A private staging dir for one build/pull (the caller removes it; publish renames it)."""
    from banger.state.staging import write_owner

    ctx.cfg.staging_dir.mkdir(parents=True, exist_ok=True)
    import tempfile

    d = Path(tempfile.mkdtemp(prefix=f"image-{label}-", dir=ctx.cfg.staging_dir))
    write_owner(d)  # a killed build / pull leaves a dir `banger gc` reclaims once we are gone
    return d


def single_flight(ctx, name: str):
    """The per-name lock for the slow work of a build/pull (``..`` cannot occur in an image name)."""
    return ctx.locks.hold(f"image/{name}..pull", purpose=f"building image {name}")


# ---------------------------------------------------------------- publish
def publish(ctx, name: str, staging_dir: Path | str, *, kind: str, source: str | None, digest: str | None,
            kernel: str | None, init: str | None, meta: dict | None) -> dict:
    """Publish a staged image dir (holding rootfs.ext4, optionally work-seed.ext4) as ``name``.

    Unlocked: e2fsck the rootfs, create the work seed if missing. Under ``image/<name>``:
    re-check the name, rename the dir into place, upsert the row. On failure the staging
    dir is removed and no row exists.
    """
    from banger.guest.sshkeys import client_key

    validate_name(name)
    staging = Path(staging_dir)
    dest = ctx.cfg.images_dir / name
    try:
        rootfs = staging / ROOTFS_NAME
        if not rootfs.is_file():
            raise UsageError(f"staging dir {staging} has no {ROOTFS_NAME}", "this is a bug in the caller")
        ext4.fsck(rootfs)
        key = client_key(ctx.cfg)
        meta = dict(meta or {})
        seed = staging / SEED_NAME
        if not seed.is_file():
            make_work_seed(seed, key.public_line, None)
            fp = key.fingerprint
        else:
            fp = meta.pop("key_fingerprint", None) or key.fingerprint
        meta["init"] = init
        meta.setdefault("has_sshd", False)
        size = ext4.used_bytes(rootfs) + ext4.used_bytes(seed)
        ctx.cfg.images_dir.mkdir(parents=True, exist_ok=True)
        with ctx.locks.hold(f"image/{name}", purpose=f"publishing image {name}"):
            if get(ctx, name) is not None:
                raise Conflict(f"image {name!r} already exists", f"delete it first (banger image delete {name}) "
                                                                 "or choose another name")
            if os.path.lexists(dest):  # left by a crash between rename and upsert: no row owns it
                rmtree(dest)
            fsutil.atomic_write_json(staging / "meta.json", {"name": name, "kind": kind, "source": source,
                                                             "digest": digest, "kernel": kernel, **meta})
            from banger.state.staging import OWNER_FILE

            (staging / OWNER_FILE).unlink(missing_ok=True)  # ours, not the image's
            fsutil.rename_durably(staging, dest)
            try:
                with ctx.store.immediate() as c:
                    c.execute(
                        "INSERT INTO images (name, kind, source, digest, kernel, rootfs, work_seed, key_fingerprint,"
                        " size_bytes, meta, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (name, kind, source, digest, kernel, str(dest / ROOTFS_NAME), str(dest / SEED_NAME), fp,
                         size, json.dumps(meta, sort_keys=True), time.time()))
            except BaseException:
                rmtree(dest)
                raise
    except BaseException:
        rmtree(staging)
        raise
    return get(ctx, name)


# ---------------------------------------------------------------- delete
def delete(ctx, name: str) -> dict:
    show(ctx, name)
    with ctx.locks.hold(f"image/{name}", purpose=f"deleting image {name}"):
        # users first, in the same write transaction as the row's delete: a `vm create` reserving this
        # image (which checks the image row in its own BEGIN IMMEDIATE) is either seen here or fails;
        # nothing is touched on disk until no VM or snapshot can need the files any more
        with ctx.store.immediate() as c:
            if c.execute("SELECT 1 FROM images WHERE name = ?", (name,)).fetchone() is None:
                raise NotFound(f"no image named {name!r}", "list images with: banger image list")
            users = [r["name"] for r in c.execute("SELECT name FROM vms WHERE image = ? ORDER BY name", (name,))]
            snaps = [r["name"] for r in c.execute("SELECT name FROM snapshots WHERE json_extract(meta, '$.image') = ?"
                                                  " ORDER BY name", (name,))]
            if users or snaps:
                who = ", ".join([f"VM {u}" for u in users] + [f"snapshot {s}" for s in snaps])
                raise Conflict(f"image {name!r} is used by {who}",
                               "delete those first (banger vm delete NAME, banger snapshot rm NAME)",
                               details={"vms": users, "snapshots": snaps})
            c.execute("DELETE FROM images WHERE name = ?", (name,))
        d = ctx.cfg.images_dir / name
        trash = None
        if os.path.lexists(d):
            ctx.cfg.staging_dir.mkdir(parents=True, exist_ok=True)
            trash = ctx.cfg.staging_dir / f"trash-{name}-{os.urandom(4).hex()}"
            os.rename(d, trash)
    rmtree(trash)
    return {"name": name, "deleted": True}


# ---------------------------------------------------------------- resolve (what vm create calls)
def ensure_seed_key(ctx, row: dict) -> dict:
    """Make the image's work seed carry the current client key (temp sibling + rename)."""
    from banger.guest.sshkeys import client_key

    key = client_key(ctx.cfg)
    fp = key.fingerprint
    if row.get("key_fingerprint") == fp:
        return row
    name = row["name"]
    with ctx.locks.hold(f"image/{name}", purpose=f"refreshing the work seed of {name}"):
        row = get(ctx, name)
        if row is None:
            raise NotFound(f"image {name!r} was deleted meanwhile", "run the command again")
        if row.get("key_fingerprint") == fp:
            return row
        seed = Path(row["work_seed"])
        tmp = seed.parent / f".{SEED_NAME}.{os.urandom(4).hex()}.tmp"
        with fsutil.publish_by_rename(tmp, seed):  # readers cloning the old seed keep their (whole) inode
            reseed(seed, tmp, key.public_line)
            ext4.fsck(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        ctx.store.execute("UPDATE images SET key_fingerprint = ? WHERE name = ?", (fp, name))
    return get(ctx, name)


def resolve(ctx, name: str | None = None, auto_pull: bool = True) -> dict:
    name = name or ctx.cfg.default_image
    row = get(ctx, name)
    if row is None:
        entry = catalog(ctx).get(name)
        if entry is None or not auto_pull:
            hint = "list images with: banger image list"
            if entry is not None:
                hint = _catalog_hint(name, entry)
            raise NotFound(f"no image named {name!r}", hint)
        from banger.images import sources

        src = sources.catalog_source(entry.get("kind"), name)
        ctx.progress.step(f"image {name} is missing; fetching it from the catalog")
        row = src.from_catalog(ctx, name, entry)
    for k in ("rootfs", "work_seed"):
        if not row.get(k) or not os.path.isfile(row[k]):
            raise NotFound(f"image {name!r} is damaged: {row.get(k)} is missing",
                           f"delete and rebuild it: banger image delete {name}")
    row = ensure_seed_key(ctx, row)
    return {"name": row["name"], "rootfs": row["rootfs"], "work_seed": row["work_seed"], "kernel": row["kernel"],
            "init": row["init"], "key_fingerprint": row["key_fingerprint"], "has_sshd": row["has_sshd"],
            "meta": row["meta"]}
