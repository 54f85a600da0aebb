"""Workspace import/export against one real guest (QEMU TCG here), every banger command inside a netns.

One VM serves the whole module (``ws_vm``); the tests run in file order and each uses
its own host repository and guest path. The last test stops the VM mid-import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.netns import banger_argv
from tests.support.workspace import (  # noqa: F401  (fixtures)
    commit,
    default_image,
    default_kernel,
    git,
    make_repo,
    pulled_default_kernel,
    refs,
    ws_vm,
)

GUEST_COMMITS = r"""
set -e
cd "$1"
g() { git -c user.name=Guest -c user.email=guest@example.invalid "$@"; }
echo guest-1 > guest.txt; g add guest.txt; g commit -q -m "guest 1 on main"
echo guest-2 >> guest.txt; g commit -q -am "guest 2 on main"
g checkout -q dev
echo guest-dev > dev-guest.txt; g add dev-guest.txt; g commit -q -m "guest on dev"
g checkout -q -b feat/x main
echo feat > feat.txt; g add feat.txt; g commit -q -m "guest feature"
g checkout -q main
echo wip >> README.md
"""


def test_import_commit_export_roundtrip(ws_vm, tmp_path):  # noqa: F811
    vm = ws_vm
    repo = make_repo(tmp_path)
    (repo / "notes.txt").write_text("host scratch, not committed\n")
    host_before = refs(repo)

    d = vm.ws("import", vm.name, str(repo))["data"]
    print(f"\nfresh import: {d['seconds']}s")
    assert (d["fresh"], d["dest"], d["checkout"]) == (True, "/root/proj", "main")
    assert {b["branch"]: b["action"] for b in d["branches"]} == {"dev": "created", "main": "created"}
    assert d["host_dirty"] is True and d["dirty_included"] is False
    # the guest has every branch, main checked out and clean, without the host's uncommitted file
    g = vm.probe("/root/proj", "src/app.py", "notes.txt")
    assert g["refs"] == host_before
    assert (g["head"], g["status"], g["leftovers"]) == ("refs/heads/main", [], [])
    assert g["files"] == {"src/app.py": b"print('v1')\n", "notes.txt": None}

    ls = vm.ws("list", vm.name)["data"]["workspaces"]
    assert [(w["dest"], w["host_repo"], w["imports"]) for w in ls] == [("/root/proj", str(repo), 1)]
    assert ls[0]["branches"] == {"main": host_before["refs/heads/main"], "dev": host_before["refs/heads/dev"]}

    vm.exec("sh", "-c", GUEST_COMMITS, "sh", "/root/proj")
    g2 = vm.probe("/root/proj")["refs"]

    e = vm.ws("export", vm.name, "--dest-repo", str(repo))["data"]
    print(f"export of 3 branches: {e['seconds']}s")
    got = {b["branch"]: (b["ref"], b["commits"], b["head"], b["forced"]) for b in e["branches"]}
    assert got == {
        "main": ("refs/heads/banger/ws-1/main", 2, g2["refs/heads/main"], False),
        "dev": ("refs/heads/banger/ws-1/dev", 1, g2["refs/heads/dev"], False),
        # branched off the guest's main: its 2 commits + 1 of its own are new to the host
        "feat/x": ("refs/heads/banger/ws-1/feat/x", 3, g2["refs/heads/feat/x"], False),
    }
    assert e["guest_dirty"] is True and e["dirty_patch"] is None
    after = refs(repo)
    # the user's branches, checkout and work tree are untouched
    assert {r: s for r, s in after.items() if not r.startswith("refs/heads/banger/")} == host_before
    assert git(repo, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert git(repo, "status", "--porcelain") == "?? notes.txt"
    for b in ("main", "dev", "feat/x"):
        assert after[f"refs/heads/banger/ws-1/{b}"] == g2[f"refs/heads/{b}"]
    assert git(repo, "show", "refs/heads/banger/ws-1/main:guest.txt") == "guest-1\nguest-2"
    assert git(repo, "log", "--format=%s", "main..banger/ws-1/main").splitlines() == ["guest 2 on main",
                                                                                      "guest 1 on main"]
    assert git(repo, "fsck", "--no-dangling", "--no-progress") == ""
    assert not list((repo / ".git" / "banger").glob("tmp-*"))
    assert vm.probe("/root/proj")["leftovers"] == []

    # exporting again brings the same commits (idempotent, nothing forced)
    again = vm.ws("export", vm.name, "--dest-repo", str(repo))["data"]
    assert {b["branch"]: (b["head"], b["previous"], b["forced"]) for b in again["branches"]} == \
        {b: (g2[f"refs/heads/{b}"], g2[f"refs/heads/{b}"], False) for b in ("main", "dev", "feat/x")}

    # the host moved on while the guest has its own commits on main: refused, nothing lost
    commit(repo, "README.md", "hello from the host\n", "host after import")
    bad = vm.ws("import", vm.name, str(repo), check=False)
    assert bad["_exit"] == 4 and bad["error"]["code"] == "conflict", bad
    assert "diverged on main (guest +2, host +1)" in bad["error"]["message"]
    assert "export" in bad["error"]["hint"]
    g3 = vm.probe("/root/proj", "README.md")
    assert g3["refs"] == g2 and g3["files"]["README.md"] == b"hello\nwip\n"  # guest's uncommitted work kept
    assert g3["status"] == [" M README.md"] and g3["leftovers"] == []
    w = vm.ws("list", vm.name)["data"]["workspaces"][0]
    assert w["imports"] == 1 and w["last_export"]["branches"]["main"] == g2["refs/heads/main"]


def test_reimport_fast_forwards_and_dirty_round_trip(ws_vm, tmp_path):  # noqa: F811
    vm = ws_vm
    repo = make_repo(tmp_path, "ff")
    d = vm.ws("import", vm.name, str(repo), "--dest", "/root/src/ff", "--branch", "dev")["data"]
    assert d["checkout"] == "dev" and d["dest"] == "/root/src/ff"

    # nothing was committed in the guest: a clear message, exit 0
    cp = vm.ns.banger("workspace", "export", vm.name, "--dest-repo", str(repo), "--path", "/root/src/ff")
    assert "nothing to export" in cp.stdout
    assert not [r for r in refs(repo) if r.startswith("refs/heads/banger/")]

    # host commits on both branches; the guest's checked-out dev and the other branch fast-forward
    commit(repo, "src/app.py", "print('v2')\n", "host v2 on main")
    git(repo, "checkout", "-q", "dev")
    commit(repo, "dev.txt", "dev work 2\n", "host dev 2")
    new_dev = commit(repo, "dev2.txt", "more\n", "host dev 3")
    git(repo, "checkout", "-q", "main")
    d = vm.ws("import", vm.name, str(repo), "--dest", "/root/src/ff")["data"]
    print(f"\nfast-forward re-import: {d['seconds']}s")
    assert d["fresh"] is False
    assert {b["branch"]: (b["action"], b.get("new_commits")) for b in d["branches"]} == \
        {"main": ("fast_forward", 1), "dev": ("fast_forward", 2)}
    g = vm.probe("/root/src/ff", "dev2.txt")
    assert g["refs"] == refs(repo)
    assert (g["head"], g["status"], g["leftovers"]) == ("refs/heads/dev", [], [])
    assert g["files"]["dev2.txt"] == b"more\n"  # the work tree moved too
    w = {x["dest"]: x for x in vm.ws("list", vm.name)["data"]["workspaces"]}["/root/src/ff"]
    assert w["imports"] == 2 and w["branches"]["dev"] == new_dev

    # uncommitted host work travels only when asked: a modified file, a deleted one, a new binary one
    (repo / "src" / "app.py").write_text("print('dirty')\n")
    (repo / "README.md").unlink()
    blob = os.urandom(3000)
    (repo / "new.bin").write_bytes(blob)
    d = vm.ws("import", vm.name, str(repo), "--dest", "/root/dirty", "--include-dirty")["data"]
    assert d["dirty_included"] is True and d["dirty_files"] == 3
    g = vm.probe("/root/dirty", "src/app.py", "README.md", "new.bin")
    assert g["files"] == {"src/app.py": b"print('dirty')\n", "README.md": None, "new.bin": blob}
    assert git(repo, "status", "--porcelain").splitlines() == [" D README.md", " M src/app.py", "?? new.bin"]

    # and uncommitted guest work comes back as a patch file that applies on the host
    vm.exec("sh", "-c", "cd /root/dirty && echo guest-edit >> src/app.py && echo x > guest-new.txt")
    e = vm.ws("export", vm.name, "--dest-repo", str(repo), "--path", "/root/dirty", "--include-dirty")["data"]
    assert e["branches"] == [] and e["dirty_files"] == 4 and e["guest_head"] == refs(repo)["refs/heads/main"]
    patch = e["dirty_patch"]
    assert patch.startswith(str(repo / ".git" / "banger" / "ws-1" / "uncommitted-main-"))
    check = tmp_path / "check"
    git(tmp_path, "clone", "-q", str(repo), str(check))
    git(check, "apply", patch)
    assert (check / "src" / "app.py").read_text() == "print('dirty')\nguest-edit\n"
    assert (check / "new.bin").read_bytes() == blob and (check / "guest-new.txt").read_text() == "x\n"
    assert not (check / "README.md").exists()


def test_errors_with_hints(ws_vm, tmp_path):  # noqa: F811
    vm = ws_vm
    plain = tmp_path / "plain"
    plain.mkdir()
    r = vm.ws("import", vm.name, str(plain), check=False)
    assert r["_exit"] == 2 and "not inside a git repository" in r["error"]["message"] and r["error"]["hint"]

    repo = make_repo(tmp_path, "errs")
    vm.exec("sh", "-c", "mkdir -p /root/occupied && echo mine > /root/occupied/keep.txt")
    r = vm.ws("import", vm.name, str(repo), "--dest", "/root/occupied", check=False)
    assert r["_exit"] == 4 and "is not a git repository" in r["error"]["message"] and "--dest" in r["error"]["hint"]
    assert vm.exec("cat", "/root/occupied/keep.txt").stdout == "mine\n"

    r = vm.ws("import", "no-such-vm", str(repo), check=False)
    assert r["_exit"] == 3

    stopped = vm.ns.banger_json("vm", "create", "--name", "ws-off", "--no-start", timeout=300)["data"]
    try:
        r = vm.ws("import", "ws-off", str(repo), check=False)
        assert r["_exit"] == 4 and "not running" in r["error"]["message"] and "vm start" in r["error"]["hint"]
        r = vm.ws("export", "ws-off", "--dest-repo", str(repo), check=False)
        assert r["_exit"] == 4
    finally:
        vm.ns.banger_json("vm", "delete", "-f", stopped["id"])

    # git really missing in the guest
    vm.exec("mv", "/usr/bin/git", "/usr/bin/git.off")
    try:
        r = vm.ws("import", vm.name, str(repo), "--dest", "/root/nogit", check=False)
        assert r["_exit"] == 6 and "git is not installed" in r["error"]["message"] and "apt-get" in r["error"]["hint"]
    finally:
        vm.exec("mv", "/usr/bin/git.off", "/usr/bin/git")
    assert vm.exec("test", "-e", "/root/nogit", check=False).returncode == 1


def test_a_foreign_repository_with_a_planted_link_gets_no_root_writes(ws_vm, tmp_path):  # noqa: F811
    """A repository owned by another user whose .git/banger is a link to a root-owned directory:
    import and export work as that user and never create, chown or rename anything there."""
    vm, uid = ws_vm, 12345
    base = Path(tempfile.mkdtemp(prefix="ws-foreign-", dir="/var/tmp"))  # traversable by uid
    os.chmod(base, 0o755)
    try:
        repo = make_repo(base, "theirs")
        target = base / "root-owned"
        target.mkdir()
        os.chmod(target, 0o755)
        (target / "keep").write_text("root's own\n")
        os.symlink(target, repo / ".git" / "banger")
        (repo / "wip.txt").write_text("uncommitted host work\n")
        subprocess.run(["chown", "-R", "-h", f"{uid}:{uid}", str(repo)], check=True)
        before = sorted((str(p), p.lstat().st_uid, p.lstat().st_mode) for p in [target, *target.rglob("*")])
        d = vm.ws("import", vm.name, str(repo), "--dest", "/root/theirs")["data"]
        assert d["fresh"] is True and d["host_dirty"] is True
        vm.git("/root/theirs", "commit", "-q", "--allow-empty", "-m", "guest on a foreign repo")
        head = vm.git("/root/theirs", "rev-parse", "HEAD")
        e = vm.ws("export", vm.name, "--dest-repo", str(repo), "--path", "/root/theirs")["data"]
        assert [(b["branch"], b["head"]) for b in e["branches"]] == [("main", head)]

        def state():
            return sorted((str(p), p.lstat().st_uid, p.lstat().st_mode) for p in [target, *target.rglob("*")])

        assert state() == before, "root created or chowned something through the planted link"
        # what needs the owner's own scratch space there is refused clearly, touching nothing
        r = vm.ws("import", vm.name, str(repo), "--dest", "/root/theirs2", "--include-dirty", check=False)
        assert r["error"]["code"] == "host" and "repository's owner" in r["error"]["message"], r
        vm.exec("sh", "-c", "echo guest-wip >> /root/theirs/README.md")
        r = vm.ws("export", vm.name, "--dest-repo", str(repo), "--path", "/root/theirs", "--include-dirty",
                  check=False)
        assert r["error"]["code"] == "host" and "repository's owner" in r["error"]["message"], r

        assert state() == before and os.path.islink(repo / ".git" / "banger")
        assert [str(p) for p in repo.rglob("*") if p.lstat().st_uid != uid] == []
        assert git(repo, "rev-parse", "banger/ws-1/main", user=uid) == head
        assert git(repo, "status", "--porcelain", user=uid) == "?? wip.txt"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_vm_stop_during_import_fails_clearly_without_waiting(ws_vm, tmp_path):  # noqa: F811
    """Last in the module: it stops the shared VM."""
    vm = ws_vm
    repo = make_repo(tmp_path, "big")
    with open(repo / "big.bin", "wb") as f:
        for _ in range(48):
            f.write(os.urandom(1 << 20))
    git(repo, "add", "big.bin")
    git(repo, "commit", "-q", "-m", "big")
    before = vm.ws("list", vm.name)["data"]["workspaces"]
    p = vm.ns.spawn(banger_argv("workspace", "import", vm.name, str(repo), "--json"))
    seen = []
    for line in p.stderr:  # plain progress lines (stderr is not a tty)
        seen.append(line)
        if "uploading" in line:
            break
    else:
        pytest.fail(f"import never started uploading: {seen} {p.stdout.read()}")
    t0 = time.monotonic()
    stop = vm.ns.banger_json("vm", "stop", vm.name, timeout=120)["data"]
    stop_s = time.monotonic() - t0
    out, err = p.communicate(timeout=120)
    doc = json.loads(out)
    assert stop["state"] == "stopped"
    assert p.returncode == 4 and doc["error"]["code"] == "invalid_state", (out, err)
    assert "stopped during the workspace import" in doc["error"]["message"]
    assert stop_s < 30, f"vm stop took {stop_s:.1f}s while an import ran"
    assert not list((repo / ".git" / "banger").glob("tmp-*"))
    # the interrupted import recorded nothing: the list is exactly what it was before
    assert vm.ws("list", vm.name)["data"]["workspaces"] == before
