"""The guest side of a workspace: commands and file copies in a running VM over banger's SSH
adapter (host key pinned), and the shell scripts that run there (argv lists; every value is a
positional parameter, never spliced into the script).

Everything the guest answers is hostile input: every answer is parsed strictly here (commit ids,
branch names, counts, temp dir paths) and a malformed one is a clear IntegrityError; guest text
shown to the user has its control characters escaped (banger.workspace.refs)."""

from __future__ import annotations

import posixpath
import secrets
import time
from pathlib import Path

from banger.errors import BangerError, ExternalError, HostError, IntegrityError, InvalidState
from banger.vms import runtime as vms
from banger.workspace import refs

LIGHT_S = 120.0                # guest command timeouts (TCG guests are slow)
HEAVY_S = 1800.0

PREFLIGHT = r"""
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
COUNTS = r"""
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
GUEST_DIRTY = r"""
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
FRESH_CLONE = r"""
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
            raise ExternalError(f"in the guest: {refs.shown(' '.join(map(str, argv))[:300])} exited {rc}:\n"
                                f"{refs.printable(err.strip()[-1500:])}",
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
        out = self.check(["sh", "-c", PREFLIGHT, "sh", path, mode, tag])
        info = {"git": False, "kind": None, "tmp": None}
        for line in out.splitlines():
            k, _, v = line.partition(" ")
            if k == "git":
                info["git"] = v == "ok"
            elif k in ("kind", "tmp"):
                info[k] = v
        if not info["git"]:
            raise self._no_git()
        if info["kind"] not in ("absent", "repo", "empty", "other"):
            raise self._odd("the preflight", info["kind"])
        tmp = info["tmp"]
        suffix = f"/.banger-ws-{tag}" if mode == "import" else f"/banger-export-{tag}"
        if tmp is not None and (not tmp.startswith("/") or not tmp.endswith(suffix) or posixpath.normpath(tmp) != tmp
                                or not refs.printable_path(tmp)):
            raise self._odd("the preflight (temp dir)", tmp)
        return info

    def _odd(self, what: str, answer) -> IntegrityError:
        return IntegrityError(f"VM {self.vm['name']} gave an unexpected answer to {what}: {refs.shown(str(answer))[:200]!r}",
                              f"inspect the guest (banger vm ssh {self.vm['name']}); a guest that answers this way "
                              f"is broken or hostile")

    def count(self, out: str, what: str) -> int:
        n = refs.count(out)
        if n is None:
            raise self._odd(what, out)
        return n

    def counts(self, path: str, branches: list[str], exclude: list[str]) -> dict[str, int]:
        """One round trip: per branch, the commits not reachable from ``exclude`` (the recorded bases)."""
        out = self.check(["sh", "-c", COUNTS, "sh", path, " ".join(branches), *exclude])
        got: dict[str, int] = {}
        for line in out.splitlines():
            b, _, n = line.partition(" ")
            if b not in branches or b in got:
                raise self._odd("the commit count", line)
            got[b] = self.count(n, "the commit count")
        if set(got) != set(branches):
            raise self._odd("the commit count", out[-200:])
        return got

    def dirty_patch(self, path: str, gtmp: str, base: str) -> int:
        """Uncommitted guest work vs ``base`` into ``gtmp``/dirty.patch; returns the number of files."""
        out = self.check(["sh", "-c", GUEST_DIRTY, "sh", path, gtmp, base], timeout=HEAVY_S)
        return self.count(out or "0", "the dirty patch")

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

    def branches(self, repo: str) -> tuple[dict[str, str], list[dict]]:
        """({branch: commit} the host accepts, [{"branch", "head"}] whose names it does not)."""
        out = self.git(repo, "for-each-ref", "--format=%(objectname) %(refname)", "refs/heads/")
        res, odd = {}, []
        for line in out.splitlines():
            sha, _, ref = line.partition(" ")
            if not refs.valid_sha(sha) or not ref.startswith("refs/heads/") or ref.removeprefix("refs/heads/") in res:
                raise self._odd("git for-each-ref", line)
            name = ref.removeprefix("refs/heads/")
            if refs.valid_branch(name):
                res[name] = sha
            else:
                odd.append({"branch": refs.shown(name), "head": sha})
        return res, odd

    def head(self, repo: str) -> tuple[str | None, str | None]:
        """(current branch or None when detached or oddly named, HEAD commit or None when unborn)."""
        rc, out, _ = self.git_rc(repo, "symbolic-ref", "-q", "HEAD")
        ref = out.strip() if rc == 0 else ""
        rc2, out2, _ = self.git_rc(repo, "rev-parse", "-q", "--verify", "HEAD^{commit}")
        head = out2.strip() or None if rc2 == 0 else None
        if head is not None and not refs.valid_sha(head):
            raise self._odd("git rev-parse HEAD", head)
        name = ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else None
        return (name if name is not None and refs.valid_branch(name) else None), head

    def is_ancestor(self, repo: str, a: str, b: str) -> bool:
        rc, _, err = self.git_rc(repo, "merge-base", "--is-ancestor", a, b)
        if rc not in (0, 1):
            raise ExternalError(f"in the guest: git merge-base failed: {err.strip()}", "check the guest repository")
        return rc == 0

    def dirty(self, repo: str) -> list[str]:
        return [line for line in self.git(repo, "status", "--porcelain", "--untracked-files=all").splitlines() if line]
