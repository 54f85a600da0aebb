"""`banger completion bash|zsh|fish`: print a completion script (banger/cli/completion.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from banger.cli.app import make_app

app = make_app("Print a shell completion script.")


@app.command(help="Print a completion script: eval \"$(banger completion bash)\" in ~/.bashrc; zsh: the same "
                  "with zsh; fish: banger completion fish | source.")
def completion(shell: Annotated[str, typer.Argument(help="bash, zsh or fish.")]):
    import sys

    from banger.cli.completion import script_for
    from banger.cli.output import emit

    emit(lambda: script_for(shell), json_out=False, render=lambda s: sys.stdout.write(s))
