"""Root filesystem images: build (debootstrap), pull (OCI), register, publish, resolve.

Every way in has the same shape (ARCHITECTURE.md):
1. slow work in a private staging dir under ``cfg.staging_dir`` with no name lock held
   (a per-name *single-flight* lock ``image/<name>..pull`` makes parallel pulls of the
   same name do the work once; it is never held together with anything but the
   name lock, and always taken before it);
2. ``publish``: under ``image/<name>`` re-check the name, rename the staging dir into
   ``cfg.images_dir/<name>`` and upsert the row. Failures remove the staging dir and
   leave no row.

Each image dir holds ``rootfs.ext4`` (read-only lower layer, e2fsck-clean),
``work-seed.ext4`` (the image's /root plus /root/.ssh/authorized_keys with banger's
client key; VMs clone and grow it) and ``meta.json``.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from banger.errors import BangerError, Conflict, HostError, InvalidName, NotFound, UsageError
from banger.host import ext4, fsutil
from banger.host.runner import require, run

INIT_PATH = "/sbin/banger-init"
SEED_NAME = "work-seed.ext4"
ROOTFS_NAME = "rootfs.ext4"
SEED_MIN_MIB = 64
DEFAULT_PACKAGES = ["openssh-server", "iproute2", "iputils-ping", "procps", "less", "ca-certificates", "curl", "git"]
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9_-]|\.(?!\.)){0,62}$")
_SSHD_INCLUDE = "Include /etc/ssh/sshd_config.d/*.conf"


# ---------------------------------------------------------------- helpers
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


def _guest_file(name: str) -> bytes:
    from importlib import resources

    return resources.files("banger.data").joinpath("guest", name).read_bytes()


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
            hint = f"it is in the catalog: banger image build {name}" if cat[name]["kind"] == "debootstrap" \
                else f"it is in the catalog: banger image pull {cat[name]['ref']} --name {name}"
        raise NotFound(f"no image named {name!r}", hint)
    return row


def _new_staging(ctx, label: str) -> Path:
    from banger.state.staging import write_owner

    ctx.cfg.staging_dir.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=f"image-{label}-", dir=ctx.cfg.staging_dir))
    write_owner(d)  # a killed build / pull leaves a dir `banger gc` reclaims once we are gone
    return d


def _rmtree(p: Path | None) -> None:
    from banger.interrupts import shielded

    if p is not None and os.path.lexists(p):
        with shielded():  # a second Ctrl-C / SIGTERM must not cut the clean-up short
            shutil.rmtree(p, ignore_errors=True)


def _single_flight(ctx, name: str):
    return ctx.locks.hold(f"image/{name}..pull", purpose=f"building image {name}")


def _tree_usage(tree: Path) -> tuple[int, int]:
    """(bytes allocated, inode count) of a tree, never following links; hard links counted once."""
    total, inodes, seen = 0, 0, set()
    for dirpath, dirnames, filenames in os.walk(tree):
        for n in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            total += max(st.st_blocks * 512, 4096)
    return total, inodes


def _fs_size_mib(used: int, inodes: int, minimum: int = 64) -> int:
    # data + 25% + room for metadata/journal; enough inodes at mkfs's default ratio (16 KiB/inode)
    by_data = used * 1.25 / ext4.MiB + 96
    by_inodes = inodes * 1.5 * 16384 / ext4.MiB
    size = max(minimum, by_data, by_inodes)
    return int(math.ceil(size / 64.0) * 64)


# ---------------------------------------------------------------- guest setup of a flattened tree
def finalize_tree(tree: Path, *, sshd_args: str = "-D -e") -> dict:
    """Install banger-init + its config + the sshd snippet; drop baked host keys. Returns meta facts.

    Every write goes through banger.images.sources.oci.layers' in-scope resolution, so a hostile image
    (e.g. /etc a symlink to the host's /etc) cannot make us write outside the tree.
    """
    from banger.images.sources.oci.layers import tree_is_file, tree_realpath, tree_remove, tree_write

    tree_write(tree, INIT_PATH, _guest_file("banger-init"), 0o755)
    tree_write(tree, "/etc/banger/fstab", _guest_file("fstab"), 0o644)
    tree_write(tree, "/etc/banger/init.conf",
               f"# read by banger-init at boot\nSSHD_ARGS=\"{sshd_args}\"\n".encode(), 0o644)
    removed = []
    sshdir = tree_realpath(tree, "/etc/ssh")
    if sshdir is not None and sshdir.is_dir() and not sshdir.is_symlink():
        for p in sorted(sshdir.glob("ssh_host_*")):
            tree_remove(tree, f"/etc/ssh/{p.name}")
            removed.append(p.name)
    has_sshd = tree_is_file(tree, "/usr/sbin/sshd", executable=True)
    if has_sshd:
        tree_write(tree, "/etc/ssh/sshd_config.d/banger.conf", _guest_file("sshd_config.conf"), 0o644)
        cfgp = tree_realpath(tree, "/etc/ssh/sshd_config")
        text = ""
        if cfgp is not None and cfgp.is_file() and not cfgp.is_symlink():
            text = cfgp.read_text(errors="replace")
        if not any(line.strip().startswith("Include") and "sshd_config.d" in line for line in text.splitlines()):
            # sshd takes the first value it reads: our snippet must be included before the rest
            tree_write(tree, "/etc/ssh/sshd_config", (_SSHD_INCLUDE + "\n" + text).encode(), 0o644)
    os_release = {}
    for cand in ("/etc/os-release", "/usr/lib/os-release"):
        p = tree_realpath(tree, cand)
        if p is not None and p.is_file() and not p.is_symlink():
            for line in p.read_text(errors="replace").splitlines():
                k, _, v = line.partition("=")
                if k in ("ID", "VERSION_ID", "PRETTY_NAME"):
                    os_release[k.lower()] = v.strip().strip('"')
            break
    return {"init": INIT_PATH, "has_sshd": has_sshd, "removed_host_keys": removed, "os": os_release}


def make_work_seed(dest: Path, key_line: str, root_home: Path | None = None) -> None:
    """Build ``dest`` (ext4): the image's /root plus .ssh/authorized_keys with ``key_line``."""
    work = Path(tempfile.mkdtemp(prefix=".seed-", dir=dest.parent))
    try:
        top = work / "root"
        top.mkdir(mode=0o700)
        if root_home is not None and root_home.is_dir() and not root_home.is_symlink():
            # cp -a never follows symlinks in the source and keeps owners/modes
            run(["cp", "-a", "--no-preserve=links", f"{root_home}/.", f"{top}/"], timeout=600)
        os.chmod(top, 0o700)
        os.chown(top, 0, 0)
        sshd = top / ".ssh"
        if os.path.lexists(sshd) and (sshd.is_symlink() or not sshd.is_dir()):
            _rmtree(sshd) if sshd.is_dir() and not sshd.is_symlink() else os.unlink(sshd)
        sshd.mkdir(mode=0o700, exist_ok=True)
        os.chown(sshd, 0, 0)
        os.chmod(sshd, 0o700)
        ak = sshd / "authorized_keys"
        if os.path.lexists(ak):
            os.unlink(ak)
        fd = os.open(ak, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key_line.strip() + "\n")
        os.chown(ak, 0, 0)
        used, inodes = _tree_usage(top)
        size = max(SEED_MIN_MIB, int(math.ceil((used * 2 / ext4.MiB + 32) / 64.0) * 64),
                   int(math.ceil(inodes * 2 * 16384 / ext4.MiB / 64.0) * 64))
        ext4.mkfs(dest, size, src_dir=top, label="banger-work")
        # mkfs -d keeps owners but not the root directory's mode: /root is 0700
        run([require("debugfs", "e2fsprogs"), "-w", "-R", "sif / mode 040700", str(dest)], timeout=60)
    finally:
        _rmtree(work)


def _reseed(old_seed: Path, new_seed: Path, key_line: str) -> None:
    """Build ``new_seed`` from ``old_seed``'s files (debugfs rdump, no mount) with ``key_line``."""
    debugfs = require("debugfs", "e2fsprogs")
    with tempfile.TemporaryDirectory(dir=new_seed.parent, prefix=".reseed-") as td:
        home = Path(td) / "home"
        home.mkdir(mode=0o700)
        run([debugfs, "-R", f"rdump / {home}", str(old_seed)], timeout=600)
        _rmtree(home / "lost+found")
        make_work_seed(new_seed, key_line, home)


def _pack(ctx, staging: Path, tree: Path, key) -> dict:
    """mkfs the rootfs from ``tree`` (e2fsck-clean), build the work seed; drop the tree."""
    from banger.images.sources.oci.layers import tree_realpath

    ctx.progress.step("packing rootfs (mkfs.ext4 -d)")
    used, inodes = _tree_usage(tree)
    size_mib = _fs_size_mib(used, inodes, 256)
    rootfs = staging / ROOTFS_NAME
    ext4.mkfs(rootfs, size_mib, src_dir=tree, label="banger-root")
    ctx.progress.step("checking rootfs (e2fsck -fn)")
    ext4.fsck(rootfs)
    ctx.progress.step("building work seed")
    make_work_seed(staging / SEED_NAME, key.public_line, tree_realpath(tree, "/root"))
    ext4.fsck(staging / SEED_NAME)
    _rmtree(tree)
    return {"tree_bytes": used, "inodes": inodes, "fs_size_mib": size_mib}


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
                _rmtree(dest)
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
                _rmtree(dest)
                raise
    except BaseException:
        _rmtree(staging)
        raise
    return get(ctx, name)


# ---------------------------------------------------------------- debootstrap build
def host_mirror(suite: str, sources_root: Path | str = "/") -> tuple[str, str | None]:
    """(mirror URI, keyring or None) for ``suite`` from the host's apt sources (one-line or deb822)."""
    root = Path(sources_root)
    cands: list[tuple[str, str | None]] = []
    one_line = [root / "etc/apt/sources.list"] + sorted(Path(p) for p in glob.glob(str(root / "etc/apt/sources.list.d/*.list")))
    for f in one_line:
        try:
            lines = f.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if not line.startswith("deb "):
                continue
            toks = line.split()[1:]
            keyring = None
            if toks and toks[0].startswith("["):
                opts = []
                while toks:
                    t = toks.pop(0)
                    opts.append(t)
                    if t.endswith("]"):
                        break
                for o in " ".join(opts).strip("[]").split():
                    if o.startswith("signed-by="):
                        keyring = o.split("=", 1)[1]
            if len(toks) >= 2 and toks[1] == suite:
                cands.append((toks[0], keyring))
    for f in sorted(Path(p) for p in glob.glob(str(root / "etc/apt/sources.list.d/*.sources"))):
        try:
            text = f.read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            last = None
            for line in stanza.splitlines():
                if line.startswith("#") or not line.strip():
                    continue
                if line[0] in " \t" and last:
                    fields[last] += " " + line.strip()
                    continue
                k, _, v = line.partition(":")
                last = k.strip().lower()
                fields[last] = v.strip()
            if fields.get("enabled", "yes").lower() == "no":
                continue
            if "deb" not in fields.get("types", "").split():
                continue
            if suite in fields.get("suites", "").split():
                kr = fields.get("signed-by")
                kr = kr if kr and kr.startswith("/") and "\n" not in kr and " " not in kr else None
                for uri in fields.get("uris", "").split():
                    cands.append((uri, kr))
    if not cands:
        raise HostError(f"no apt source for suite {suite!r} in /etc/apt/sources.list or sources.list.d",
                        f"add a Debian mirror for {suite} to the host's apt sources")
    return cands[0]


def _trim(tree: Path) -> None:
    for pat in ("var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
                "usr/share/doc/*", "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*",
                "usr/share/lintian/*", "usr/share/linda/*", "var/log/*.log", "var/log/apt/*",
                "var/cache/debconf/*-old", "var/lib/dpkg/*-old", "etc/ssh/ssh_host_*"):
        for p in glob.glob(str(tree / pat)):
            if os.path.islink(p) or not os.path.isdir(p):
                os.unlink(p)
            else:
                shutil.rmtree(p)
    for p in ("etc/resolv.conf", "etc/hostname", "etc/machine-id"):  # host leftovers; the initramfs writes them
        if os.path.lexists(tree / p):
            os.unlink(tree / p)
    (tree / "etc/fstab").write_text("# banger: the initramfs mounts the root, /root and the pseudo filesystems\n")
    (tree / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")


def build(ctx, name: str, *, suite: str = "bookworm", packages: list[str] | None = None,
          mirror: str | None = None, kernel: str | None = None, exist_ok: bool = False) -> dict:
    """debootstrap a minbase image with sshd and everyday tools, trimmed, published as ``name``."""
    from banger.guest.sshkeys import client_key

    validate_name(name)
    if not re.match(r"^[a-z][a-z0-9-]{1,30}$", suite):
        raise UsageError(f"invalid suite {suite!r}", "use a Debian suite name such as bookworm")
    pkgs = list(DEFAULT_PACKAGES if packages is None else packages)
    for p in pkgs:
        if not re.match(r"^[a-z0-9][a-z0-9+.-]+$", p):
            raise UsageError(f"invalid package name {p!r}", "use Debian package names")
    if "openssh-server" not in pkgs:
        pkgs.insert(0, "openssh-server")
    if "iproute2" not in pkgs:
        pkgs.append("iproute2")
    if kernel is None:
        kernel = catalog(ctx).get(name, {}).get("kernel") or ctx.cfg.default_kernel
    debootstrap = require("debootstrap")
    with _single_flight(ctx, name):
        row = get(ctx, name)
        if row is not None:
            if exist_ok:
                return row
            raise Conflict(f"image {name!r} already exists", f"delete it first: banger image delete {name}")
        if mirror is None:
            mirror, keyring = host_mirror(suite)
        else:
            keyring = None
        key = client_key(ctx.cfg)
        staging = _new_staging(ctx, name)
        try:
            tree = staging / "tree"
            cache = ctx.cfg.cache_dir / "debootstrap" / suite
            cache.mkdir(parents=True, exist_ok=True)
            argv = [debootstrap, "--variant=minbase", f"--include={','.join(pkgs)}", f"--cache-dir={cache}"]
            if keyring and os.path.isfile(keyring):
                argv.append(f"--keyring={keyring}")
            argv += [suite, str(tree), mirror]
            t0 = time.monotonic()
            ctx.progress.step(f"debootstrap {suite} from {mirror} (about a minute)")
            run(argv, timeout=3600, hint="check the host's apt mirror is reachable (apt-get update)", contain=True)
            t_boot = time.monotonic() - t0
            ctx.progress.step("trimming and installing banger-init")
            _trim(tree)
            facts = finalize_tree(tree, sshd_args="-D -e -r")  # OpenSSH 9.2: no re-exec per connection
            if not facts["has_sshd"]:
                raise HostError("the built image has no /usr/sbin/sshd", "check the package list includes openssh-server")
            packed = _pack(ctx, staging, tree, key)
            meta = {**facts, **packed, "suite": suite, "packages": pkgs, "mirror": mirror,
                    "build_id": uuid.uuid4().hex, "debootstrap_s": round(t_boot, 1),
                    "build_s": round(time.monotonic() - t0, 1), "key_fingerprint": key.fingerprint}
            return publish(ctx, name, staging, kind="debootstrap", source=f"debootstrap:{suite}", digest=None,
                           kernel=kernel, init=INIT_PATH, meta=meta)
        finally:
            _rmtree(staging)


# ---------------------------------------------------------------- OCI pull
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
    name = validate_name(name or default_name(r))
    if kernel is None:
        kernel = catalog(ctx).get(name, {}).get("kernel") or ctx.cfg.default_kernel
    with _single_flight(ctx, name):
        row = get(ctx, name)
        if row is not None:
            if exist_ok and row["source"] == str(r):
                return {**row, "existing": True}
            raise Conflict(f"image {name!r} already exists (from {row['source']})",
                           f"delete it first (banger image delete {name}) or pull with --name OTHER")
        key = client_key(ctx.cfg)
        staging = _new_staging(ctx, name)
        try:
            t0 = time.monotonic()
            reg = Registry(r, insecure=insecure, progress=ctx.progress)
            ctx.progress.step(f"resolving {r}")
            im = reg.image_manifest()
            layers = im["manifest"].get("layers", [])
            blobs_dir = ctx.cfg.cache_dir / "blobs"
            paths = []
            for layer in layers:
                paths.append(reg.fetch_blob(layer["digest"], blobs_dir, layer.get("size")))
            t_fetch = time.monotonic() - t0
            tree = staging / "tree"
            applier = LayerApplier(tree)
            with ctx.progress.task("applying layers", len(paths)) as t:
                for layer, p in zip(layers, paths, strict=True):
                    apply_layer(tree, p, applier=applier, layer=layer["digest"][:19])
                    t.advance(1)
            facts = finalize_tree(tree)
            packed = _pack(ctx, staging, tree, key)
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
            return publish(ctx, name, staging, kind="oci", source=str(r), digest=im["digest"], kernel=kernel,
                           init=INIT_PATH, meta=meta)
        finally:
            _rmtree(staging)


# ---------------------------------------------------------------- register an existing ext4
def register(ctx, name: str, rootfs_path: str | Path, kernel: str | None = None) -> dict:
    """Register an existing ext4 root filesystem (copied, never modified in place).

    The copy gets banger-init, its config and the sshd snippet (via debugfs, no mount),
    loses any baked SSH host keys, and its /root becomes the work seed.
    """
    from banger.guest.sshkeys import client_key

    validate_name(name)
    src = Path(rootfs_path)
    if not src.is_file():
        raise NotFound(f"no such file: {src}", "pass the path of an ext4 image file")
    debugfs = require("debugfs", "e2fsprogs")
    kernel = kernel or ctx.cfg.default_kernel
    with _single_flight(ctx, name):
        if get(ctx, name) is not None:
            raise Conflict(f"image {name!r} already exists", f"delete it first: banger image delete {name}")
        key = client_key(ctx.cfg)
        staging = _new_staging(ctx, name)
        try:
            rootfs = staging / ROOTFS_NAME
            ctx.progress.step(f"copying {src}")
            fsutil.reflink_or_sparse_copy(src, rootfs)
            try:
                ext4.fsck(rootfs)
            except BangerError as e:
                raise UsageError(f"{src} is not a clean ext4 filesystem", "run e2fsck -f on it (unmounted) first"
                                 ) from e
            # what does the image have?
            def exists(path: str) -> bool:
                cp = run([debugfs, "-R", f"stat {path}", str(rootfs)], check=False, timeout=60)
                return cp.returncode == 0 and "Inode:" in (cp.stdout or "")

            has_sshd = exists("/usr/sbin/sshd")
            home = staging / "home"
            home.mkdir()
            if exists("/root"):
                run([debugfs, "-R", f"rdump /root {home}", str(rootfs)], timeout=600)
            gfiles = staging / "guest"
            gfiles.mkdir()
            for n in ("banger-init", "fstab", "sshd_config.conf"):
                (gfiles / n).write_bytes(_guest_file(n))
            (gfiles / "init.conf").write_text('SSHD_ARGS="-D -e"\n')
            cmds = ["mkdir /etc", "mkdir /etc/banger", "mkdir /sbin", "cd /sbin", "rm banger-init",
                    f"write {gfiles}/banger-init banger-init", "sif banger-init mode 0100755",
                    "sif banger-init uid 0", "sif banger-init gid 0", "cd /etc/banger"]
            for n in ("fstab", "init.conf"):
                cmds += [f"rm {n}", f"write {gfiles}/{n} {n}", f"sif {n} mode 0100644", f"sif {n} uid 0",
                         f"sif {n} gid 0"]
            cp = run([debugfs, "-R", "ls -l /etc/ssh", str(rootfs)], check=False, timeout=60)
            for tok in (cp.stdout or "").split():
                if tok.startswith("ssh_host_"):
                    cmds.append(f"rm /etc/ssh/{tok}")
            if has_sshd:
                cmds += ["mkdir /etc/ssh/sshd_config.d", "cd /etc/ssh/sshd_config.d", "rm banger.conf",
                         f"write {gfiles}/sshd_config.conf banger.conf", "sif banger.conf mode 0100644",
                         "sif banger.conf uid 0", "sif banger.conf gid 0"]
            (staging / "cmds").write_text("\n".join(cmds) + "\n")
            run([debugfs, "-w", "-f", str(staging / "cmds"), str(rootfs)], timeout=600)
            ext4.fsck(rootfs)
            root_home = home / "root"
            make_work_seed(staging / SEED_NAME, key.public_line, root_home if root_home.is_dir() else None)
            _rmtree(home)
            _rmtree(gfiles)
            (staging / "cmds").unlink()
            meta = {"init": INIT_PATH, "has_sshd": has_sshd, "registered_from": str(src.resolve()),
                    "key_fingerprint": key.fingerprint}
            return publish(ctx, name, staging, kind="registered", source=str(src.resolve()), digest=None,
                           kernel=kernel, init=INIT_PATH, meta=meta)
        finally:
            _rmtree(staging)


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
            trash = ctx.cfg.staging_dir / f"trash-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(d, trash)
    _rmtree(trash)
    return {"name": name, "deleted": True}


# ---------------------------------------------------------------- resolve (what vm create calls)
def _from_catalog(ctx, name: str, entry: dict) -> dict:
    kind = entry.get("kind")
    if kind == "debootstrap":
        return build(ctx, name, suite=entry.get("suite", "bookworm"), packages=entry.get("packages"),
                     kernel=entry.get("kernel"), exist_ok=True)
    if kind == "oci":
        return pull(ctx, entry["ref"], name, kernel=entry.get("kernel"), exist_ok=True)
    raise UsageError(f"catalog entry {name!r} has an unknown kind {kind!r}", "this is a bug in banger's catalog")


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
        tmp = seed.parent / f".{SEED_NAME}.{uuid.uuid4().hex[:8]}.tmp"
        with fsutil.publish_by_rename(tmp, seed):  # readers cloning the old seed keep their (whole) inode
            _reseed(seed, tmp, key.public_line)
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
                hint = f"it is in the catalog: banger image build {name}" if entry["kind"] == "debootstrap" \
                    else f"it is in the catalog: banger image pull {entry['ref']} --name {name}"
            raise NotFound(f"no image named {name!r}", hint)
        ctx.progress.step(f"image {name} is missing; fetching it from the catalog")
        row = _from_catalog(ctx, name, entry)
    for k in ("rootfs", "work_seed"):
        if not row.get(k) or not os.path.isfile(row[k]):
            raise NotFound(f"image {name!r} is damaged: {row.get(k)} is missing",
                           f"delete and rebuild it: banger image delete {name}")
    row = ensure_seed_key(ctx, row)
    return {"name": row["name"], "rootfs": row["rootfs"], "work_seed": row["work_seed"], "kernel": row["kernel"],
            "init": row["init"], "key_fingerprint": row["key_fingerprint"], "has_sshd": row["has_sshd"],
            "meta": row["meta"]}
