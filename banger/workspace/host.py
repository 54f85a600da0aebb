"""The host side of a workspace: the user's git repository (discovery, reading, bundles, the
dirty patch, verifying and fetching an export). Every git call is an argv list; when banger runs
as root on a repository owned by someone else, git runs as that owner."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from banger.errors import CommandFailed, Conflict, ExternalError, IntegrityError, NotFound, UsageError

REF_NS = "banger"              # exports land in refs/heads/banger/<vm-name>/<branch> on the host
_SHA = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")


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
