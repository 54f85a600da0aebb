"""Image source ``debootstrap``: a Debian minbase tree from the host's own apt mirror, trimmed,
set up for banger (banger.images.finalize), packed and published."""

from __future__ import annotations

import glob
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from banger.errors import Conflict, HostError, UsageError
from banger.host.runner import GUEST_UMASK, require, run
from banger.images import finalize
from banger.images import service as images

KIND = "debootstrap"
DEFAULT_PACKAGES = ["openssh-server", "iproute2", "iputils-ping", "procps", "less", "ca-certificates", "curl", "git"]


def catalog_hint(name: str, entry: dict) -> str:
    return f"banger image build {name}"


def from_catalog(ctx, name: str, entry: dict) -> dict:
    return build(ctx, name, suite=entry.get("suite", "bookworm"), packages=entry.get("packages"),
                 kernel=entry.get("kernel"), exist_ok=True)


# ---------------------------------------------------------------- the host's apt mirror
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


# ---------------------------------------------------------------- build
def build(ctx, name: str, *, suite: str = "bookworm", packages: list[str] | None = None,
          mirror: str | None = None, kernel: str | None = None, exist_ok: bool = False) -> dict:
    """debootstrap a minbase image with sshd and everyday tools, trimmed, published as ``name``."""
    from banger.guest.sshkeys import client_key

    images.validate_name(name)
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
        kernel = images.catalog(ctx).get(name, {}).get("kernel") or ctx.cfg.default_kernel
    debootstrap = require("debootstrap")
    with images.single_flight(ctx, name):
        row = images.get(ctx, name)
        if row is not None:
            if exist_ok:
                return row
            raise Conflict(f"image {name!r} already exists", f"delete it first: banger image delete {name}")
        if mirror is None:
            mirror, keyring = host_mirror(suite)
        else:
            keyring = None
        key = client_key(ctx.cfg)
        staging = images.new_staging(ctx, name)
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
            run(argv, timeout=3600, hint="check the host's apt mirror is reachable (apt-get update)",
                umask=GUEST_UMASK, contain=True)  # the guest's own files keep their usual modes under banger's umask 077
            t_boot = time.monotonic() - t0
            ctx.progress.step("trimming and installing banger-init")
            _trim(tree)
            facts = finalize.finalize_tree(tree, sshd_args="-D -e -r")  # OpenSSH 9.2: no re-exec per connection
            if not facts["has_sshd"]:
                raise HostError("the built image has no /usr/sbin/sshd", "check the package list includes openssh-server")
            packed = finalize.pack(ctx, staging, tree, key)
            meta = {**facts, **packed, "suite": suite, "packages": pkgs, "mirror": mirror,
                    "build_id": uuid.uuid4().hex, "debootstrap_s": round(t_boot, 1),
                    "build_s": round(time.monotonic() - t0, 1), "key_fingerprint": key.fingerprint}
            return images.publish(ctx, name, staging, kind=KIND, source=f"debootstrap:{suite}", digest=None,
                                  kernel=kernel, init=finalize.INIT_PATH, meta=meta)
        finally:
            finalize.rmtree(staging)
