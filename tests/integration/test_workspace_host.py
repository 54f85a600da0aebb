"""Host side of workspaces with real git repositories in temp dirs (no guest).

The "guest" here is a plain clone made from the import bundle, committed to with
real git, that produces an export bundle the way the guest does
(``git bundle create ... --not <bases>``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from banger.errors import Conflict, ExternalError, IntegrityError, NotFound, UsageError
from banger.workspace.host import HostRepo, bundle_heads
from banger.workspace.planning import classify
from tests.support.workspace import commit, git, make_repo, refs


def guest_clone(tmp_path, bundle, name="guest"):
    g = tmp_path / name
    git(tmp_path, "clone", "-q", str(bundle), str(g))
    have = refs(g)
    for b in bundle_heads(bundle):
        if b.startswith("refs/heads/") and b not in have:
            git(g, "branch", "-q", b.removeprefix("refs/heads/"), f"origin/{b.removeprefix('refs/heads/')}")
    return g


def export_bundle(guest, out, branches, bases):
    git(guest, "bundle", "create", "-q", str(out), *[f"refs/heads/{b}" for b in branches],
        "--not", "--ignore-missing", *bases)
    return out


def objects_and_index(repo):
    objs = sorted(str(p.relative_to(repo)) for p in (repo / ".git" / "objects").rglob("*") if p.is_file())
    return objs, (repo / ".git" / "index").read_bytes()


def test_open_finds_the_top_level_and_rejects_what_is_not_a_checkout(tmp_path):
    repo = make_repo(tmp_path)
    (repo / "src").mkdir(exist_ok=True)
    r = HostRepo.open(repo / "src")
    assert (r.root, r.git_dir, r.name) == (repo, repo / ".git", "proj")
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(UsageError, match="not inside a git repository") as e:
        HostRepo.open(plain)
    assert e.value.hint
    with pytest.raises(NotFound):
        HostRepo.open(tmp_path / "missing")
    git(tmp_path, "init", "-q", "--bare", "bare.git")
    with pytest.raises(UsageError, match="bare"):
        HostRepo.open(tmp_path / "bare.git")
    git(tmp_path, "init", "-q", "empty")
    with pytest.raises(UsageError, match="no commits"):
        HostRepo.open(tmp_path / "empty").bundle_all(tmp_path / "x.bundle")
    assert not (tmp_path / "x.bundle").exists()


def test_bundle_carries_every_branch_and_head_and_clones_identically(tmp_path):
    repo = make_repo(tmp_path)
    git(repo, "checkout", "-q", "dev")
    info = HostRepo.open(repo).bundle_all(tmp_path / "all.bundle")
    assert info["head_branch"] == "dev" and info["head"] == refs(repo)["refs/heads/dev"]
    assert info["branches"] == {"main": refs(repo)["refs/heads/main"], "dev": refs(repo)["refs/heads/dev"]}
    heads = bundle_heads(tmp_path / "all.bundle")
    assert heads == {**refs(repo), "HEAD": info["head"]}
    git(repo, "bundle", "verify", "-q", str(tmp_path / "all.bundle"))  # self-contained: no prerequisites
    g = guest_clone(tmp_path, tmp_path / "all.bundle")
    assert git(g, "rev-parse", "HEAD") == info["head"]
    # detached HEAD on a commit no branch has: still carried
    git(repo, "checkout", "-q", "--detach", "main")
    loose = commit(repo, "loose.txt", "x\n", "detached commit")
    info = HostRepo.open(repo).bundle_all(tmp_path / "det.bundle")
    assert (info["head_branch"], info["head"]) == (None, loose)
    assert bundle_heads(tmp_path / "det.bundle")["HEAD"] == loose


def test_dirty_patch_leaves_index_and_objects_alone_and_reproduces_the_work_tree(tmp_path):
    repo = make_repo(tmp_path)
    (repo / ".gitignore").write_text("*.log\n")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-q", "-m", "ignore logs")
    (repo / "src" / "app.py").write_text("print('edited')\n")
    (repo / "README.md").unlink()
    blob = bytes(range(256)) * 40
    (repo / "data.bin").write_bytes(blob)
    (repo / "deep" / "er").mkdir(parents=True)
    (repo / "deep" / "er" / "new.txt").write_text("new\n")
    os.symlink("src/app.py", repo / "link")
    (repo / "build.log").write_text("ignored\n")
    (repo / "staged.txt").write_text("staged\n")
    git(repo, "add", "staged.txt")
    before = objects_and_index(repo)
    r = HostRepo.open(repo)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    d = r.dirty_patch(tmp_path / "d.patch", scratch)
    assert d["files"] == 6 and d["bytes"] > 0
    assert objects_and_index(repo) == before  # the user's index and object store are untouched
    text = (tmp_path / "d.patch").read_text()
    assert "build.log" not in text and "GIT binary patch" in text
    # applied to a clean checkout of HEAD it gives the same work tree
    clean = tmp_path / "clean"
    git(tmp_path, "clone", "-q", str(repo), str(clean))
    git(clean, "apply", str(tmp_path / "d.patch"))
    for rel in ("src/app.py", "data.bin", "deep/er/new.txt", "staged.txt"):
        assert (clean / rel).read_bytes() == (repo / rel).read_bytes(), rel
    assert not (clean / "README.md").exists() and os.readlink(clean / "link") == "src/app.py"
    assert not (clean / "build.log").exists()
    # nothing dirty -> nothing written
    git(repo, "stash", "-q", "-u")
    scratch2 = tmp_path / "scratch2"
    scratch2.mkdir()
    assert r.dirty_patch(tmp_path / "none.patch", scratch2) == {"files": 0, "bytes": 0}
    assert not (tmp_path / "none.patch").exists()


def _round_trip(tmp_path):
    """host repo -> import bundle -> 'guest' clone with new commits -> export bundle."""
    repo = make_repo(tmp_path)
    r = HostRepo.open(repo)
    info = r.bundle_all(tmp_path / "in.bundle")
    g = guest_clone(tmp_path, tmp_path / "in.bundle")
    c1 = commit(g, "g1.txt", "1\n", "guest 1")
    c2 = commit(g, "g2.txt", "2\n", "guest 2")
    git(g, "checkout", "-q", "-b", "topic")
    c3 = commit(g, "t.txt", "t\n", "topic")
    out = export_bundle(g, tmp_path / "out.bundle", ["main", "topic"], sorted(info["branches"].values()))
    return repo, r, info, g, (c1, c2, c3), out


def test_export_bundle_verifies_and_lands_under_the_vm_namespace_only(tmp_path):
    repo, r, info, g, (c1, c2, c3), out = _round_trip(tmp_path)
    (repo / "wip.txt").write_text("uncommitted\n")
    before = refs(repo)
    r.verify_bundle(out)
    res = r.fetch_exports(out, "vm-a", ["main", "topic"])
    assert [(x["branch"], x["ref"], x["head"], x["previous"], x["forced"]) for x in res] == [
        ("main", "refs/heads/banger/vm-a/main", c2, None, False),
        ("topic", "refs/heads/banger/vm-a/topic", c3, None, False)]
    after = refs(repo)
    assert {k: v for k, v in after.items() if not k.startswith("refs/heads/banger/")} == before
    assert git(repo, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert git(repo, "status", "--porcelain") == "?? wip.txt"
    assert git(repo, "rev-list", "--count", "main..banger/vm-a/topic") == "3"
    assert c1 in git(repo, "rev-list", "banger/vm-a/main")
    assert not (repo / ".git" / "FETCH_HEAD").exists()

    # the guest rewrites main: the next export replaces the ref and says so
    git(g, "checkout", "-q", "main")
    git(g, "reset", "-q", "--hard", "HEAD~1")
    c4 = commit(g, "g3.txt", "3\n", "guest 3 instead of 2")
    out2 = export_bundle(g, tmp_path / "out2.bundle", ["main"], sorted(info["branches"].values()))
    r.verify_bundle(out2)
    res = r.fetch_exports(out2, "vm-a", ["main"])
    assert [(x["head"], x["previous"], x["forced"]) for x in res] == [(c4, c2, True)]


def test_verify_refuses_a_bundle_whose_base_the_repo_lacks_or_a_damaged_one(tmp_path):
    _repo, _r, _info, _g, _cs, out = _round_trip(tmp_path)
    other = tmp_path / "unrelated"
    git(tmp_path, "init", "-q", "-b", "main", str(other))
    commit(other, "x.txt", "different history\n", "x")
    o = HostRepo.open(other)
    with pytest.raises(IntegrityError, match="does not have") as e:
        o.verify_bundle(out)
    assert "--dest-repo" in e.value.hint
    before = refs(other)
    data = out.read_bytes()
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError):
        HostRepo.open(_repo).verify_bundle(bad)
    with pytest.raises(IntegrityError):
        bundle_heads(tmp_path / "missing.bundle")
    assert refs(other) == before


def test_fetch_never_updates_a_checked_out_branch_and_names_a_ref_clash(tmp_path):
    repo, r, _info, _g, _cs, out = _round_trip(tmp_path)
    r.fetch_exports(out, "vm-a", ["main"])
    git(repo, "checkout", "-q", "banger/vm-a/main")
    head = git(repo, "rev-parse", "HEAD")
    with pytest.raises(Conflict, match="checked out") as e:
        r.fetch_exports(out, "vm-a", ["main", "topic"])
    assert "switch" in e.value.hint
    assert git(repo, "rev-parse", "HEAD") == head and "refs/heads/banger/vm-a/topic" not in refs(repo)
    # a linked worktree counts too
    git(repo, "checkout", "-q", "main")
    git(repo, "worktree", "add", "-q", str(tmp_path / "wt"), "banger/vm-a/main")
    with pytest.raises(Conflict):
        r.fetch_exports(out, "vm-a", ["main"])
    # a user branch named like the namespace blocks it (git cannot have banger/vm-b and banger/vm-b/x)
    git(repo, "branch", "banger/vm-b")
    with pytest.raises(ExternalError) as e:
        r.fetch_exports(out, "vm-b", ["main"])
    assert "rename" in e.value.hint


def test_classify_against_real_history(tmp_path):
    repo = make_repo(tmp_path)
    r = HostRepo.open(repo)
    base = refs(repo)["refs/heads/main"]
    ahead = commit(repo, "a.txt", "a\n", "ahead")
    git(repo, "checkout", "-q", "-b", "other", base)
    other = commit(repo, "b.txt", "b\n", "other side")
    host = {"new": base, "same": base, "ff": ahead, "kept": base, "div": other}
    guest = {"same": base, "ff": base, "kept": ahead, "div": ahead, "guest-only": ahead}
    plan = classify(host, guest, r.is_ancestor)
    assert {p["branch"]: p["action"] for p in plan} == {
        "new": "created", "same": "unchanged", "ff": "fast_forward", "kept": "guest_ahead", "div": "diverged"}


def test_a_repository_owned_by_someone_else_stays_theirs(tmp_path, request):
    if os.geteuid() != 0:
        pytest.skip("needs root to own files as another user")  # the integration tier runs as root
    uid = 4242
    base = Path(tempfile.mkdtemp(prefix="ws-owned-", dir="/var/tmp"))  # traversable by uid (pytest's tmp is 0700)
    os.chmod(base, 0o755)
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    repo = make_repo(base)
    subprocess.run(["chown", "-R", f"{uid}:{uid}", str(repo)], check=True)
    r = HostRepo.open(repo)  # git's dubious-ownership check does not trip
    assert r.owner == (uid, uid)
    tmp = r.private_tmp()  # where the owner's git may write (the service bundles there too)
    try:
        info = r.bundle_all(tmp / "in.bundle")
        g = guest_clone(tmp_path, tmp / "in.bundle")
        c = commit(g, "g.txt", "g\n", "guest")
        out = export_bundle(g, tmp / "out.bundle", ["main"], list(info["branches"].values()))
        os.chown(out, uid, uid)
        r.verify_bundle(out)
        r.fetch_exports(out, "vm-a", ["main"])
    finally:
        shutil.rmtree(tmp)
    assert git(repo, "rev-parse", "banger/vm-a/main") == c
    not_theirs = [str(p) for p in (repo / ".git").rglob("*") if p.lstat().st_uid != uid]
    assert not_theirs == []
    assert git(repo, "status", "--porcelain", user=uid) == ""  # the owner can still use it (no root files)


def _tree_state(d: Path) -> dict:
    """Every entry under ``d`` with its owner and mode (and ``d`` itself)."""
    out = {".": (d.lstat().st_uid, d.lstat().st_mode)}
    for p in d.rglob("*"):
        st = p.lstat()
        out[str(p.relative_to(d))] = (st.st_uid, st.st_mode)
    return out


@pytest.fixture
def foreign_repo(request):
    """A repository owned by uid 4242 in a directory that uid can traverse (pytest's tmp is 0700)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to own files as another user")
    base = Path(tempfile.mkdtemp(prefix="ws-foreign-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    repo = make_repo(base)
    subprocess.run(["chown", "-R", "4242:4242", str(repo)], check=True)
    return base, repo, 4242


def test_a_planted_git_banger_link_never_gets_a_root_write_or_chown(foreign_repo, tmp_path):
    """The owner made .git/banger a link to a root-owned directory: banger creates, chowns and renames
    nothing there (the old code chowned that directory to the owner and made temp dirs in it)."""
    from banger.errors import HostError

    base, repo, uid = foreign_repo
    target = base / "root-owned"
    target.mkdir()
    os.chmod(target, 0o755)
    (target / "keep").write_text("root's own\n")
    os.symlink(target, repo / ".git" / "banger")
    os.lchown(repo / ".git" / "banger", uid, uid)
    before = _tree_state(target)
    work = Path(tempfile.mkdtemp(prefix="ws-work-"))   # banger's private staging (root, 0700)
    try:
        r = HostRepo.open(repo)
        info = r.bundle_all(work / "in.bundle")         # the owner's git writes into banger's descriptor
        assert (work / "in.bundle").stat().st_uid == 0 and info["bytes"] > 0
        with pytest.raises(HostError, match="as the repository's owner") as e:
            r.private_tmp()                              # the owner cannot write there: a clear error
        assert e.value.hint
        g = guest_clone(tmp_path, work / "in.bundle")
        c = commit(g, "g.txt", "g\n", "guest")
        out = export_bundle(g, work / "out.bundle", ["main"], list(info["branches"].values()))
        os.chmod(out, 0o600)                             # banger's download: unreadable by path to the owner
        r.verify_bundle(out)
        assert r.fetch_exports(out, "vm-a", ["main"])[0]["head"] == c
        (work / "p.patch").write_text("diff --git a/x b/x\n")
        with pytest.raises(HostError, match="as the repository's owner"):
            r.save_patch(work / "p.patch", "vm-a", "uncommitted-main.patch")
    finally:
        shutil.rmtree(work)
    assert _tree_state(target) == before and (target / "keep").read_text() == "root's own\n"
    assert os.path.islink(repo / ".git" / "banger")
    assert git(repo, "rev-parse", "banger/vm-a/main") == c
    assert [str(p) for p in repo.rglob("*") if p.lstat().st_uid != uid] == []


def test_the_owner_writes_everything_inside_their_repository(foreign_repo):
    base, repo, uid = foreign_repo
    (repo / "wip.txt").write_text("uncommitted\n")
    os.chown(repo / "wip.txt", uid, uid)
    (repo / "src" / "app.py").write_text("print('edited')\n")
    work = Path(tempfile.mkdtemp(prefix="ws-work-"))
    try:
        r = HostRepo.open(repo)
        scratch = r.private_tmp()                       # made by the owner's own process
        assert scratch.parent == repo / ".git" / "banger" and scratch.stat().st_uid == uid
        d = r.dirty_patch(work / "d.patch", scratch)
        assert d["files"] == 2 and (work / "d.patch").stat().st_uid == 0
        saved = r.save_patch(work / "d.patch", "vm-a", "uncommitted-main.patch")
        assert saved == repo / ".git" / "banger" / "vm-a" / "uncommitted-main.patch"
        assert saved.read_bytes() == (work / "d.patch").read_bytes()
        r.remove_tmp(scratch)
        assert not scratch.exists()
    finally:
        shutil.rmtree(work)
    assert [str(p) for p in repo.rglob("*") if p.lstat().st_uid != uid] == []
    assert git(repo, "status", "--porcelain", user=uid).splitlines() == [" M src/app.py", "?? wip.txt"]


def test_a_work_tree_and_git_dir_of_different_owners_is_refused(foreign_repo):
    _base, repo, _uid = foreign_repo
    os.chown(repo, 0, 0)
    with pytest.raises(UsageError, match="belongs to uid 0 but its git directory"):
        HostRepo.open(repo)


def test_non_utf8_file_names_in_the_dirty_patch(tmp_path):
    repo = make_repo(tmp_path)
    name = b"caf\xe9 \xff.txt"
    with open(os.path.join(os.fsencode(repo), name), "wb") as f:
        f.write(b"latin-1 named\n")
    r = HostRepo.open(repo)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    d = r.dirty_patch(tmp_path / "d.patch", scratch)
    assert d["files"] == 1
    clean = tmp_path / "clean"
    git(tmp_path, "clone", "-q", str(repo), str(clean))
    git(clean, "apply", str(tmp_path / "d.patch"))
    assert open(os.path.join(os.fsencode(clean), name), "rb").read() == b"latin-1 named\n"
