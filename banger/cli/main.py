"""Entry point. A lazy command table: `banger --help` imports no command module.

Each noun lives in its own module (banger/cli/<noun>.py) exposing a typer app;
it is imported only when that command runs.
"""

from __future__ import annotations

import os
import sys

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "vm": ("banger.cli.vm", "Create, run, stop and manage microVMs."),
    "image": ("banger.cli.image", "Build, pull, register and manage root filesystem images."),
    "kernel": ("banger.cli.kernel", "Pull, import and manage guest kernels."),
    "pool": ("banger.cli.pool", "Warm, inspect and drain the TAP device pool."),
    "snapshot": ("banger.cli.snapshot", "Snapshot VMs and manage snapshots."),
    "doctor": ("banger.cli.doctor", "Check the host and say how to fix what is missing."),
    "gc": ("banger.cli.gc", "Remove leaked TAPs, processes, sockets, loop devices and rows."),
}


def _build():
    import click

    class LazyGroup(click.Group):
        def list_commands(self, ctx):
            return list(COMMANDS)

        def get_command(self, ctx, name):
            if name not in COMMANDS:
                return None
            import importlib

            import typer.main

            mod = importlib.import_module(COMMANDS[name][0])
            cmd = typer.main.get_command(mod.app)
            cmd.name = name
            return cmd

        def format_commands(self, ctx, formatter):
            rows = [(n, h) for n, (_, h) in COMMANDS.items()]
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def _version(ctx, param, value):
        if value and not ctx.resilient_parsing:
            from banger import __version__

            click.echo(f"banger {__version__}")
            ctx.exit()

    @click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]},
                 epilog="Every command takes --json. Exit codes: see README.md.")
    @click.option("--debug", is_flag=True, help="Show tracebacks for internal errors.")
    @click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
                  help="Print the version and exit.")
    def cli(debug: bool):
        """banger: disposable Linux microVMs on your own host, fast."""
        if debug:
            os.environ["BANGER_DEBUG"] = "1"

    return cli


def main(argv: list[str] | None = None) -> None:
    import click

    argv = sys.argv[1:] if argv is None else argv
    cli = _build()
    try:
        rv = cli.main(args=argv, prog_name="banger", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        from banger.errors import EXIT_USAGE

        if "--json" in argv:
            import json

            print(json.dumps({"ok": False, "error": {"code": "usage", "message": e.format_message(),
                                                       "hint": "see --help"}}))
        else:
            e.show()
        sys.exit(EXIT_USAGE if e.exit_code in (1, 2) else e.exit_code)
    if isinstance(rv, int):
        sys.exit(rv)


if __name__ == "__main__":
    main()
