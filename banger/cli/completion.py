"""Shell completion: `banger completion bash|zsh|fish` prints a script; pressing TAB runs
`banger __complete KIND` for the live names only.

The script carries the whole command tree (nouns, verbs, every flag, and which argument or option
takes which kind of name), rendered once from the real typer commands when the script is made, so
completing a command or a flag runs no banger at all.  Names (VMs, images, kernels, snapshots) come
from `banger __complete vm|image|kernel|snapshot`, a typer-free path (banger/cli/main.py) that reads
the state database and nothing else, so TAB costs about as much as `banger vm list`.
"""

from __future__ import annotations

import sys

KINDS = ("vm", "image", "kernel", "snapshot")

# a positional argument or an option's value -> the kind of name it takes
_ARG_KIND = {"vm": "vm", "vms_": "vm", "src": "vm", "snapshot": "snapshot", "snapshots_": "snapshot"}
_OPT_KIND = {"--image": "image", "--kernel": "kernel", "--from-snapshot": "snapshot"}
_NOUN_NAME_KIND = {"image": "image", "kernel": "kernel", "snapshot": "snapshot"}


def names(kind: str) -> list[str]:
    """The live names of one kind, for TAB (never raises: a broken home completes nothing)."""
    import sqlite3

    from banger.config import load_config

    table, col = {"vm": ("vms", "name"), "image": ("images", "name"), "kernel": ("kernels", "name"),
                  "snapshot": ("snapshots", "name")}[kind]
    try:
        db = load_config().db_path
        if not db.exists():
            return []
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2) as c:
            sql = f"SELECT {col} FROM {table}"
            if kind == "vm":
                sql += " WHERE state != 'pooled'"
            return sorted(r[0] for r in c.execute(sql))
    except Exception:  # noqa: BLE001 - completion must never print a traceback into a prompt
        return []


def complete_main(argv: list[str]) -> None:
    kind = argv[0] if argv else ""
    if kind in KINDS:
        sys.stdout.write("".join(n + "\n" for n in names(kind)))


# ---------------------------------------------------------------- the command tree
def tree() -> dict:
    """{noun: {verb: {"flags": [...], "args": [kind|None...], "opts": {flag: kind}}}} from the typer apps
    (a noun with a single command has the verb "")."""
    import importlib

    from banger.cli.commands import COMMANDS

    out: dict = {}
    for noun, (modname, _help) in COMMANDS.items():
        if noun == "completion":
            out[noun] = {"": {"flags": ["-h", "--help"], "args": ["shell"], "opts": {}}}
            continue
        app = importlib.import_module(modname).app
        verbs = {}
        for cmd in app.registered_commands:
            verb = cmd.name or cmd.callback.__name__.replace("_", "-")
            verbs[verb] = _command_info(noun, cmd.callback)
        if len(verbs) == 1 and app.registered_callback is None:
            verbs = {"": next(iter(verbs.values()))}
        out[noun] = verbs
    return out


def _command_info(noun: str, fn) -> dict:
    import inspect
    import typing

    flags, args, opts = ["-h", "--help"], [], {}
    hints = typing.get_type_hints(fn, include_extras=True)
    for pname in inspect.signature(fn).parameters:
        meta = getattr(hints.get(pname), "__metadata__", ())
        info = next((m for m in meta if hasattr(m, "param_decls")), None)
        # typer.Option("-f", "--force") inside Annotated keeps the first name in .default
        raw = [getattr(info, "default", None), *(getattr(info, "param_decls", None) or ())]
        decls = [d for d in raw if isinstance(d, str) and d.startswith("-")]
        if decls:  # an option
            flags += decls
            for d in decls:
                if d in _OPT_KIND:
                    opts[d] = _OPT_KIND[d]
                elif _takes_value(hints[pname]):
                    opts[d] = None  # takes a value we cannot complete (no file names either: banger's own)
        else:  # a positional argument
            kind = _ARG_KIND.get(pname)
            if kind is None and pname == "name" and noun in _NOUN_NAME_KIND and not args:
                kind = _NOUN_NAME_KIND[noun]
            args.append(kind)
    return {"flags": sorted(set(flags)), "args": args, "opts": opts}


def _takes_value(hint) -> bool:
    """An option takes a value unless it is a plain flag (bool)."""
    return getattr(hint, "__origin__", hint) is not bool


# ---------------------------------------------------------------- scripts
# The tree is embedded as one line per command, noun|verb|flags|argument kinds|option=kind, which
# bash and fish read with their own builtins (plus awk/cut in bash).
def _lines(t: dict) -> str:
    rows = []
    for noun, verbs in t.items():
        for verb, info in verbs.items():
            args = ",".join(a or "-" for a in info["args"]) or "-"
            opts = ",".join(f"{k}={v or '-'}" for k, v in info["opts"].items()) or "-"
            rows.append(f"{noun}|{verb or '.'}|{' '.join(info['flags'])}|{args}|{opts}")
    return "\n".join(rows)


_BASH = r"""# banger completion for bash (and zsh through bashcompinit): `banger completion bash`
_banger_tree=$(cat <<'BANGER_TREE'
@LINES@
BANGER_TREE
)
_banger() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    local noun="" verb="" pos=0 i w line rest
    local -a words=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${COMP_WORDS[i]}
        [[ $w == "--" ]] && return 0
        words+=("$w")
    done
    # the noun and the verb are the first words that are not flags
    local -a plain=()
    for w in "${words[@]}"; do [[ $w != -* ]] && plain+=("$w"); done
    if (( ${#plain[@]} == 0 )); then
        COMPREPLY=($(compgen -W "$(printf '%s\n' "$_banger_tree" | cut -d'|' -f1 | sort -u) --help --version --debug" -- "$cur"))
        return 0
    fi
    noun=${plain[0]}
    local verbs
    verbs=$(printf '%s\n' "$_banger_tree" | awk -F'|' -v n="$noun" '$1 == n {print $2}')
    if [[ $verbs == "." ]]; then verb="."; pos=$(( ${#plain[@]} - 1 ));
    elif (( ${#plain[@]} == 1 )); then
        COMPREPLY=($(compgen -W "$verbs --help" -- "$cur")); return 0
    else verb=${plain[1]}; pos=$(( ${#plain[@]} - 2 )); fi
    line=$(printf '%s\n' "$_banger_tree" | awk -F'|' -v n="$noun" -v v="$verb" '$1 == n && $2 == v')
    [[ -z $line ]] && return 0
    local flags args opts kind=""
    IFS='|' read -r _ _ flags args opts <<<"$line"
    # the value of an option?
    local o
    for o in ${opts//,/ }; do
        if [[ ${o%%=*} == "$prev" ]]; then kind=${o#*=}; [[ $kind == "-" ]] && return 0; break; fi
    done
    if [[ -z $kind ]]; then
        if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W "$flags" -- "$cur")); return 0; fi
        # the positional argument's kind (a repeated last argument keeps its kind)
        local -a ak=(${args//,/ })
        (( ${#ak[@]} == 0 )) && return 0
        (( pos >= ${#ak[@]} )) && pos=$(( ${#ak[@]} - 1 ))
        kind=${ak[pos]}
    fi
    case $kind in
        vm|image|kernel|snapshot) COMPREPLY=($(compgen -W "$(banger __complete "$kind" 2>/dev/null)" -- "$cur")) ;;
        shell) COMPREPLY=($(compgen -W "bash zsh fish" -- "$cur")) ;;
    esac
    return 0
}
complete -o default -F _banger banger
"""

_FISH = r"""# banger completion for fish: `banger completion fish | source`
set -g __banger_tree '@LINES@'
function __banger_complete
    set -l toks (commandline -opc)
    set -e toks[1]
    set -l cur (commandline -ct)
    set -l plain
    for t in $toks
        if test "$t" = "--"; return; end
        if not string match -q -- '-*' $t; set plain $plain $t; end
    end
    set -l rows (string split \n -- $__banger_tree)
    if test (count $plain) -eq 0
        for r in $rows; echo (string split '|' -- $r)[1]; end | sort -u
        return
    end
    set -l noun $plain[1]
    set -l verbs
    for r in $rows; set -l f (string split '|' -- $r); if test $f[1] = $noun; set verbs $verbs $f[2]; end; end
    set -l verb .
    set -l pos (math (count $plain) - 1)
    if test "$verbs" != "."
        if test (count $plain) -eq 1; printf '%s\n' $verbs; return; end
        set verb $plain[2]
        set pos (math (count $plain) - 2)
    end
    for r in $rows
        set -l f (string split '|' -- $r)
        if test $f[1] = $noun -a $f[2] = $verb
            if string match -q -- '-*' $cur; string split ' ' -- $f[3]; return; end
            set -l prev $toks[-1]
            for o in (string split ',' -- $f[5])
                set -l kv (string split '=' -- $o)
                if test "$kv[1]" = "$prev"
                    if test "$kv[2]" != "-"; banger __complete $kv[2] 2>/dev/null; end
                    return
                end
            end
            set -l ak (string split ',' -- $f[4])
            set -l i (math $pos + 1)
            if test $i -gt (count $ak); set i (count $ak); end
            switch $ak[$i]
                case vm image kernel snapshot; banger __complete $ak[$i] 2>/dev/null
                case shell; printf '%s\n' bash zsh fish
            end
            return
        end
    end
end
complete -c banger -f -a '(__banger_complete)'
"""


def _render(template: str, t: dict) -> str:
    return template.replace("@LINES@", _lines(t))


def script_for(shell: str) -> str:  # noqa: D401 - the public entry
    t = tree()
    if shell == "bash":
        return _render(_BASH, t)
    if shell == "zsh":
        return "autoload -U +X bashcompinit && bashcompinit\n" + _render(_BASH, t)
    if shell == "fish":
        return _render(_FISH, t)
    from banger.errors import UsageError

    raise UsageError(f"unknown shell {shell!r}", "use one of: bash, zsh, fish")
