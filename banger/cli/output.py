"""CLI output without typer: the --json envelope, the one place mapping exceptions to messages
and exit codes, tables. Typer-free so the fast path of `banger vm list` (banger/cli/main.py)
can use exactly the same code as the typer commands."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

from banger.errors import EXIT_ERROR, EXIT_INTERRUPTED, BangerError


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout_console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def make_ctx(json_out: bool, *, tighten: bool = True):
    """The command's Ctx. A bad config file or environment (banger/validate.py) ends the command here
    with the one error envelope, never a traceback; existing homes wider than 0700 are tightened."""
    from banger.cli.progress import CliProgress
    from banger.config import tighten_top_dirs
    from banger.context import Ctx

    try:
        ctx = Ctx(progress=CliProgress(json_out))
    except BangerError as e:
        _fail(e.to_dict(), e.exit_code, json_out)
    if tighten:
        tighten_top_dirs(ctx.cfg)
    return ctx


def emit(fn: Callable[[], object], *, json_out: bool, render: Callable[[object], None] | None = None,
         exit_code: Callable[[object], int] | None = None) -> None:
    """Run ``fn``; print its result (``render`` or the JSON envelope); map errors to exit codes."""
    try:
        data = fn()
    except BangerError as e:
        _fail(e.to_dict(), e.exit_code, json_out)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP (banger.interrupts)
        from banger.interrupts import reason

        _fail({"code": "interrupted", "message": reason(e), "hint": None}, getattr(e, "exit_code", EXIT_INTERRUPTED),
              json_out)
    except Exception as e:  # an internal bug: say so plainly, traceback only with --debug
        if os.environ.get("BANGER_DEBUG"):
            import traceback

            traceback.print_exc()
        _fail({"code": "internal", "message": f"internal error: {type(e).__name__}: {e}",
               "hint": "run again with banger --debug ... for a traceback, and report it"}, EXIT_ERROR, json_out)
    if json_out:
        sys.stdout.write(json.dumps({"ok": True, "data": data}, default=str) + "\n")
    elif render is not None:
        render(data)
    sys.stdout.flush()
    if exit_code is not None:
        raise SystemExit(exit_code(data))


def _fail(err: dict, code: int, json_out: bool):
    try:
        if json_out:
            sys.stdout.write(json.dumps({"ok": False, "error": err}, default=str) + "\n")
            sys.stdout.flush()
        else:
            con = _stderr_console()
            con.print(f"[bold red]error:[/] {_escape(err['message'])}")
            if err.get("hint"):
                con.print(f"[yellow]hint:[/] {_escape(err['hint'])}")
    except OSError:  # the terminal went away (SIGHUP): the exit code still tells
        pass
    raise SystemExit(code)


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(str(s))


def print_table(columns: list[str], rows: list[list[object]], title: str | None = None) -> None:
    """A plain aligned table. Deliberately not rich: list commands are the hot path of scripts and
    prompts, and rich's import + layout cost more than the rest of `banger vm list` (bench/startup.py)."""
    cells = [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    tty = sys.stdout.isatty()
    out = []
    if title:
        out.append(f"\033[1m{title}\033[0m" if tty else title)
    head = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()
    out.append(f"\033[1m{head}\033[0m" if tty else head)
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    sys.stdout.write("\n".join(out) + "\n")


def human_bytes(n) -> str:
    if n is None:
        return ""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_kv(d: dict, title: str | None = None) -> None:
    con = _stdout_console()
    if title:
        con.print(f"[bold]{_escape(title)}[/]")
    width = max((len(k) for k in d), default=0)
    for k, v in d.items():
        con.print(f"{k.ljust(width)}  {_escape(v if not isinstance(v, (dict, list)) else json.dumps(v))}")


def say(msg: str) -> None:
    _stdout_console().print(msg)
