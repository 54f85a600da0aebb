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
``safe.directory`` set for that one repository.
"""

from __future__ import annotations

import os
import posixpath
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from banger.errors import (
    BangerError,
    CommandFailed,
    Conflict,
    ExternalError,
    HostError,
    IntegrityError,
    InvalidState,
    NotFound,
    UsageError,
)
from banger.host.fsutil import atomic_write_json, read_json
from banger.vms import access
from banger.vms import runtime as vms

STATE_FILE = "workspaces.json"
GUEST_REMOTE = "host"          # the guest sees the host's branches as refs/remotes/host/<branch>
HOST_HEAD_REF = "refs/banger/host-head"
REF_NS = "banger"              # exports land in refs/heads/banger/<vm-name>/<branch> on the host
LIGHT_S = 120.0                # guest command timeouts (TCG guests are slow)
HEAVY_S = 1800.0
_SHA = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")


# ---------------------------------------------------------------- the host repository
class HostRepo:
    """A git repository on the host. Every git call is an argv list run through banger.host.runner."""

    def __init__(self, root: Path, git_dir: Path, owner: tuple[int, int]):
        self.root = root
        self.git_dir = git_dir        # the common git dir (shared by worktrees)
        self.owner = owner

    @classmethod
    def open(cls, path: str | os.PathLike) -> HostRepo:
        from banger.host import runner

        runner.require("git")
        p = Path(path).expanduser()
        if not p.exists():
            raise NotFound(f"no such directory: {p}", "pass the path of a git repository (default: .)")
        p = p.resolve()
        base = p if p.is_dir() else p.parent
        # discovery only (rev-parse runs nothing from the repository's config); every later call
        # runs as the repository's owner with safe.directory naming exactly this top level
        cp = runner.run(["git", "-c", "safe.directory=*", "-C", base, "rev-parse", "--path-format=absolute",
                         "--show-toplevel", "--git-common-dir"], check=False)
        lines = (cp.stdout or "").splitlines()
        if cp.returncode != 0 or len(lines) != 2:
            if "bare repository" in (cp.stderr or "") or (cp.returncode == 0 and len(lines) == 1):
                raise UsageError(f"{p} is a bare repository", "point banger at a checkout (a work tree)")
            raise UsageError(f"{p} is not inside a git repository",
                             "run this inside a git checkout, or pass its path (git init + commit first)")
        return cls._from(Path(lines[0]), Path(lines[1]))

    @classmethod
    def _from(cls, root: Path, git_dir: Path) -> HostRepo:
        st = os.stat(git_dir)
        return cls(root, git_dir, (st.st_uid, st.st_gid))

    @property
    def name(self) -> str:
        return self.root.name

    def _prefix(self) -> list[str]:
        uid, gid = self.owner
        if os.geteuid() == 0 and uid != 0:
            # write objects and refs as the repository's owner, never as root
            return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
        return []

    def _env(self, extra: dict | None = None) -> dict:
        env = dict(os.environ)
        env["GIT_TERMINAL_PROMPT"] = "0"
        uid = self.owner[0]
        if os.geteuid() == 0 and uid != 0:
            import pwd

            try:
                env["HOME"] = pwd.getpwuid(uid).pw_dir
            except KeyError:
                env.pop("HOME", None)
        if extra:
            env.update(extra)
        return env

    def git(self, *args, check: bool = True, env: dict | None = None, timeout: float | None = None,
            hint: str | None = None):
        from banger.host import runner

        argv = [*self._prefix(), "git", "-c", f"safe.directory={self.root}", "-C", self.root, *map(str, args)]
        return runner.run(argv, check=check, env=self._env(env), timeout=timeout, hint=hint)

    def private_tmp(self) -> Path:
        """A temp dir the repository's owner can write (under <git-dir>/banger/); the caller removes it."""
        base = self.git_dir / REF_NS
        base.mkdir(exist_ok=True)
        d = Path(tempfile.mkdtemp(prefix="tmp-", dir=base))
        uid, gid = self.owner
        if os.geteuid() == 0 and uid != 0:
            os.chown(base, uid, gid)
            os.chown(d, uid, gid)
        return d

    # ---- reading ----
    def branches(self) -> dict[str, str]:
        cp = self.git("for-each-ref", "--format=%(objectname) %(refname)", "refs/heads/")
        out = {}
        for line in cp.stdout.splitlines():
            sha, ref = line.split(" ", 1)
            out[ref.removeprefix("refs/heads/")] = sha
        return out

    def head(self) -> tuple[str | None, str | None]:
        """(current branch or None when detached, HEAD commit or None when unborn)."""
        cp = self.git("symbolic-ref", "-q", "HEAD", check=False)
        ref = cp.stdout.strip() if cp.returncode == 0 else ""
        branch = ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else None
        cp = self.git("rev-parse", "-q", "--verify", "HEAD^{commit}", check=False)
        return branch, (cp.stdout.strip() or None) if cp.returncode == 0 else None

    def resolve(self, ref: str) -> str | None:
        cp = self.git("rev-parse", "-q", "--verify", f"{ref}^{{commit}}", check=False)
        return cp.stdout.strip() or None if cp.returncode == 0 else None

    def is_ancestor(self, a: str, b: str) -> bool:
        cp = self.git("merge-base", "--is-ancestor", a, b, check=False)
        if cp.returncode not in (0, 1):
            raise CommandFailed(["git", "merge-base", "--is-ancestor", a, b], cp.returncode, cp.stderr)
        return cp.returncode == 0

    def count(self, tip: str, *exclude: str) -> int:
        args = ["rev-list", "--count", tip]
        if exclude:
            args += ["--not", *exclude]
        return int(self.git(*args).stdout.strip())

    def dirty(self) -> bool:
        """Tracked changes against HEAD or untracked (non-ignored) files."""
        return bool(self.git("status", "--porcelain", "--untracked-files=all").stdout.strip())

    # ---- bundles ----
    def bundle_all(self, out: Path) -> dict:
        """Bundle every branch plus HEAD into ``out``; returns {"branches", "head_branch", "head", "bytes"}."""
        branches = self.branches()
        head_branch, head = self.head()
        if not branches and head is None:
            raise UsageError(f"repository {self.root} has no commits yet", "commit something first, then import")
        args = ["bundle", "create", "-q", out, "--branches"]
        if head is not None:
            args.append("HEAD")
        self.git(*args, hint="check the repository with git fsck")
        return {"branches": branches, "head_branch": head_branch, "head": head, "bytes": out.stat().st_size}

    def dirty_patch(self, out: Path, scratch: Path) -> dict:
        """Uncommitted work (tracked changes + untracked, non-ignored files) as one binary patch vs HEAD.

        Uses a throwaway index and object directory, so the user's index and object store
        are untouched. Returns {"files": n, "bytes": n}; files == 0 means nothing was written.
        """
        _branch, head = self.head()
        if head is None:
            raise UsageError("--include-dirty needs a HEAD commit", "commit something first")
        index = scratch / "index"
        objects = scratch / "objects"
        objects.mkdir()
        real_index = Path(self.git("rev-parse", "--path-format=absolute", "--git-path", "index").stdout.strip())
        if real_index.exists():
            shutil.copyfile(real_index, index)  # keeps stat info: only changed files get hashed
        env = {"GIT_INDEX_FILE": str(index), "GIT_OBJECT_DIRECTORY": str(objects),
               "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(self.git_dir / "objects")}
        uid, gid = self.owner
        if os.geteuid() == 0 and uid != 0:
            for p in (scratch, objects, *([index] if index.exists() else [])):
                os.chown(p, uid, gid)
        if not index.exists():
            self.git("read-tree", "HEAD", env=env)
        self.git("add", "-A", env=env)
        names = self.git("diff", "--cached", "--name-only", "-z", "HEAD", env=env).stdout
        files = [n for n in names.split("\0") if n]
        if files:
            self.git("diff", "--cached", "--binary", "--full-index", f"--output={out}", "HEAD", env=env)
        return {"files": len(files), "bytes": out.stat().st_size if files else 0}

    def verify_bundle(self, bundle: Path) -> None:
        """``git bundle verify`` (well-formed header, this repository has every prerequisite commit) plus
        the pack's own checksum trailer, which ``bundle verify`` does not read (a truncated or damaged
        download passes it); the fetch then re-checks every object (fetch.fsckObjects)."""
        check_pack_checksum(bundle)
        cp = self.git("bundle", "verify", bundle, check=False)  # -q would hide the reason
        if cp.returncode != 0:
            err = cp.stderr.strip()
            if "lacks these prerequisite" in err or "requires this ref" in err or "prerequisite" in err:
                raise IntegrityError(f"the exported bundle builds on commits this repository does not have:\n{err}",
                                     "export into the repository the workspace was imported from "
                                     "(--dest-repo), or fetch the missing history first")
            raise IntegrityError(f"the exported bundle failed verification:\n{err}",
                                 "run the export again; if it keeps failing, check the guest repository "
                                 "(banger vm exec VM -- git -C PATH fsck)")

    def fetch_exports(self, bundle: Path, vm_name: str, branches: list[str]) -> list[dict]:
        """Fetch ``branches`` from ``bundle`` into refs/heads/banger/<vm>/<branch>; never the checked-out branch."""
        heads = bundle_heads(bundle, self)
        targets = {b: f"refs/heads/{REF_NS}/{vm_name}/{b}" for b in branches}
        missing = [b for b in branches if f"refs/heads/{b}" not in heads]
        if missing:
            raise IntegrityError(f"the bundle lacks branches {missing}", "run the export again")
        checked_out = self._checked_out_refs()
        busy = [r for r in targets.values() if r in checked_out]
        if busy:
            raise Conflict(f"{', '.join(busy)} is checked out in {self.root}; an export never updates a "
                           f"checked-out branch", "switch to another branch (git switch -), then export again")
        for r in targets.values():
            cp = self.git("check-ref-format", r, check=False)
            if cp.returncode != 0:
                raise UsageError(f"{r} is not a valid ref name", "rename the branch in the guest")
        previous = {b: self.resolve(targets[b]) for b in branches}
        specs = [f"+refs/heads/{b}:{targets[b]}" for b in branches]
        try:
            self.git("-c", "fetch.fsckObjects=true", "fetch", "-q", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules", bundle, *specs)
        except CommandFailed as e:
            raise ExternalError(f"fetching the export into {self.root} failed:\n{e.stderr.strip()[-800:]}",
                                f"a branch named {REF_NS!r} or {REF_NS}/{vm_name} may clash with "
                                f"{REF_NS}/{vm_name}/<branch> (git cannot have both); rename it") from None
        out = []
        for b in branches:
            new = heads[f"refs/heads/{b}"]
            prev = previous[b]
            out.append({"branch": b, "ref": targets[b], "head": new, "previous": prev,
                        "forced": bool(prev and prev != new and not self.is_ancestor(prev, new))})
        return out

    def _checked_out_refs(self) -> set[str]:
        cp = self.git("worktree", "list", "--porcelain")
        return {line.split(" ", 1)[1] for line in cp.stdout.splitlines() if line.startswith("branch ")}


def check_pack_checksum(bundle: Path) -> None:
    """The pack inside a bundle ends with a hash of everything before it: check it (streaming)."""
    import hashlib

    with open(bundle, "rb") as f:
        first = f.readline()
        if first not in (b"# v2 git bundle\n", b"# v3 git bundle\n"):
            raise IntegrityError(f"{bundle} is not a git bundle", "run the command again")
        algo = "sha1"
        while True:
            line = f.readline()
            if not line:
                raise IntegrityError(f"{bundle} is truncated (no pack data)", "run the command again")
            if line == b"\n":
                break
            if line.startswith(b"@object-format=sha256"):
                algo = "sha256"
        start = f.tell()
        size = os.fstat(f.fileno()).st_size
        h = hashlib.new(algo)
        n = h.digest_size
        if size - start < 12 + n:
            raise IntegrityError(f"{bundle} is truncated (pack of {size - start} bytes)", "run the command again")
        if f.read(4) != b"PACK":
            raise IntegrityError(f"{bundle} has no pack data after its header", "run the command again")
        h.update(b"PACK")
        left = size - start - 4 - n
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
        if f.read(n) != h.digest() or left:
            raise IntegrityError(f"{bundle} is damaged: its pack checksum does not match (truncated or corrupted "
                                 f"in transit)", "run the command again")


def bundle_heads(bundle: Path, repo: HostRepo | None = None) -> dict[str, str]:
    """The refs a bundle carries: {refname: sha} (``git bundle list-heads``; needs no repository)."""
    from banger.host import runner

    if repo is not None:
        cp = repo.git("bundle", "list-heads", bundle, check=False)
    else:
        cp = runner.run(["git", "bundle", "list-heads", bundle], check=False)
    if cp.returncode != 0:
        raise IntegrityError(f"{bundle} is not a readable git bundle: {cp.stderr.strip()}", "run the command again")
    out = {}
    for line in cp.stdout.splitlines():
        sha, _, ref = line.partition(" ")
        if _SHA.match(sha) and ref:
            out[ref] = sha
    return out


# ---------------------------------------------------------------- planning (pure)
def classify(host: dict[str, str], guest: dict[str, str], is_ancestor) -> list[dict]:
    """What a re-import does to each host branch. ``is_ancestor(a, b)`` asks the guest repo.

    created: the guest has no such branch; unchanged: same commit; fast_forward: the guest
    branch is behind the host's; guest_ahead: the guest has commits on top of the host's
    (kept as is); diverged: both moved (the import is refused).
    """
    plan = []
    for b, h in sorted(host.items()):
        g = guest.get(b)
        if g is None:
            action = "created"
        elif g == h:
            action = "unchanged"
        elif is_ancestor(g, h):
            action = "fast_forward"
        elif is_ancestor(h, g):
            action = "guest_ahead"
        else:
            action = "diverged"
        plan.append({"branch": b, "host": h, "guest": g, "action": action})
    return plan


# ---------------------------------------------------------------- the guest side
_PREFLIGHT = r"""
command -v git >/dev/null 2>&1 || { echo "git missing"; exit 0; }
echo "git ok"
d="$1"
if [ ! -e "$d" ] && [ ! -L "$d" ]; then k=absent
elif [ -d "$d" ] && [ -e "$d/.git" ]; then k=repo
elif [ -d "$d" ] && [ -z "$(ls -A "$d")" ]; then k=empty
else k=other; fi
echo "kind $k"
if [ "$2" = import ] && [ "$k" != other ]; then
  p=$(dirname "$d"); while [ ! -d "$p" ]; do p=$(dirname "$p"); done
  t="${p%/}/.banger-ws-$3"
  mkdir -m 700 "$t" && echo "tmp $t"
elif [ "$2" = export ] && [ "$k" = repo ]; then
  g=$(git -C "$d" rev-parse --absolute-git-dir) && t="$g/banger-export-$3" && mkdir -m 700 "$t" && echo "tmp $t"
fi
exit 0
"""


# commits reachable from each branch ($2, space separated) but not from the bases ($3...)
_COUNTS = r"""
set -f
cd "$1" || exit 3
bs=$2
shift 2
for b in $bs; do
  n=$(git rev-list --count "refs/heads/$b" --not --ignore-missing "$@") || exit 4
  echo "$b $n"
done
"""

# uncommitted work vs $3 as one binary patch ($2/dirty.patch), through a throwaway index and object dir
_GUEST_DIRTY = r"""
set -e
gd=$(git -C "$1" rev-parse --absolute-git-dir)
mkdir "$2/objects"
export GIT_INDEX_FILE="$2/index" GIT_OBJECT_DIRECTORY="$2/objects" GIT_ALTERNATE_OBJECT_DIRECTORIES="$gd/objects"
git -C "$1" read-tree "$3"
git -C "$1" add -A
git -C "$1" diff --cached --binary --full-index --output="$2/dirty.patch" "$3"
git -C "$1" diff --cached --name-only "$3" | wc -l
"""


# a fresh clone built in a temp dir, then renamed into place (a failure never leaves a half-made dest)
_FRESH = r"""
set -e
work=$1 bundle=$2 how=$3 ref=$4 patch=$5 dest=$6 kind=$7 unborn=$8 remote_spec=$9
shift 9
step() { echo "@step $1" >&2; }
step init
git init -q --initial-branch="$unborn" "$work"
step fetch
git -C "$work" fetch -q --no-tags "$bundle" "$remote_spec" "refs/heads/*:refs/heads/*" "$@"
step checkout
if [ "$how" = branch ]; then git -C "$work" checkout -q "$ref" --; else git -C "$work" checkout -q --detach "$ref" --; fi
if [ -n "$patch" ]; then step apply; git -C "$work" apply --whitespace=nowarn "$patch"; fi
step publish
mkdir -p "$(dirname "$dest")"
if [ "$kind" = empty ]; then rmdir "$dest"; fi
mv -T -- "$work" "$dest"
"""


class Guest:
    """Commands and file copies in a running VM over banger's SSH adapter (host key pinned)."""

    def __init__(self, ctx, vm: dict, transport, op: str):
        self.ctx, self.vm, self.t, self.op = ctx, vm, transport, op

    def _lost(self, why: str) -> BangerError:
        """Explain a dropped connection: a VM that stopped (or is being stopped) vs a broken link."""
        ctx, vm_id = self.ctx, self.vm["id"]
        t0 = time.monotonic()
        while True:
            vm = ctx.store.get_vm(vm_id)
            st = vms.effective_state(ctx, vm) if vm else "deleted"
            if st != vms.RUNNING:
                return InvalidState(f"VM {self.vm['name']} stopped during the workspace {self.op} ({st})",
                                    f"start it (banger vm start {self.vm['name']}) and run the {self.op} again")
            # a concurrent `vm stop` holds vm/<id> while the guest powers off: give it time to finish
            stopping = ctx.locks.is_held(f"vm/{vm_id}")
            if time.monotonic() - t0 > (ctx.cfg.stop_timeout_s + 15.0 if stopping else 3.0):
                break
            time.sleep(0.1)
        return ExternalError(f"lost the SSH connection to {self.vm['name']} during the workspace {self.op}: {why}",
                             f"run the {self.op} again")

    def run(self, argv: list[str], timeout: float = LIGHT_S) -> tuple[int, str, str]:
        from banger.guest import ssh

        try:
            rc, out, err = ssh.run_capture(self.t, [str(a) for a in argv], timeout=timeout)
        except BangerError:
            raise
        except Exception as e:  # noqa: BLE001 - paramiko/socket errors as the guest goes away
            raise self._lost(f"{type(e).__name__}: {e}") from None
        if rc == -1:  # the channel closed without an exit status
            raise self._lost("the session closed without an exit status")
        return rc, out, err

    def check(self, argv: list[str], timeout: float = LIGHT_S, hint: str | None = None) -> str:
        rc, out, err = self.run(argv, timeout)
        if rc != 0:
            raise ExternalError(f"in the guest: {' '.join(map(str, argv))} exited {rc}:\n{err.strip()[-1500:]}",
                                hint or f"inspect the guest: banger vm ssh {self.vm['name']}",
                                details={"argv": argv, "exit_status": rc})
        return out

    def git(self, repo: str, *args, timeout: float = LIGHT_S, hint: str | None = None) -> str:
        return self.check(["git", "-C", repo, *args], timeout, hint)

    def git_rc(self, repo: str, *args, timeout: float = LIGHT_S) -> tuple[int, str, str]:
        return self.run(["git", "-C", repo, *args], timeout)

    def preflight(self, path: str, mode: str) -> dict:
        """One round trip: is git there, what is at ``path``, and a private temp dir for this operation
        (import: next to ``path``, on the same filesystem; export: inside the repository's git dir)."""
        tag = secrets.token_hex(4)
        out = self.check(["sh", "-c", _PREFLIGHT, "sh", path, mode, tag])
        info = {"git": False, "kind": None, "tmp": None}
        for line in out.splitlines():
            k, _, v = line.partition(" ")
            if k == "git":
                info["git"] = v == "ok"
            elif k in ("kind", "tmp"):
                info[k] = v
        if not info["git"]:
            raise self._no_git()
        return info

    def _no_git(self) -> HostError:
        return HostError(f"git is not installed in VM {self.vm['name']}",
                         f"install it in the guest (banger vm exec {self.vm['name']} -- apt-get install -y git, "
                         f"with NAT on), or use an image that has it (the default debian-bookworm does)")

    def _sftp(self):
        try:
            return self.t.open_sftp_client()
        except Exception as e:  # noqa: BLE001
            raise self._lost(f"{type(e).__name__}: {e}") from None

    def put(self, local: Path, remote: str, what: str) -> None:
        size = local.stat().st_size
        sftp = self._sftp()
        try:
            with self.ctx.progress.task(f"uploading {what}", total=size) as task:
                sftp.put(str(local), remote, callback=lambda done, _tot: task.update(completed=done))
        except BangerError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._lost(f"upload failed: {type(e).__name__}: {e}") from None
        finally:
            sftp.close()

    def get(self, remote: str, local: Path, what: str) -> None:
        sftp = self._sftp()
        try:
            size = sftp.stat(remote).st_size
            with self.ctx.progress.task(f"downloading {what}", total=size) as task:
                sftp.get(remote, str(local), callback=lambda done, _tot: task.update(completed=done))
        except BangerError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._lost(f"download failed: {type(e).__name__}: {e}") from None
        finally:
            sftp.close()

    def branches(self, repo: str) -> dict[str, str]:
        out = self.git(repo, "for-each-ref", "--format=%(objectname) %(refname)", "refs/heads/")
        res = {}
        for line in out.splitlines():
            sha, ref = line.split(" ", 1)
            res[ref.removeprefix("refs/heads/")] = sha
        return res

    def head(self, repo: str) -> tuple[str | None, str | None]:
        rc, out, _ = self.git_rc(repo, "symbolic-ref", "-q", "HEAD")
        ref = out.strip() if rc == 0 else ""
        rc2, out2, _ = self.git_rc(repo, "rev-parse", "-q", "--verify", "HEAD^{commit}")
        return (ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else None,
                out2.strip() or None if rc2 == 0 else None)

    def is_ancestor(self, repo: str, a: str, b: str) -> bool:
        rc, _, err = self.git_rc(repo, "merge-base", "--is-ancestor", a, b)
        if rc not in (0, 1):
            raise ExternalError(f"in the guest: git merge-base failed: {err.strip()}", "check the guest repository")
        return rc == 0

    def dirty(self, repo: str) -> list[str]:
        return [line for line in self.git(repo, "status", "--porcelain", "--untracked-files=all").splitlines() if line]


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
        tmp = repo.private_tmp()
        try:
            ctx.progress.step(f"bundling {repo.root}")
            bundle = tmp / "import.bundle"
            info = repo.bundle_all(bundle)
            if branch is not None and branch not in info["branches"]:
                raise NotFound(f"the host repository has no branch {branch!r}",
                               f"branches: {', '.join(sorted(info['branches'])) or '(none)'}")
            host_dirty = repo.dirty()
            patch = None
            dirty_files = 0
            if include_dirty and host_dirty:
                scratch = tmp / "dirty"
                scratch.mkdir()
                pd = repo.dirty_patch(tmp / "dirty.patch", scratch)
                dirty_files = pd["files"]
                patch = tmp / "dirty.patch" if pd["files"] else None
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
            shutil.rmtree(tmp, ignore_errors=True)
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
    rc, _out, err = guest.run(["sh", "-c", _FRESH, "sh", work, gbundle, how, ref, gpatch or "", dest, kind,
                               f"banger-unborn-{secrets.token_hex(4)}", f"+refs/heads/*:refs/remotes/{GUEST_REMOTE}/*",
                               *_head_spec(info)], timeout=HEAVY_S)
    if rc != 0:
        steps = [line[7:] for line in err.splitlines() if line.startswith("@step ")]
        step = steps[-1] if steps else "?"
        msg = "\n".join(line for line in err.splitlines() if not line.startswith("@step "))[-1500:]
        hints = {"apply": "the uncommitted host changes do not apply; commit them on the host, or import "
                          "without --include-dirty",
                 "publish": f"{dest} appeared in the guest meanwhile, or its parent is not writable; import again"}
        raise ExternalError(f"cloning into {guest.vm['name']}:{dest} failed at step {step!r}:\n{msg}",
                            hints.get(step, f"inspect the guest: banger vm ssh {guest.vm['name']}"),
                            details={"step": step, "exit_status": rc})
    return {"fresh": True, "checkout": checkout or info["head"],
            "branches": [{"branch": b, "host": s, "guest": None, "action": "created"}
                         for b, s in sorted(info["branches"].items())]}


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
    gb = guest.branches(dest)
    plan = classify(info["branches"], gb, lambda a, b: guest.is_ancestor(dest, a, b))
    diverged = [p for p in plan if p["action"] == "diverged"]
    if diverged:
        for p in diverged:
            p["guest_only"] = int(guest.git(dest, "rev-list", "--count", p["guest"], "--not", p["host"]).strip())
            p["host_only"] = int(guest.git(dest, "rev-list", "--count", p["host"], "--not", p["guest"]).strip())
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
            p["guest_only"] = int(guest.git(dest, "rev-list", "--count", p["guest"], "--not", p["host"]).strip())
        elif p["action"] == "fast_forward":
            p["new_commits"] = int(guest.git(dest, "rev-list", "--count", p["host"], "--not", p["guest"]).strip())
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
        tmp = gtmp = None
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
            gb = guest.branches(path)
            exclude = sorted(set(bases.values()))
            changed, skipped = [], []
            todo = {b: g for b, g in sorted(gb.items()) if bases.get(b) != g}
            counts = {}
            if todo:  # one round trip: commits on each moved branch that the host does not have
                out = guest.check(["sh", "-c", _COUNTS, "sh", path, " ".join(todo), *exclude])
                counts = {b: int(n) for b, n in (line.split(" ") for line in out.splitlines() if line)}
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
            tmp = repo.private_tmp()
            fetched, patch_path, patch_files = [], None, 0
            if changed:
                ctx.progress.step(f"bundling {len(changed)} branch(es) in {vm['name']}")
                gbundle = f"{gtmp}/export.bundle"
                guest.git(path, "bundle", "create", "-q", gbundle, *[f"refs/heads/{c['branch']}" for c in changed],
                          *(["--not", "--ignore-missing", *exclude] if exclude else []), timeout=HEAVY_S)
                local = tmp / "export.bundle"
                guest.get(gbundle, local, "bundle")
                uid, gid = repo.owner
                if os.geteuid() == 0 and uid != 0:
                    os.chown(local, uid, gid)
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
            if want_patch:
                ctx.progress.step("collecting uncommitted guest changes")
                out = guest.check(["sh", "-c", _GUEST_DIRTY, "sh", path, gtmp, cur_head or "HEAD"], timeout=HEAVY_S)
                patch_files = int(out.strip() or 0)
                gpatch = f"{gtmp}/dirty.patch"
                out_dir = repo.git_dir / REF_NS / vm["name"]
                out_dir.mkdir(parents=True, exist_ok=True)
                stamp = time.strftime("%Y%m%dT%H%M%S")
                patch_path = out_dir / f"uncommitted-{cur_branch or 'detached'}-{stamp}.patch"
                part = tmp / "dirty.patch"
                guest.get(gpatch, part, "uncommitted changes")
                os.replace(part, patch_path)
                uid, gid = repo.owner
                if os.geteuid() == 0 and uid != 0:
                    for p in (repo.git_dir / REF_NS, out_dir, patch_path):
                        os.chown(p, uid, gid)
        finally:
            if gtmp:
                try:
                    guest.run(["rm", "-rf", "--", gtmp])
                except BangerError:
                    pass  # the guest went away
            t.close()
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
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
