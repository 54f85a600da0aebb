"""nftables plumbing: run ``nft`` with JSON, read banger's tables back, build expressions.

banger keeps everything it does to nftables in its own two tables per bridge, both named
``banger-<bridge>``: one in the ``bridge`` family (layer 2: anti-spoofing, isolation of
guests from each other) and one in the ``ip`` family (layer 3: egress policy, NAT, guest to
host filtering, published ports). What goes in them is decided in banger.net.policy; this
module only talks to the kernel:

* every change is one atomic ``nft -j -f -`` transaction (JSON in, argv lists only);
* ``read_table`` parses a table into chains (with rule handles and comments) and map
  elements normalised to plain Python values, so callers compare state without parsing
  nft's text output.

``enable_nat``/``disable_nat``/``list_nat`` are the older NAT-only entry points, kept so
callers written against them keep working; they go through banger.net.policy.
"""

from __future__ import annotations

import json
import os

from banger.errors import CommandFailed, HostError

TABLE_PREFIX = "banger-"
FAMILIES = ("bridge", "ip")


def table_name(bridge: str) -> str:
    """banger's table name (in both families) for ``bridge``."""
    return TABLE_PREFIX + bridge


def _nft_bin() -> str:
    from banger.host.runner import require

    return require("nft", "nftables")


class _Result:
    __slots__ = ("stdout", "stderr", "returncode")

    def __init__(self, stdout: str, stderr: str, returncode: int):
        self.stdout, self.stderr, self.returncode = stdout, stderr, returncode


_LIB: list = []  # [ctypes CDLL or None], loaded once per process
_JSON_OUTPUT = 1 << 4  # NFT_CTX_OUTPUT_JSON (libnftables.h); with it, JSON input is parsed too


def _libnftables():
    """libnftables (the library the nft binary is a thin front-end of), through ctypes; None when it
    cannot be loaded (then the binary runs). In-process, a list or a transaction costs well under a
    millisecond; starting the nft binary costs 10-15 ms each time on a loaded host."""
    if not _LIB:
        lib = None
        if os.environ.get("BANGER_NFT_BINARY") != "1":
            try:
                import ctypes

                lib = ctypes.CDLL("libnftables.so.1")
                vp, cp = ctypes.c_void_p, ctypes.c_char_p
                for fn, args, res in (("nft_ctx_new", [ctypes.c_uint32], vp), ("nft_ctx_free", [vp], None),
                                      ("nft_ctx_output_set_flags", [vp, ctypes.c_uint], None),
                                      ("nft_ctx_buffer_output", [vp], ctypes.c_int),
                                      ("nft_ctx_buffer_error", [vp], ctypes.c_int),
                                      ("nft_ctx_get_output_buffer", [vp], cp),
                                      ("nft_ctx_get_error_buffer", [vp], cp),
                                      ("nft_run_cmd_from_buffer", [vp, cp], ctypes.c_int)):
                    f = getattr(lib, fn)
                    f.argtypes, f.restype = args, res
            except (OSError, AttributeError):
                lib = None
        _LIB.append(lib)
    return _LIB[0]


def _run_lib(lib, args: list[str], input: str | None) -> _Result:
    """``nft <args>`` in-process: ``-j`` (JSON out), and ``-f -`` (the commands from ``input``) or one
    command given as words; the same text on success and the same error text as the binary."""
    words = list(args)
    flags = 0
    if words[:1] == ["-j"]:
        flags, words = _JSON_OUTPUT, words[1:]
    if words == ["-f", "-"]:
        buf = input or ""
    elif words and not any(w.startswith("-") for w in words):
        buf = " ".join(words)  # banger's own words (families, table names): no quoting involved
    else:
        raise ValueError(f"unsupported nft arguments {args!r}")
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise HostError("libnftables could not make a context", "check `nft list ruleset` works")
    try:
        lib.nft_ctx_output_set_flags(ctx, flags)
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        rc = lib.nft_run_cmd_from_buffer(ctx, buf.encode())
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode("utf-8", "replace")
        err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode("utf-8", "replace")
    finally:
        lib.nft_ctx_free(ctx)
    return _Result(out, err, 1 if rc else 0)


def run(args: list[str], input: str | None = None):
    from banger.host.runner import run as _run

    try:
        lib = _libnftables()
        if lib is not None:
            r = _run_lib(lib, args, input)
            if r.returncode:
                raise CommandFailed(["nft", *args], r.returncode, r.stderr)
            return r
        return _run([_nft_bin(), *args], input=input, timeout=30)
    except CommandFailed as e:
        low = e.stderr.lower()
        if "operation not permitted" in low or "permission denied" in low:
            raise HostError("nftables refused the change: permission denied",
                            "run banger as root (network policy needs CAP_NET_ADMIN)",
                            details=e.details) from None
        if "protocol not supported" in low or "operation not supported" in low:
            raise HostError(f"nftables is not usable on this host: {e.stderr.strip()[-300:]}",
                            "the kernel needs nf_tables with the bridge, nat, fib and reject modules: "
                            "modprobe nf_tables nft_chain_nat nft_fib_ipv4 nft_reject_ipv4 nf_tables_bridge",
                            details=e.details) from None
        e.hint = e.hint or "check `nft list ruleset`; banger gc removes stale banger rules"
        raise


def transact(commands: list[dict]) -> None:
    """Apply ``commands`` (nft JSON command objects) as one atomic transaction."""
    if commands:
        run(["-j", "-f", "-"], input=json.dumps({"nftables": commands}))


# ---------------------------------------------------------------------------- reading

def _norm(v):
    """An nft JSON value (element key or data) as a hashable Python value."""
    if isinstance(v, dict):
        if "elem" in v and isinstance(v["elem"], dict):  # an element carrying a comment/timeout
            return _norm(v["elem"].get("val"))
        if "concat" in v:
            return tuple(_norm(x) for x in v["concat"])
        if "jump" in v:
            return ("jump", v["jump"]["target"])
        if "goto" in v:
            return ("goto", v["goto"]["target"])
        if "prefix" in v:
            return f"{v['prefix']['addr']}/{v['prefix']['len']}"
        if "range" in v:
            return ("range", *(_norm(x) for x in v["range"]))
        if len(v) == 1:
            k = next(iter(v))
            if v[k] is None:  # {"accept": null}, {"drop": null}
                return (k,)
        return json.dumps(v, sort_keys=True)
    if isinstance(v, list):
        return tuple(_norm(x) for x in v)
    return v


def parse_table(items: list[dict]) -> dict:
    """{"chains": {name: {"base": bool, "hook", "policy", "rules": [{"handle", "comment", "expr"}]}},
    "maps": {name: {"type", "elems": {key: value}}}, "sets": {name: {"type", "elems": set}}}."""
    out: dict = {"chains": {}, "maps": {}, "sets": {}}
    for item in items:
        if "chain" in item:
            c = item["chain"]
            out["chains"][c["name"]] = {"base": "hook" in c, "hook": c.get("hook"), "prio": c.get("prio"),
                                        "type": c.get("type"), "policy": c.get("policy"), "rules": []}
        elif "map" in item:
            m = item["map"]
            elems = {}
            for pair in m.get("elem") or []:
                k, v = pair
                elems[_norm(k)] = _norm(v)
            out["maps"][m["name"]] = {"type": _norm(m.get("type")), "elems": elems}
        elif "set" in item:
            s = item["set"]
            out["sets"][s["name"]] = {"type": _norm(s.get("type")), "elems": {_norm(e) for e in s.get("elem") or []}}
    for item in items:
        if "rule" in item:
            r = item["rule"]
            chain = out["chains"].setdefault(r["chain"], {"base": False, "hook": None, "prio": None, "type": None,
                                                          "policy": None, "rules": []})
            chain["rules"].append({"handle": r["handle"], "comment": r.get("comment"), "expr": r.get("expr")})
    return out


def read_table(family: str, name: str) -> dict | None:
    """The parsed table (see parse_table), or None if it does not exist."""
    try:
        cp = run(["-j", "list", "table", family, name])
    except CommandFailed as e:
        if "no such file or directory" in e.stderr.lower():
            return None
        raise
    doc = json.loads(cp.stdout or "{}")
    return parse_table(doc.get("nftables", []))


def list_ruleset() -> list[dict]:
    """Every object in this network namespace's ruleset (for diagnostics)."""
    cp = run(["-j", "list", "ruleset"])
    return json.loads(cp.stdout or "{}").get("nftables", [])


# ---------------------------------------------------------------------------- expressions

def match(left, right, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def payload(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def meta(key: str) -> dict:
    return {"meta": {"key": key}}


def ct(key: str) -> dict:
    return {"ct": {"key": key}}


def prefix(cidr: str) -> dict | str:
    addr, _, plen = cidr.partition("/")
    if not plen or plen == "32":
        return addr
    return {"prefix": {"addr": addr, "len": int(plen)}}


def port_value(lo: int, hi: int | None = None):
    return lo if hi is None or hi == lo else {"range": [lo, hi]}


def jump(chain: str) -> dict:
    return {"jump": {"target": chain}}


ACCEPT = {"accept": None}
DROP = {"drop": None}
RETURN = {"return": None}
MASQUERADE = {"masquerade": None}
REJECT_TCP = {"reject": {"type": "tcp reset"}}
REJECT_ADMIN = {"reject": {"type": "icmp", "expr": "admin-prohibited"}}


def cmd(op: str, kind: str, family: str, table: str, **fields) -> dict:
    """One command: cmd("add", "chain", "ip", "banger-banger0", name="x")."""
    if kind == "table":
        return {op: {"table": {"family": family, "name": table}}}
    return {op: {kind: {"family": family, "table": table, **fields}}}
