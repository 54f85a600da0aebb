"""The host side of a workspace: the user's git repository (discovery, reading, bundles, the
dirty patch, verifying and fetching an export). Every git call is an argv list.

A repository may belong to another user, who controls every path inside it (``.git/banger`` may
be a symlink to anywhere). So when banger runs as root on such a repository it never creates,
chowns, renames or reads anything through those paths itself: git and every file operation inside
the repository run as the repository's owner (``setpriv`` in the child), discovery included; the
files banger needs (bundles, patches) live in banger's own private staging dir and reach the
owner's git as an inherited descriptor (``/dev/fd/N``) or through its stdin/stdout.
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

from banger.errors import (
    CommandFailed,
    Conflict,
    ExternalError,
    HostError,
    IntegrityError,
    NotFound,
    UsageError,
)
from banger.workspace.refs import SHA as _SHA

REF_NS = "banger"              # exports land in refs/heads/banger/<vm-name>/<branch> on the host


def _as_user(uid: int, gid: int) -> list[str]:
    """The argv prefix that runs a command as ``uid`` (empty when that is who we are already)."""
    if os.geteuid() == 0 and uid != 0:
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    return []


def _env_for(uid: int, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["GIT_TERMINAL_PROMPT"] = "0"
    if os.geteuid() == 0 and uid != 0:
        import pwd

        try:
            env["HOME"] = pwd.getpwuid(uid).pw_dir
        except KeyError:
            env.pop("HOME", None)
    if extra:
        env.update(extra)
    return env


def create_private(path: Path) -> int:
    """A new file of banger's own (its staging dir): never an existing one, never through a link."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


class HostRepo:
    """A git repository on the host. Every git call is an argv list run through banger.host.runner,
    as the repository's owner."""

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
        # discovery runs as the directory's owner too (never git as root in someone else's tree); every
        # later call runs as the repository's owner with safe.directory naming exactly this top level
        st = os.stat(base)
        cp = runner.run([*_as_user(st.st_uid, st.st_gid), "git", "-c", "safe.directory=*", "-C", base,
                         "rev-parse", "--path-format=absolute", "--show-toplevel", "--git-common-dir"],
                        check=False, env=_env_for(st.st_uid))
        lines = (cp.stdout or "").splitlines()
        if cp.returncode != 0 or len(lines) != 2:
            if "bare repository" in (cp.stderr or "") or (cp.returncode == 0 and len(lines) == 1):
                raise UsageError(f"{p} is a bare repository", "point banger at a checkout (a work tree)")
            raise UsageError(f"{p} is not inside a git repository",
                             "run this inside a git checkout, or pass its path (git init + commit first)")
        return cls._from(Path(lines[0]), Path(lines[1]))

    @classmethod
    def _from(cls, root: Path, git_dir: Path) -> HostRepo:
        st, top = os.stat(git_dir), os.stat(root)
        if st.st_uid != top.st_uid:
            raise UsageError(f"the work tree {root} belongs to uid {top.st_uid} but its git directory {git_dir} "
                             f"to uid {st.st_uid}",
                             "banger runs git as the repository's owner; give both to one user (chown -R)")
        return cls(root, git_dir, (st.st_uid, st.st_gid))

    @property
    def name(self) -> str:
        return self.root.name

    def _prefix(self) -> list[str]:
        return _as_user(*self.owner)  # objects, refs and files in the repository stay the owner's

    def _env(self, extra: dict | None = None) -> dict:
        return _env_for(self.owner[0], extra)

    def git(self, *args, check: bool = True, env: dict | None = None, timeout: float | None = None,
            hint: str | None = None, stdout=None, pass_fds: tuple[int, ...] = ()):
        from banger.host import runner

        argv = [*self._prefix(), "git", "-c", f"safe.directory={self.root}", "-C", self.root, *map(str, args)]
        return runner.run(argv, check=check, env=self._env(env), timeout=timeout, hint=hint, stdout=stdout,
                          pass_fds=pass_fds)

    def as_owner(self, script: str, *args, stdin=None, check: bool = True, timeout: float | None = 120):
        """A small sh script (values as positional parameters) run as the repository's owner: the only
        way banger creates, moves or removes anything inside the repository."""
        from banger.host import runner

        return runner.run([*self._prefix(), "sh", "-c", script, "sh", *map(str, args)], stdin=stdin,
                          check=check, env=self._env(), timeout=timeout)

    def private_tmp(self) -> Path:
        """A temp dir under <git-dir>/banger/ made by the repository's owner (their scratch space, e.g. the
        dirty patch's index); remove it with ``remove_tmp``."""
        base = self.git_dir / REF_NS
        cp = self.as_owner('umask 077 && mkdir -p -- "$1" && mktemp -d -- "$1/tmp-XXXXXXXX"', base, check=False)
        made = (cp.stdout or "").strip()
        if cp.returncode != 0 or "\n" in made or not made.startswith(f"{base}/tmp-"):
            raise HostError(f"cannot create a temp dir in {base} as the repository's owner (uid {self.owner[0]}): "
                            f"{(cp.stderr or '').strip()[-300:]}",
                            f"the repository's owner must be able to write {base} (is it a link to elsewhere?)")
        return Path(made)

    def remove_tmp(self, d: Path) -> None:
        self.as_owner('rm -rf -- "$1"', d, check=False)

    def save_patch(self, local: Path, vm_name: str, filename: str) -> Path:
        """Store banger's downloaded ``local`` as <git-dir>/banger/<vm>/<filename>, written by the owner."""
        d = self.git_dir / REF_NS / vm_name
        dest = d / filename
        with open(local, "rb") as f:  # banger's own file, in its staging dir
            cp = self.as_owner('umask 022 && mkdir -p -- "$1" && t=$(mktemp -- "$1/.patch-XXXXXXXX") && '
                               'cat > "$t" && mv -f -- "$t" "$2"', d, dest, stdin=f, check=False, timeout=600)
        if cp.returncode != 0:
            raise HostError(f"cannot write {dest} as the repository's owner (uid {self.owner[0]}): "
                            f"{(cp.stderr or '').strip()[-300:]}",
                            f"the repository's owner must be able to write {d}")
        return dest

    @contextmanager
    def _reader(self, path: Path):
        """``path`` (banger's own file) as ``/dev/fd/N`` for the owner's git: an inherited descriptor, so
        the owner reads it without any path of theirs leading there."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise IntegrityError(f"{path} is not a readable git bundle: {e.strerror}", "run the command again"
                                 ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IntegrityError(f"{path} is not a regular file", "run the command again")
            if st.st_uid == os.geteuid() and st.st_uid != self.owner[0]:
                os.fchmod(fd, 0o644)  # reopening /dev/fd/N checks the file's mode; its dir stays private
            os.set_inheritable(fd, True)
            yield fd, f"/dev/fd/{fd}"
        finally:
            os.close(fd)

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
        args = ["bundle", "create", "-q", "-", "--branches"]  # "-": to our descriptor, no file of theirs
        if head is not None:
            args.append("HEAD")
        fd = create_private(out)
        try:
            self.git(*args, hint="check the repository with git fsck", stdout=fd)
            size = os.fstat(fd).st_size
        except BaseException:
            os.unlink(out)
            raise
        finally:
            os.close(fd)
        return {"branches": branches, "head_branch": head_branch, "head": head, "bytes": size}

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
        real_index = Path(self.git("rev-parse", "--path-format=absolute", "--git-path", "index").stdout.strip())
        # the owner makes the throwaway object dir and copies their own index (keeps stat info: only
        # changed files get hashed); banger itself reads or writes nothing in the repository
        copied = self.as_owner('mkdir -- "$1/objects" && if [ -f "$2" ]; then cp -- "$2" "$1/index" && echo copied; fi',
                               scratch, real_index).stdout.strip() == "copied"
        env = {"GIT_INDEX_FILE": str(index), "GIT_OBJECT_DIRECTORY": str(objects),
               "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(self.git_dir / "objects")}
        if not copied:
            self.git("read-tree", "HEAD", env=env)
        self.git("add", "-A", env=env)
        names = self.git("diff", "--cached", "--name-only", "-z", "--no-ext-diff", "HEAD", env=env).stdout
        files = [n for n in names.split("\0") if n]
        size = 0
        if files:
            fd = create_private(out)
            try:
                self.git("diff", "--cached", "--binary", "--full-index", "--no-color", "--no-ext-diff",
                         "--no-textconv", "HEAD", env=env, stdout=fd)
                size = os.fstat(fd).st_size
            except BaseException:
                os.unlink(out)
                raise
            finally:
                os.close(fd)
        return {"files": len(files), "bytes": size}

    def verify_bundle(self, bundle: Path) -> None:
        """``git bundle verify`` (well-formed header, this repository has every prerequisite commit) plus
        the pack's own checksum trailer, which ``bundle verify`` does not read (a truncated or damaged
        download passes it); the fetch then re-checks every object (fetch.fsckObjects)."""
        check_pack_checksum(bundle)
        with self._reader(bundle) as (fd, path):
            cp = self.git("bundle", "verify", "--", path, check=False, pass_fds=(fd,))  # -q would hide the reason
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
            with self._reader(bundle) as (fd, path):
                self.git("-c", "fetch.fsckObjects=true", "fetch", "-q", "--no-tags", "--no-write-fetch-head",
                         "--no-recurse-submodules", "--", path, *specs, pass_fds=(fd,))
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

    try:
        fd = os.open(bundle, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise IntegrityError(f"{bundle} is not a readable git bundle: {e.strerror}", "run the command again") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IntegrityError(f"{bundle} is not a regular file", "run the command again")
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
        with repo._reader(bundle) as (fd, path):
            cp = repo.git("bundle", "list-heads", "--", path, check=False, pass_fds=(fd,))
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
