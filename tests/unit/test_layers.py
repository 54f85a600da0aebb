"""The layering of banger's packages stays true: dependencies point one way, and no module imports
itself back through others. Every import counts, including the lazy ones inside functions (they
keep start-up fast, but they are dependencies all the same).

The layer table is ARCHITECTURE.md's "Layers" section; a new package gets a line here and there.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "banger"

# module prefix -> layer (the longest matching prefix wins); a module may import only from its own
# layer or lower ones
LAYERS: dict[str, int] = {
    "banger": 0, "banger.errors": 0, "banger.config": 0, "banger.progress": 0,
    "banger.validate": 0, "banger.data": 0, "banger.names": 0,
    # a table of backend names (config validates against it); it loads a backend by name at run time
    "banger.vmm.registry": 0,
    # the C extension: primitives with no Python dependencies (host facts use its cpuid/TSC calls)
    "banger.uffd._uffd": 1,
    "banger.state": 1, "banger.host": 1, "banger.context": 1,  # Ctx bundles config with the store and locks
    "banger.guest": 2, "banger.net": 2, "banger.vmm": 2, "banger.uffd": 2,
    # what a VM is at run time, and the plan engine every way of making one uses
    "banger.vms": 3,
    "banger.images": 4, "banger.kernels": 4, "banger.vms.lifecycle": 4, "banger.snapshots": 4,
    "banger.templates": 5, "banger.vmpool": 5, "banger.workspace": 5, "banger.gc": 5, "banger.doctor": 5,
    "banger.cli": 6,
}


def layer_of(mod: str) -> int:
    best = None
    for prefix in LAYERS:
        if (mod == prefix or mod.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    assert best is not None, f"{mod} has no layer: add it to LAYERS and ARCHITECTURE.md"
    return LAYERS[best]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module, the C extension included (through its .pyi stub)."""
    return {module_name(p): p for p in [*ROOT.rglob("*.py"), *ROOT.rglob("*.pyi")]}


def imports(path: Path, known: set[str]) -> set[str]:
    """The banger modules ``path`` imports (``from pkg import mod`` counts as pkg.mod when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("banger")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("banger") and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: {i for i in imports(p, known) if i != m} for m, p in mods.items()}


def test_every_import_points_down_or_sideways():
    bad = []
    for mod, deps in graph().items():
        for dep in deps:
            if layer_of(dep) > layer_of(mod):
                bad.append(f"{mod} (layer {layer_of(mod)}) imports {dep} (layer {layer_of(dep)})")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    color: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        color[m] = 1
        for d in sorted(g.get(m, ())):
            if d not in g:
                continue
            if color.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in color:
                visit(d, stack + [d])
        color[m] = 2

    for m in sorted(g):
        if m not in color:
            visit(m, [m])
    # a package's __init__ importing its own submodule (and back) is a cycle only between real modules
    cycles = [c for c in cycles if len(set(c.split(" -> "))) > 1]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_logic_never_imports_the_ui():
    bad = []
    for mod, path in modules().items():
        if mod.startswith("banger.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad += [f"{mod} imports {n}" for n in names if n.split(".")[0] in ("typer", "rich", "click")]
    assert not bad, "\n".join(bad)


def _reach(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in g.get(todo.pop(), ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_within_packages_dependencies_point_one_way():
    """images: finalize <- service <- sources/* (the service reaches a source only through the
    registry in images/sources/__init__.py, by name); kernels: catalog, assemble <- sources/* <-
    service; workspace: planning, host, guest <- service; vms: runtime <- plan/plans <- lifecycle."""
    g = graph()
    pk = ("banger.images", "banger.kernels", "banger.workspace")

    def ours(m: str) -> set[str]:
        return {x for x in g[m] if x.startswith(pk)}

    assert ours("banger.images.finalize") <= {"banger.images.sources", "banger.images.sources.oci",
                                              "banger.images.sources.oci.layers"}
    assert ours("banger.images.sources") == set()
    assert {x for x in ours("banger.images.service") if x.startswith("banger.images.sources.")} == set()
    for low in ("banger.kernels.catalog", "banger.kernels.assemble", "banger.kernels.sources",
                "banger.kernels.sources.apt", "banger.kernels.sources.url", "banger.kernels.sources.local",
                "banger.kernels.sources.deb"):
        assert "banger.kernels.service" not in _reach(g, low), low
    for low in ("banger.workspace.host", "banger.workspace.guest", "banger.workspace.planning"):
        assert "banger.workspace.service" not in _reach(g, low), low
    assert ours("banger.workspace.planning") == set()
    for low in ("banger.vms.runtime", "banger.vms.plan", "banger.vms.plans", "banger.vms.disks"):
        assert "banger.vms.lifecycle" not in _reach(g, low), low
