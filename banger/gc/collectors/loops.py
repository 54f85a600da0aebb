"""Loop devices backed by files under BANGER_HOME. Spared while an operation uses them: a loop on a
VM's disk while its ``vm/<id>`` lock is held (`vm promote` holds it), a loop on a staging file while
its owner lives, and any loop a live owner recorded in its staging dir (promote records the image
rootfs it attaches, before attaching it). Detached: loops on VM or staging files nobody holds, and
loops a dead owner recorded. A loop on another file of ours that no record names (say a user's own
`losetup` on an image) is left alone."""

from __future__ import annotations

import json
from pathlib import Path

from banger.gc.base import locked, unmount_under
from banger.state import staging

KEY = "loops"


def _loop_devices(ctx) -> list[dict]:
    from banger.host.runner import run, which

    if not which("losetup"):
        return []
    cp = run([which("losetup"), "--json", "--list", "--output", "NAME,BACK-FILE"], check=False, timeout=30)
    if cp.returncode != 0 or not cp.stdout.strip():
        return []
    homes = {str(ctx.cfg.home) + "/", str(ctx.cfg.home.resolve()) + "/"}
    out = []
    for d in json.loads(cp.stdout).get("loopdevices", []):
        bf = (d.get("back-file") or "").removesuffix(" (deleted)")
        home = next((h for h in homes if bf.startswith(h)), None)
        if home:
            out.append({"name": d["name"], "back_file": bf, "rel": Path(bf[len(home):]).parts})
    return out


def _detach(dev: str) -> None:
    from banger.host.runner import require, run

    # unmount anything still mounted from it (deepest first), then detach
    cp = run([require("findmnt"), "-rn", "-o", "TARGET", "-S", dev], check=False, timeout=30)
    for target in sorted((cp.stdout or "").split(), key=len, reverse=True):
        run([require("umount"), "-l", target], check=False, timeout=60)
    run([require("losetup"), "-d", dev], check=False, timeout=30)


def _records(ctx) -> tuple[set, set]:
    """(files/devices recorded by live owners, by dead owners) across staging dirs."""
    live, dead = set(), set()
    d = ctx.cfg.staging_dir
    for s in sorted(d.iterdir()) if d.is_dir() else []:
        recs = staging.recorded_loops(s)
        if not recs:
            continue
        bucket = live if staging.owner_alive(s) else dead
        for r in recs:
            bucket.add(r.get("file"))
            if r.get("device"):
                bucket.add(r["device"])
    return live, dead


def collect(ctx, rep) -> None:
    live, dead = _records(ctx)
    if not rep.dry_run:  # a dead owner's mounts first (a promote's overlay view sits on its loops)
        d = ctx.cfg.staging_dir
        for s in sorted(d.iterdir()) if d.is_dir() else []:
            if staging.recorded_loops(s) and staging.owner_alive(s) is False:
                unmount_under(s)
    for lo in _loop_devices(ctx):
        rel = lo["rel"]
        if lo["name"] in live or lo["back_file"] in live:
            continue
        if len(rel) >= 2 and rel[0] == "vms":
            with locked(ctx, rep, f"vm/{rel[1]}") as ok:
                if ok:
                    rep.add(KEY, {"name": lo["name"], "back_file": lo["back_file"]})
                    if not rep.dry_run:
                        _detach(lo["name"])
            continue
        if len(rel) >= 2 and rel[0] == "staging" and staging.owner_alive(ctx.cfg.staging_dir / rel[1]):
            continue
        if (len(rel) >= 2 and rel[0] == "staging") or lo["name"] in dead or lo["back_file"] in dead:
            rep.add(KEY, {"name": lo["name"], "back_file": lo["back_file"]})
            if not rep.dry_run:
                _detach(lo["name"])
