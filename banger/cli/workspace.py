"""`banger workspace import|export|list`: move a git repository into a VM and the guest's commits back."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from banger.cli.app import JsonOpt, emit, make_app, make_ctx, print_table, say

app = make_app("Import a git repository into a VM and export changes back.")

VmArg = Annotated[str, typer.Argument(metavar="VM", help="VM name or id (must be running).")]


def _e(s) -> str:
    from rich.markup import escape

    return escape(str(s))


def _short(sha) -> str:
    return str(sha)[:12] if sha else "-"


@app.command("import", help="Copy a host git repository (all branches + HEAD, as a git bundle) into a running VM. "
                            "Re-importing fast-forwards the guest's branches and refuses if the guest has "
                            "diverging commits. Uncommitted host changes stay behind unless --include-dirty.")
def import_(vm: VmArg,
            repo: Annotated[str, typer.Argument(metavar="[REPO_PATH]", help="Host repository (default: .).")] = ".",
            dest: Annotated[str | None, typer.Option("--dest", help="Guest path (default: /root/<repo-name>).")]
            = None,
            branch: Annotated[str | None, typer.Option("--branch", "-b",
                                                       help="Branch to check out in the guest (default: the "
                                                            "host's current one).")] = None,
            include_dirty: Annotated[bool, typer.Option("--include-dirty",
                                                        help="Also carry uncommitted host changes (tracked edits "
                                                             "and untracked, non-ignored files) as a patch.")]
            = False,
            json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger import validate
        from banger.workspace import service as workspace

        for flag, val in (("REPO_PATH", repo), ("--dest", dest), ("--branch", branch)):
            if val is not None:
                validate.text(val, flag)
        return workspace.import_repo(ctx, vm, repo, dest=dest, branch=branch, include_dirty=include_dirty)

    def render(d):
        how = "cloned" if d["fresh"] else "updated"
        say(f"{how} {_e(d['host_repo'])} into {_e(d['vm'])}:{_e(d['dest'])} "
            f"(checked out {_e(d['checkout'])}, bundle {d['bundle_bytes']} bytes, {d['seconds']:.1f}s)")
        for b in d["branches"]:
            extra = ""
            if b["action"] == "fast_forward":
                extra = f" (+{b.get('new_commits', '?')} commits)"
            elif b["action"] == "guest_ahead":
                extra = f" (kept: the guest has {b.get('guest_only', '?')} commits on top)"
            say(f"  {_e(b['branch']):<24} {_short(b['host'])}  {b['action'].replace('_', '-')}{extra}")
        if d["dirty_included"]:
            say(f"included {d['dirty_files']} uncommitted file(s) from the host")
        elif d["host_dirty"]:
            say("[yellow]note:[/] uncommitted host changes were NOT included (only commits are imported; "
                "pass --include-dirty to carry them)")
        else:
            say("uncommitted host changes: none (--include-dirty is off by default)")

    emit(go, json_out=json_out, render=render)


@app.command("export", help="Bring the commits made in the VM since the import back into the host repository, "
                            "as refs/heads/banger/<vm>/<branch>; your own branches are never touched.")
def export(vm: VmArg,
           dest_repo: Annotated[str, typer.Option("--dest-repo", help="Host repository to fetch into (default: .).")]
           = ".",
           path: Annotated[str | None, typer.Option("--path", help="Guest repository (default: the one imported "
                                                                   "into this VM).")] = None,
           include_dirty: Annotated[bool, typer.Option("--include-dirty",
                                                       help="Also bring uncommitted guest changes back as a patch "
                                                            "file (under <git-dir>/banger/<vm>/).")] = False,
           json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger import validate
        from banger.workspace import service as workspace

        for flag, val in (("--dest-repo", dest_repo), ("--path", path)):
            if val is not None:
                validate.text(val, flag)
        return workspace.export_repo(ctx, vm, dest_repo=dest_repo, path=path, include_dirty=include_dirty)

    def render(d):
        if d["nothing"]:
            say(_e(d["message"]))
            return
        for b in d["branches"]:
            forced = " (replaced an earlier export that is not an ancestor)" if b["forced"] else ""
            say(f"{_e(b['ref'])}: {b['commits']} commit(s), now {_short(b['head'])}{forced}")
        for s in d["skipped"]:
            say(f"  skipped {_e(s['branch'])}: {_e(s['reason'])}")
        if d["dirty_patch"]:
            say(f"uncommitted guest changes ({d['dirty_files']} file(s)) saved as {_e(d['dirty_patch'])}\n"
                f"  apply on top of {_short(d['guest_head'])} with: git apply {_e(d['dirty_patch'])}")
        elif d["guest_dirty"]:
            say("[yellow]note:[/] the guest has uncommitted changes that were NOT exported "
                "(commit them, or pass --include-dirty)")
        if d["branches"]:
            first = d["branches"][0]
            rng = f"{_short(first['base'])}..{first['ref']}" if first.get("base") else first["ref"]
            say(f"review with: git log --oneline {_e(rng)}")

    emit(go, json_out=json_out, render=render)


@app.command("list", help="Show what was imported into a VM, where, and when.")
def list_(vm: VmArg, json_out: JsonOpt = False):
    ctx = make_ctx(json_out)

    def go():
        from banger.workspace import service as workspace

        return workspace.list_workspaces(ctx, vm)

    def render(d):
        if not d["workspaces"]:
            say(f"nothing imported into {_e(d['vm'])} (banger workspace import {_e(d['vm'])} REPO)")
            return
        rows = []
        for w in d["workspaces"]:
            exp = w.get("last_export") or {}
            rows.append([w["dest"], w["host_repo"], ", ".join(sorted(w["branches"])), w["checkout"],
                         time.strftime("%Y-%m-%d %H:%M", time.localtime(w["imported_at"])), w["imports"],
                         time.strftime("%Y-%m-%d %H:%M", time.localtime(exp["at"])) if exp.get("at") else "-"])
        print_table(["guest path", "host repo", "branches", "checkout", "imported", "imports", "exported"], rows,
                    title=f"{d['vm']} ({d['state']})")

    emit(go, json_out=json_out, render=render)
