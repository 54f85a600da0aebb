"""Workspace test helpers: real git repositories in temp dirs, and one running guest per test module.

``git()`` / ``commit()`` drive real git (fixed identity and dates off, no user config);
``ws_vm`` (module scope, to keep e2e time down) is a throwaway netns + isolated banger
env + one VM created from the default image, removed and leak-checked at module end.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.e2e import assert_no_leaks, default_image, default_kernel, pulled_default_kernel  # noqa: F401
from tests.support.netns import NetNS, create_netns, delete_netns, netns_exists

GIT_ENV = {"GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "Test",
           "GIT_AUTHOR_EMAIL": "test@example.invalid", "GIT_COMMITTER_NAME": "Test",
           "GIT_COMMITTER_EMAIL": "test@example.invalid"}


def git(repo: Path | str, *args, check: bool = True, user: int | None = None) -> str:
    argv = ["git", "-c", "safe.directory=*", "-C", str(repo), *map(str, args)]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--", *argv]
    cp = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **GIT_ENV})
    if check and cp.returncode != 0:
        raise AssertionError(f"git {' '.join(map(str, args))} in {repo} exited {cp.returncode}:\n{cp.stderr}")
    return cp.stdout.rstrip("\n") if check else cp


def commit(repo: Path, rel: str, content: str | bytes, msg: str) -> str:
    p = Path(repo) / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    git(repo, "add", "--", rel)
    git(repo, "commit", "-q", "-m", msg)
    return git(repo, "rev-parse", "HEAD")


def make_repo(path: Path, name: str = "proj") -> Path:
    """A repo with `main` (2 commits) and `dev` (1 more commit on top of main's first), main checked out."""
    repo = path / name
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    commit(repo, "README.md", "hello\n", "first")
    git(repo, "branch", "dev")
    commit(repo, "src/app.py", "print('v1')\n", "second on main")
    git(repo, "checkout", "-q", "dev")
    commit(repo, "dev.txt", "dev work\n", "dev commit")
    git(repo, "checkout", "-q", "main")
    return repo


def refs(repo: Path, prefix: str = "refs/heads/") -> dict[str, str]:
    out = git(repo, "for-each-ref", "--format=%(objectname) %(refname)", prefix)
    return {r: s for s, r in (line.split(" ", 1) for line in out.splitlines() if line)}


_PROBE = r"""
cd "$1" || exit 3
shift
git for-each-ref --format='ref %(objectname) %(refname)' refs/heads/
echo "head $(git symbolic-ref -q HEAD || git rev-parse HEAD)"
git status --porcelain --untracked-files=all | sed 's/^/status /'
for x in ../.banger-ws-* .git/banger-export-*; do [ -e "$x" ] && echo "leftover $x"; done
for f; do if [ -e "$f" ]; then echo "file $f $(base64 -w0 < "$f")"; else echo "file $f -"; fi; done
true
"""


@dataclass
class WsVm:
    ns: NetNS
    name: str
    ip: str

    def exec(self, *cmd, check: bool = True):
        return self.ns.banger("vm", "exec", self.name, "--", *cmd, check=check)

    def git(self, repo: str, *args, check: bool = True) -> str:
        cp = self.exec("git", "-c", "user.name=Guest", "-c", "user.email=guest@example.invalid", "-C", repo,
                       *args, check=check)
        return cp.stdout.rstrip("\n") if check else cp

    def probe(self, repo: str, *files: str) -> dict:
        """One guest round trip: refs, HEAD, status, leftover temp dirs next to ``repo``, and file contents."""
        cp = self.exec("sh", "-c", _PROBE, "sh", repo, *files)
        out = {"refs": {}, "head": None, "status": [], "files": {}, "leftovers": []}
        for line in cp.stdout.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "ref":
                sha, ref = rest.split(" ", 1)
                out["refs"][ref] = sha
            elif kind == "head":
                out["head"] = rest
            elif kind == "status":
                out["status"].append(rest)
            elif kind == "leftover":
                out["leftovers"].append(rest)
            elif kind == "file":
                name, _, data = rest.rpartition(" ")
                out["files"][name] = None if data == "-" else base64.b64decode(data)
        return out

    def ws(self, *args, check: bool = True) -> dict:
        return self.ns.banger_json("workspace", *args, check=check, timeout=600)


@pytest.fixture(scope="module")
def ws_vm(default_image, default_kernel):  # noqa: F811
    """One running guest (default image, 512 MiB) shared by a test module, in its own netns + banger env."""
    from banger.config import load_config
    from tests.support.images import install_image
    from tests.support.kernels import install_kernel

    if os.geteuid() != 0:
        pytest.fail("e2e tests need root")
    home = Path(tempfile.mkdtemp(prefix="ws-home-", dir="/var/tmp"))
    run = Path(tempfile.mkdtemp(prefix="bgw-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANGER_")}
    env.update({"BANGER_HOME": str(home), "BANGER_RUN": str(run), "BANGER_HOSTS_FILE": str(home / "hosts"),
                **GIT_ENV})
    name = create_netns("bgw")
    ns = NetNS(name=name, env=env, home=home, run_dir=run)
    try:
        cfg = load_config(env)
        install_kernel(cfg, default_kernel)
        install_image(cfg, default_image)
        v = ns.banger_json("vm", "create", "--name", "ws-1", "--memory", "512", timeout=400)["data"]
        try:
            yield WsVm(ns=ns, name="ws-1", ip=v["ip"])
        finally:
            left = ns.banger_json("vm", "list", check=False).get("data") or []
            for x in left:
                ns.banger_json("vm", "delete", "-f", x["id"], check=False)
            ns.banger_json("gc", check=False)
            assert_no_leaks(ns)
    finally:
        delete_netns(name)
        assert not netns_exists(name)
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
