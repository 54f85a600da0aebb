"""Entry point with a lazy command table.

Only the module of the command being run is imported: `banger vm list` imports
banger.cli.vm and nothing else; `banger --help` imports no command module at all
(each noun is listed through a placeholder carrying its one-line help).  Uses only
typer's public API (typer 0.29 vendors its own click; we never import click).
"""

from __future__ import annotations

import os
import sys

from banger.cli.commands import COMMANDS

PRIVATE_UMASK = 0o077  # (banger.config.PRIVATE_UMASK; not imported here: `banger --help` imports nothing)


def _invoked(argv: list[str]) -> str | None:
    for a in argv:
        if a.startswith("-"):
            continue
        return a if a in COMMANDS else None
    return None


def _version(value: bool):
    if value:
        import typer

        from banger import __version__

        typer.echo(f"banger {__version__}")
        raise typer.Exit()


def _prune(sub, argv: list[str]) -> None:
    """Keep only the subcommand being run (typer converts every registered command to a click
    command on each start; a process runs exactly one). Help listings keep them all."""
    if any(a in ("-h", "--help") for a in argv):
        return
    words = [a for a in argv if not a.startswith("-")]
    if len(words) < 2:
        return
    keep = [c for c in sub.registered_commands if (c.name or c.callback.__name__.replace("_", "-")) == words[1]]
    if keep:
        sub.registered_commands[:] = keep
        if sub.registered_callback is None:  # stay a group: typer collapses a 1-command app otherwise
            sub.callback()(_group)


def _group() -> None:
    """(no options of its own)"""


def build_app(argv: list[str]):
    import importlib

    import typer

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                      no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]},
                      help=ABOUT, epilog=EPILOG)

    @app.callback()
    def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for internal errors."),
              version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit.")):
        if debug:
            os.environ["BANGER_DEBUG"] = "1"

    target = _invoked(argv)
    for name, (modname, help_) in COMMANDS.items():
        if name != target:
            # a placeholder: listed in --help, never imported
            app.add_typer(typer.Typer(help=help_), name=name, help=help_)
            continue
        sub = importlib.import_module(modname).app
        _prune(sub, argv)
        if len(sub.registered_commands) == 1 and not sub.registered_groups and sub.registered_callback is None:
            info = sub.registered_commands[0]
            app.command(name=name, help=info.help or help_)(info.callback)
        else:
            app.add_typer(sub, name=name, help=help_)
    return app


ABOUT = "banger: disposable Linux microVMs on your own host, fast."
EPILOG = "Every command takes --json. Exit codes: see README.md."
ROOT_OPTIONS = [("--debug", "Show tracebacks for internal errors."), ("--version", "Print the version and exit."),
                ("-h, --help", "Show this message and exit.")]


def top_help() -> str:
    """The top-level help, rendered from the command table (no typer import for `banger --help`)."""
    def table(rows):
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)

    return (f"Usage: banger [OPTIONS] COMMAND [ARGS]...\n\n  {ABOUT}\n\nOptions:\n{table(ROOT_OPTIONS)}\n\n"
            f"Commands:\n{table([(n, h) for n, (_, h) in COMMANDS.items()])}\n\n  {EPILOG}\n")


def _fast_path(argv: list[str]) -> bool:
    """Typer-free paths for the hottest commands: `banger [--help]`, `banger vm list [-q]
    [--json]` (same body as the typer command, banger/cli/vm_list.py), and `vm create` / `vm run`
    (banger/cli/fast.py: their options as generated from the typer commands, their bodies in
    banger/cli/vm_create.py). Anything a fast path does not handle exactly takes the typer path."""
    if argv in ([], ["-h"], ["--help"]):
        sys.stdout.write(top_help())
        return True
    if argv[:1] == ["__complete"]:  # TAB in a shell: live names only (banger/cli/completion.py)
        from banger.cli.completion import complete_main

        complete_main(argv[1:])
        return True
    if argv[:2] in (["vm", "create"], ["vm", "run"]):  # the main job: the same body as the typer command
        from banger.cli import fast

        return fast.run(argv)
    if argv[:2] != ["vm", "list"]:
        return False
    from banger.cli.vm_list import FLAGS, run

    rest = argv[2:]
    if not all(a in FLAGS for a in rest):
        return False
    run(**{FLAGS[a]: True for a in rest})
    return True


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    caller = os.umask(PRIVATE_UMASK)  # other local users get nothing: every file banger creates is 0600, dirs 0700
    os.environ["BANGER_CALLER_UMASK"] = f"{caller:o}"  # what the user's own copies (vm cp) are created with
    from banger import interrupts

    interrupts.install()  # SIGTERM / SIGHUP unwind like Ctrl-C (plans undo, `vm run --rm` deletes)
    if _fast_path(argv):
        return
    app = build_app(argv)
    try:
        rv = app(args=argv, prog_name="banger", standalone_mode=False)
    except SystemExit:
        raise
    except KeyboardInterrupt as e:
        sys.exit(getattr(e, "exit_code", 130))
    except Exception as e:  # typer's (vendored click) usage errors: no public base class to name
        fmt = getattr(e, "format_message", None)
        code = getattr(e, "exit_code", None)
        if fmt is None or code is None:
            if type(e).__name__ == "Abort":
                sys.exit(130)
            raise
        from banger.errors import EXIT_USAGE

        if "--json" in argv:
            import json

            print(json.dumps({"ok": False, "error": {"code": "usage", "message": fmt(), "hint": "see --help"}}))
        elif hasattr(e, "show"):
            e.show()
        else:
            print(f"error: {fmt()}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if isinstance(rv, int):
        sys.exit(rv)


def _exit_now(code) -> None:
    """Leave without the interpreter's teardown (tens of ms of module and object finalisation after a
    `vm create` loaded paramiko and cryptography): every file banger writes is closed and renamed into
    place before a command returns, SQLite commits are on disk (WAL), so there is nothing left to do
    but flush the two streams. Only when no non-daemon thread is still working; else the normal exit."""
    import threading

    if code is None:
        code = 0
    elif not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe / terminal: the exit code still tells
            pass
    os._exit(code)


def entry() -> None:
    """The `banger` program (console script and ``python -m banger.cli.main``): ``main`` then a fast
    exit. ``main`` itself returns / raises SystemExit as usual (tests call it in-process)."""
    try:
        main()
    except SystemExit as e:
        _exit_now(e.code)
    _exit_now(0)


if __name__ == "__main__":
    entry()
