"""Workspaces: import a host git repository into a running VM and export the guest's commits back.

Import: ``git bundle create`` of the host repo (every branch + HEAD) in a private
temp dir, upload over SFTP, then in the guest either build a fresh clone in a
temp dir next to the destination and rename it into place, or (re-import) fetch
into ``refs/remotes/host/*`` and fast-forward each local branch.  A guest branch
with commits the host lacks while the host moved on too is *diverged*: the whole
import is refused before any guest branch moves, so guest work is never
clobbered.  ``--include-dirty`` carries uncommitted host work (tracked changes
and untracked, non-ignored files) as one binary patch applied with ``git apply``
(all or nothing; it refuses to overwrite an existing guest file).

Export: in the guest, bundle every branch whose tip is not a commit the host
already had (``--not <recorded bases>``), download it, ``git bundle verify`` it
against the host repo, and fetch it into ``refs/heads/banger/<vm>/<branch>``; the
user's own branches and checkout are never touched.  ``--include-dirty`` also
brings uncommitted guest work back as a patch file under ``<git-dir>/banger/``.

What was imported where (base commit per branch, destination, time) lives in
``vms/<id>/workspaces.json`` (atomic writes), so export knows the base and
``workspace list`` can show it; it goes away with the VM.

Locks: only ``workspace/<vm-id>`` (never ``vm/<id>``, ARCHITECTURE.md), so
``vm stop`` never queues behind a long import.  The VM is re-checked once the lock
is held, and a connection lost mid-way is reported as "the VM stopped" when it did.

Host git runs as the owner of the repository when banger runs as root and the
repository belongs to someone else (objects the fetch writes stay theirs), with
``safe.directory`` set for that one repository; banger itself never creates, chowns or renames
anything through the repository's paths (banger.workspace.host). Guest answers are parsed
strictly (banger.workspace.guest, .refs).

The pieces: banger.workspace.host (the host repository), .guest (the guest side and its
scripts), .planning (what a re-import does, pure); this module holds the two workflows and
the state file.
"""

from __future__ import annotations

import posixpath
import re
import secrets
import shutil
import time
from pathlib import Path

from banger.errors import (
    BangerError,
    Conflict,
    ExternalError,
    IntegrityError,
    InvalidState,
    NotFound,
    UsageError,
)
from banger.host.fsutil import atomic_write_json, read_json
from banger.state import staging
from banger.vms import access
from banger.vms import runtime as vms
from banger.workspace import guest as guest_side
from banger.workspace import refs
from banger.workspace.guest import HEAVY_S, Guest
from banger.workspace.host import HostRepo, bundle_heads
from banger.workspace.planning import classify

STATE_FILE = "workspaces.json"
GUEST_REMOTE = "host"          # the guest sees the host's branches as refs/remotes/host/<branch>
HOST_HEAD_REF = "refs/banger/host-head"
_FRESH_STEPS = ("init", "fetch", "checkout", "apply", "publish")


# ---------------------------------------------------------------- state (vms/<id>/workspaces.json)
def _state_path(ctx, vm) -> Path:
    return ctx.cfg.vm_dir(vm["id"]) / STATE_FILE


def _load(ctx, vm) -> dict:
    doc = read_json(_state_path(ctx, vm), None) or {}
    doc.setdefault("version", 1)
    doc.setdefault("workspaces", {})
    return doc


def _save(ctx, vm, doc: dict) -> None:
    if not ctx.cfg.vm_dir(vm["id"]).is_dir():
        raise NotFound(f"VM {vm['name']} was deleted meanwhile", "create a new VM and import again")
    atomic_write_json(_state_path(ctx, vm), doc, 0o600)


def list_workspaces(ctx, vm_ref: str) -> dict:
    vm = vms.get(ctx, vm_ref)
    doc = _load(ctx, vm)
    rows = []
    for dest, w in sorted(doc["workspaces"].items()):
        rows.append({"dest": dest, "host_repo": w.get("host_repo"), "imported_at": w.get("imported_at"),
                     "imports": w.get("imports", 1), "checkout": w.get("checkout"),
                     "branches": w.get("branches", {}), "dirty_included": w.get("dirty_included", False),
                     "last_export": w.get("last_export")})
    return {"vm": vm["name"], "state": vms.effective_state(ctx, vm), "workspaces": rows}


# ---------------------------------------------------------------- import
def _norm_dest(dest: str) -> str:
    if not dest or not dest.startswith("/"):
        raise UsageError(f"--dest must be an absolute guest path, got {dest!r}", "e.g. --dest /root/myrepo")
    d = posixpath.normpath(dest)
    if d.startswith("//"):
        d = "/" + d.lstrip("/")
    if d in ("/", "/root", "/tmp", "/home") or "\n" in d or ".git" in d.split("/"):
        raise UsageError(f"--dest {dest!r} is not a usable repository path", "e.g. --dest /root/myrepo")
    return d


def _running(ctx, ref: str) -> dict:
    vm = vms.get(ctx, ref)
    st = vms.effective_state(ctx, vm)
    if st != vms.RUNNING:
        raise InvalidState(f"VM {vm['name']} is {st}, not running", f"start it first: banger vm start {vm['name']}")
    return vm


def import_repo(ctx, vm_ref: str, repo_path: str = ".", *, dest: str | None = None, branch: str | None = None,
                include_dirty: bool = False) -> dict:
    t0 = time.monotonic()
    repo = HostRepo.open(repo_path)
    dest = _norm_dest(dest or f"/root/{repo.name}")
    vm = _running(ctx, vm_ref)
    with ctx.locks.hold(f"workspace/{vm['id']}", purpose=f"import {dest}"):
        vm = _running(ctx, vm["id"])  # it may have stopped while we waited for the lock
        work = staging.new_dir(ctx.cfg, "workspace")  # banger's own files: the bundle and the patch
        scratch = None                                   # the owner's, made by the owner (dirty patch)
        try:
            ctx.progress.step(f"bundling {repo.root}")
            bundle = work / "import.bundle"
            info = repo.bundle_all(bundle)
            if branch is not None and branch not in info["branches"]:
                raise NotFound(f"the host repository has no branch {branch!r}",
                               f"branches: {', '.join(sorted(info['branches'])) or '(none)'}")
            host_dirty = repo.dirty()
            patch = None
            dirty_files = 0
            if include_dirty and host_dirty:
                scratch = repo.private_tmp()
                pd = repo.dirty_patch(work / "dirty.patch", scratch)
                dirty_files = pd["files"]
                patch = work / "dirty.patch" if pd["files"] else None
            checkout = branch or info["head_branch"]
            if include_dirty and patch is not None and checkout is not None and \
                    info["branches"].get(checkout) != info["head"]:
                raise UsageError(f"--include-dirty carries changes made on top of HEAD, but --branch {checkout} "
                                 f"is not the host's checked-out commit",
                                 "drop --branch (or check that branch out on the host) to include dirty work")
            ctx.progress.step(f"connecting to {vm['name']}")
            t = access.connect(ctx, vm["id"])
            try:
                guest = Guest(ctx, vm, t, "import")
                pre = guest.preflight(dest, "import")
                kind, gtmp = pre["kind"], pre["tmp"]
                if kind == "other":
                    raise Conflict(f"{dest} exists in VM {vm['name']} and is not a git repository",
                                   f"pick another --dest, or move it away in the guest "
                                   f"(banger vm exec {vm['name']} -- mv {dest} {dest}.old)")
                if not gtmp:
                    raise ExternalError(f"cannot create a temp dir next to {dest} in VM {vm['name']}",
                                        "check free space and permissions in the guest")
                try:
                    gbundle = f"{gtmp}/import.bundle"
                    guest.put(bundle, gbundle, f"bundle ({_size(info['bytes'])})")
                    gpatch = None
                    if patch is not None:
                        gpatch = f"{gtmp}/dirty.patch"
                        guest.put(patch, gpatch, "uncommitted changes")
                    if kind in ("absent", "empty"):
                        res = _fresh_clone(ctx, guest, dest, kind, gtmp, gbundle, gpatch, info, checkout)
                    else:
                        res = _update(ctx, guest, dest, gbundle, gpatch, info, checkout, branch)
                finally:
                    try:
                        guest.run(["rm", "-rf", "--", gtmp])
                    except BangerError:
                        pass  # the guest went away; its temp dir goes with it (or stays, inside the guest only)
            finally:
                t.close()
            now = time.time()
            doc = _load(ctx, vm)
            prev = doc["workspaces"].get(dest) or {}
            doc["workspaces"][dest] = {
                "dest": dest, "host_repo": str(repo.root), "imported_at": now,
                "first_imported_at": prev.get("first_imported_at", now), "imports": prev.get("imports", 0) + 1,
                "branches": info["branches"], "head": info["head"], "host_head_branch": info["head_branch"],
                "checkout": res["checkout"], "dirty_included": bool(patch),
                "last_export": prev.get("last_export")}
            _save(ctx, vm, doc)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if scratch is not None:
                repo.remove_tmp(scratch)
    res.update({"vm": vm["name"], "dest": dest, "host_repo": str(repo.root), "bundle_bytes": info["bytes"],
                "host_dirty": host_dirty, "dirty_included": bool(patch), "dirty_files": dirty_files,
                "seconds": round(time.monotonic() - t0, 2)})
    return res


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _head_spec(info: dict) -> list[str]:
    """The host's HEAD (possibly detached, on no branch) is kept as refs/banger/host-head in the guest."""
    return [f"+HEAD:{HOST_HEAD_REF}"] if info.get("head") else []


def _fresh_clone(ctx, guest: Guest, dest: str, kind: str, gtmp: str, gbundle: str, gpatch: str | None,
                 info: dict, checkout: str | None) -> dict:
    """Build the clone in the guest temp dir, then rename it into place (never a half-made dest)."""
    work = f"{gtmp}/clone"
    ctx.progress.step(f"cloning into {guest.vm['name']}:{dest}")
    how, ref = ("branch", checkout) if checkout is not None else ("detach", info["head"])
    rc, _out, err = guest.run(["sh", "-c", guest_side.FRESH_CLONE, "sh", work, gbundle, how, ref, gpatch or "", dest, kind,
                               f"banger-unborn-{secrets.token_hex(4)}", f"+refs/heads/*:refs/remotes/{GUEST_REMOTE}/*",
                               *_head_spec(info)], timeout=HEAVY_S)
    if rc != 0:
        steps = [line[7:] for line in err.splitlines() if line.startswith("@step ")]
        step = steps[-1] if steps and steps[-1] in _FRESH_STEPS else "?"
        msg = refs.printable("\n".join(line for line in err.splitlines() if not line.startswith("@step "))[-1500:])
        hints = {"apply": "the uncommitted host changes do not apply; commit them on the host, or import "
                          "without --include-dirty",
                 "publish": f"{dest} appeared in the guest meanwhile, or its parent is not writable; import again"}
        raise ExternalError(f"cloning into {guest.vm['name']}:{dest} failed at step {step!r}:\n{msg}",
                            hints.get(step, f"inspect the guest: banger vm ssh {guest.vm['name']}"),
                            details={"step": step, "exit_status": rc})
    return {"fresh": True, "checkout": checkout or info["head"],
            "branches": [{"branch": b, "host": s, "guest": None, "action": "created"}
                         for b, s in sorted(info["branches"].items())]}


def _rev_count(guest: Guest, repo: str, tip: str, exclude: str) -> int:
    return guest.count(guest.git(repo, "rev-list", "--count", tip, "--not", exclude, "--"), "git rev-list --count")


def _update(ctx, guest: Guest, dest: str, gbundle: str, gpatch: str | None, info: dict, checkout: str | None,
            branch: str | None) -> dict:
    """Re-import: fetch into refs/remotes/host/*, then fast-forward; refuse (change nothing) on divergence."""
    vm = guest.vm["name"]
    cur_branch, cur_head = guest.head(dest)
    if gpatch is not None and guest.dirty(dest):
        raise Conflict(f"--include-dirty: the guest work tree {dest} has uncommitted changes of its own",
                       f"commit or discard them in the guest first (banger vm ssh {vm}), or import without "
                       f"--include-dirty")
    ctx.progress.step(f"fetching into {vm}:{dest}")
    guest.git(dest, "fetch", "-q", "--no-tags", "--prune", gbundle, f"+refs/heads/*:refs/remotes/{GUEST_REMOTE}/*",
              *_head_spec(info), timeout=HEAVY_S)
    gb, _odd = guest.branches(dest)  # oddly named guest branches are none of the host's: left alone
    plan = classify(info["branches"], gb, lambda a, b: guest.is_ancestor(dest, a, b))
    diverged = [p for p in plan if p["action"] == "diverged"]
    if diverged:
        for p in diverged:
            p["guest_only"] = _rev_count(guest, dest, p["guest"], p["host"])
            p["host_only"] = _rev_count(guest, dest, p["host"], p["guest"])
        names = ", ".join(f"{p['branch']} (guest +{p['guest_only']}, host +{p['host_only']})" for p in diverged)
        b0 = diverged[0]["branch"]
        raise Conflict(f"refusing to import into {vm}:{dest}: history diverged on {names}; nothing was changed "
                       f"(the host's branches are visible in the guest as {GUEST_REMOTE}/<branch>)",
                       f"export the guest's commits first (banger workspace export {vm}) and merge them on the "
                       f"host, or merge in the guest: banger vm exec {vm} -- git -C {dest} merge "
                       f"{GUEST_REMOTE}/{b0}", details={"diverged": diverged})
    target = branch or cur_branch  # what is checked out afterwards
    final = {p["branch"]: (p["guest"] if p["action"] == "guest_ahead" else p["host"]) for p in plan}
    final_head = final.get(target, gb.get(target)) if target else cur_head
    if gpatch is not None and final_head != info["head"]:
        raise Conflict(f"--include-dirty: after the import {vm}:{dest} would be at {str(final_head)[:12]} "
                       f"({target or 'detached'}), not the host's HEAD {info['head'][:12]}; the uncommitted "
                       f"changes would not apply",
                       "check out the same branch on both sides, or import without --include-dirty")
    # the checked-out branch first: if its fast-forward fails, no other branch has moved yet
    steps = sorted(plan, key=lambda p: p["branch"] != cur_branch)
    for p in steps:
        if p["action"] == "created":
            guest.git(dest, "update-ref", f"refs/heads/{p['branch']}", p["host"], "0" * len(p["host"]))
        elif p["action"] == "fast_forward":
            if p["branch"] == cur_branch:
                guest.git(dest, "merge", "-q", "--ff-only", p["host"], timeout=HEAVY_S,
                          hint=f"uncommitted guest changes conflict with the host's new commits on "
                               f"{p['branch']}; commit or stash them in the guest (banger vm ssh {vm}), "
                               f"then import again")
            else:
                guest.git(dest, "update-ref", f"refs/heads/{p['branch']}", p["host"], p["guest"])
    if branch is not None and branch != cur_branch:
        guest.git(dest, "checkout", "-q", branch, "--", timeout=HEAVY_S,
                  hint=f"commit or stash the guest's changes first (banger vm ssh {vm})")
    if gpatch is not None:
        guest.git(dest, "apply", "--whitespace=nowarn", gpatch, timeout=HEAVY_S,
                  hint="the branches were imported, but the uncommitted host changes did not apply (a file "
                       "they add exists in the guest?); commit them on the host and import again")
    for p in plan:
        if p["action"] == "guest_ahead":
            p["guest_only"] = _rev_count(guest, dest, p["guest"], p["host"])
        elif p["action"] == "fast_forward":
            p["new_commits"] = _rev_count(guest, dest, p["host"], p["guest"])
    return {"fresh": False, "checkout": target or final_head, "branches": plan}


# ---------------------------------------------------------------- export
def _pick(doc: dict, vm: dict, path: str | None) -> tuple[str, dict]:
    ws = doc["workspaces"]
    if path is not None:
        path = _norm_dest(path)
        if path in ws:
            return path, ws[path]
        return path, {}  # never imported: everything on its branches is exported
    if not ws:
        raise NotFound(f"nothing was imported into VM {vm['name']}",
                       f"import first (banger workspace import {vm['name']} REPO), or pass --path GUEST_REPO")
    if len(ws) > 1:
        raise UsageError(f"VM {vm['name']} has {len(ws)} workspaces: {', '.join(sorted(ws))}",
                         "choose one with --path")
    return next(iter(ws.items()))


def export_repo(ctx, vm_ref: str, *, dest_repo: str = ".", path: str | None = None,
                include_dirty: bool = False) -> dict:
    t0 = time.monotonic()
    repo = HostRepo.open(dest_repo)
    vm = _running(ctx, vm_ref)
    with ctx.locks.hold(f"workspace/{vm['id']}", purpose="export"):
        vm = _running(ctx, vm["id"])
        doc = _load(ctx, vm)
        path, rec = _pick(doc, vm, path)
        bases = dict(rec.get("branches") or {})
        ctx.progress.step(f"connecting to {vm['name']}")
        t = access.connect(ctx, vm["id"])
        work = gtmp = None
        guest = Guest(ctx, vm, t, "export")
        try:
            pre = guest.preflight(path, "export")
            gtmp = pre["tmp"]
            if pre["kind"] != "repo":
                raise NotFound(f"{path} in VM {vm['name']} is not a git repository",
                               f"check the path (banger workspace list {vm['name']})")
            if not gtmp:
                raise ExternalError(f"cannot create a temp dir in {vm['name']}:{path}/.git",
                                    "check free space in the guest")
            gb, odd = guest.branches(path)
            exclude = sorted(set(b for b in bases.values() if refs.valid_sha(b)))
            changed = []
            skipped = [{**o, "reason": "not a branch name banger accepts from a guest (git's ref rules, UTF-8, "
                                       "no leading '-')"} for o in odd]
            todo = {b: g for b, g in sorted(gb.items()) if bases.get(b) != g}
            counts = {}
            if todo:  # one round trip: commits on each moved branch that the host does not have
                counts = guest.counts(path, list(todo), exclude)
            for b, g in todo.items():
                n = counts[b]
                if n == 0:
                    skipped.append({"branch": b, "head": g, "reason": "no commits the host lacks"})
                else:
                    changed.append({"branch": b, "head": g, "base": bases.get(b), "commits": n})
            guest_dirty = bool(guest.dirty(path))
            cur_branch, cur_head = guest.head(path)
            want_patch = include_dirty and guest_dirty
            if not changed and not want_patch:
                return {"vm": vm["name"], "path": path, "host_repo": str(repo.root), "nothing": True,
                        "branches": [], "skipped": skipped, "guest_dirty": guest_dirty, "dirty_patch": None,
                        "message": "nothing to export: no commits since the import"
                                   + ("" if not guest_dirty else
                                      " (the guest has uncommitted changes; commit them, or use --include-dirty)"),
                        "seconds": round(time.monotonic() - t0, 2)}
            work = staging.new_dir(ctx.cfg, "workspace")  # banger's own: the downloads, never the repo's paths
            fetched, patch_path, patch_files = [], None, 0
            if want_patch:  # first: if the owner cannot store it, no ref has moved yet
                ctx.progress.step("collecting uncommitted guest changes")
                patch_files = guest.dirty_patch(path, gtmp, cur_head or "HEAD")
                gpatch = f"{gtmp}/dirty.patch"
                stamp = time.strftime("%Y%m%dT%H%M%S")
                label = re.sub(r"[^A-Za-z0-9._-]+", "-", cur_branch or "detached").strip(".-")[:64] or "branch"
                part = work / "dirty.patch"
                guest.get(gpatch, part, "uncommitted changes")
                patch_path = repo.save_patch(part, vm["name"], f"uncommitted-{label}-{stamp}.patch")
            if changed:
                ctx.progress.step(f"bundling {len(changed)} branch(es) in {vm['name']}")
                gbundle = f"{gtmp}/export.bundle"
                guest.git(path, "bundle", "create", "-q", gbundle, *[f"refs/heads/{c['branch']}" for c in changed],
                          *(["--not", "--ignore-missing", *exclude] if exclude else []), timeout=HEAVY_S)
                local = work / "export.bundle"
                guest.get(gbundle, local, "bundle")
                ctx.progress.step("verifying the bundle")
                repo.verify_bundle(local)
                heads = bundle_heads(local, repo)
                for c in changed:
                    if heads.get(f"refs/heads/{c['branch']}") != c["head"]:
                        raise IntegrityError(f"the bundle's {c['branch']} is not the guest's {c['head'][:12]}",
                                             "run the export again")
                ctx.progress.step(f"fetching into {repo.root}")
                fetched = repo.fetch_exports(local, vm["name"], [c["branch"] for c in changed])
                for f, c in zip(fetched, changed, strict=True):
                    f["commits"] = c["commits"]
                    f["base"] = c["base"]
        finally:
            if gtmp:
                try:
                    guest.run(["rm", "-rf", "--", gtmp])
                except BangerError:
                    pass  # the guest went away
            t.close()
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
        if rec:
            doc = _load(ctx, vm)
            if path in doc["workspaces"]:
                doc["workspaces"][path]["last_export"] = {
                    "at": time.time(), "host_repo": str(repo.root),
                    "branches": {f["branch"]: f["head"] for f in fetched},
                    "dirty_patch": str(patch_path) if patch_path else None}
                _save(ctx, vm, doc)
    return {"vm": vm["name"], "path": path, "host_repo": str(repo.root), "nothing": False, "branches": fetched,
            "skipped": skipped, "guest_dirty": guest_dirty, "guest_head": cur_head, "guest_branch": cur_branch,
            "dirty_patch": str(patch_path) if patch_path else None, "dirty_files": patch_files,
            "seconds": round(time.monotonic() - t0, 2)}
