"""Ready-made disk sets, kept like pooled TAPs: a VM's work disk (the image's seed, cloned and grown)
and its overlay disk (with a fresh SSH host key of its own), built ahead of time by
`banger pool warm` so that `vm create` only renames them into the VM's directory.

A set is a directory ``$BANGER_HOME/pool/disks/<key>-<random>/`` holding ``work.ext4``,
``overlay.ext4`` and ``host_key.pub``.  ``key`` hashes everything the disks depend on: the image
(name, the SSH key its seed authorizes, its seed file's identity: a re-pulled image or refreshed seed is a new file), both sizes and whether the seed is used;
a re-pulled image or other sizes simply miss (and `gc` reaps sets no current image matches).

Claiming is one ``rename(2)`` of the set's directory into the VM's directory: atomic across
processes, so two creates never get the same set, and there is no row to keep true.  Sets are
built in a staging dir (owner file) and published by rename, so a half-built set is never seen.
The guest's hostname comes from the kernel command line at boot (the initramfs writes
/etc/hostname), so a set is not tied to a VM name; its host key is pinned when it is claimed.
"""

from __future__ import annotations

import os
from pathlib import Path

from banger.errors import BangerError
from banger.vms.runtime import KNOWN_HOSTS, OVERLAY, WORK

PUB = "host_key.pub"


def pool_dir(cfg) -> Path:
    return cfg.home / "pool" / "disks"


def key(image, *, work_size_mib: int, overlay_size_mib: int, use_seed: bool) -> str:
    seed = image.get("work_seed") if use_seed else None
    try:
        st = os.stat(seed) if seed else None
    except OSError:
        st = None
    parts = [image.get("name") or "", image.get("key_fingerprint") or "", seed or "",
             f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}" if st else "", str(work_size_mib),
             str(overlay_size_mib), "seed" if seed else "mkfs"]
    from banger.names import short_digest

    return short_digest("\0".join(parts).encode())


def ready(cfg, k: str) -> list[Path]:
    d = pool_dir(cfg)
    try:
        return sorted(p for p in d.iterdir() if p.name.startswith(k + "-") and p.is_dir())
    except FileNotFoundError:
        return []


def claim(ctx, vm, k: str) -> bool:
    """Move a ready set for ``k`` into the VM's directory and pin its host key. False if none is left."""
    import shutil

    d = ctx.cfg.vm_dir(vm["id"])
    for cand in ready(ctx.cfg, k):
        mine = d / ".diskset"
        try:
            os.rename(cand, mine)  # the atomic claim: only one process can move a given directory
        except (FileNotFoundError, OSError):
            continue  # another create took it first
        try:
            os.rename(mine / WORK, d / WORK)
            os.rename(mine / OVERLAY, d / OVERLAY)
            pub = (mine / PUB).read_text().strip()
            (d / KNOWN_HOSTS).write_text(f"{vm['ip']} {pub}\n")
        except BaseException:
            for f in (WORK, OVERLAY, KNOWN_HOSTS):
                (d / f).unlink(missing_ok=True)
            raise
        finally:
            shutil.rmtree(mine, ignore_errors=True)
        return True
    return False


def _build_one(ctx, image, k: str, *, work_size_mib: int, overlay_size_mib: int, use_seed: bool) -> None:
    import shutil

    from banger.state.staging import new_dir
    from banger.vms.disks import make_overlay_files, make_work_disk

    st = new_dir(ctx.cfg, f"diskset-{k}")
    try:
        make_work_disk(ctx, st / WORK, image, work_size_mib, use_seed)
        pub = make_overlay_files(st / OVERLAY, overlay_size_mib, hostname="banger")
        (st / PUB).write_text(pub + "\n")
        (st / ".owner").unlink(missing_ok=True)
        dest = pool_dir(ctx.cfg)
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.rename(st, dest / f"{k}-{st.name.rsplit('-', 1)[1]}")
    except BaseException:
        shutil.rmtree(st, ignore_errors=True)
        raise


def fill(ctx, image, n: int, *, work_size_mib: int, overlay_size_mib: int, use_seed: bool = True) -> dict:
    """Make sure ``n`` sets for this image and these sizes are ready (idempotent, cron-safe: the
    `diskpool` lock serialises fillers; claims never take it)."""
    k = key(image, work_size_mib=work_size_mib, overlay_size_mib=overlay_size_mib, use_seed=use_seed)
    made = 0
    with ctx.locks.hold("diskpool", purpose="pool warm"):
        have = len(ready(ctx.cfg, k))
        for _ in range(max(0, n - have)):
            _build_one(ctx, image, k, work_size_mib=work_size_mib, overlay_size_mib=overlay_size_mib,
                       use_seed=use_seed)
            made += 1
    return {"key": k, "image": image.get("name"), "ready": len(ready(ctx.cfg, k)), "made": made}


def status(cfg) -> dict:
    counts: dict[str, int] = {}
    d = pool_dir(cfg)
    if d.is_dir():
        for p in d.iterdir():
            counts[p.name.rsplit("-", 1)[0]] = counts.get(p.name.rsplit("-", 1)[0], 0) + 1
    return {"sets": sum(counts.values()), "by_key": counts}


def drain(ctx) -> int:
    import shutil

    n = 0
    with ctx.locks.hold("diskpool", purpose="pool drain"):
        d = pool_dir(ctx.cfg)
        for p in sorted(d.iterdir()) if d.is_dir() else []:
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


def stale(ctx, live_keys: set[str]) -> list[Path]:
    """Sets whose key no longer matches any current image + default sizes (for gc)."""
    d = pool_dir(ctx.cfg)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name.rsplit("-", 1)[0] not in live_keys)


def reap(ctx, paths: list[Path]) -> None:
    import shutil

    try:
        with ctx.locks.hold("diskpool", timeout=0, purpose="gc"):
            for p in paths:
                shutil.rmtree(p, ignore_errors=True)
    except BangerError:
        pass  # a filler is at work; next gc
