"""The layering of the images, kernels and workspace packages, read from the source (every import,
module- and function-level): no cycles, and dependencies pointing one way.

images:    finalize <- service <- sources/* (service reaches a catalog entry's source only through
           the registry in images/sources/__init__.py, by name)
kernels:   catalog, assemble <- sources/* <- service
workspace: planning, host, guest <- service
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("banger.images", "banger.kernels", "banger.workspace")


def _graph() -> dict[str, set[str]]:
    mods = {}
    for p in (ROOT / "banger").rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    b = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(b + ([node.module] if node.module else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if full in mods:
                        graph[m].add(full)
                    elif base in mods:
                        graph[m].add(base)
    return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in graph[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_no_import_cycle_through_these_packages():
    g = _graph()
    assert [m for m in g if m.startswith(PACKAGES) and m in _reach(g, m)] == []


def test_dependencies_point_one_way():
    g = _graph()

    def ours(m: str) -> set[str]:
        return {x for x in g[m] if x.startswith(PACKAGES)}

    # images: the lower layers know nothing of the service or the sources; the service names no source
    assert ours("banger.images.finalize") <= {"banger.images.sources", "banger.images.sources.oci",
                                              "banger.images.sources.oci.layers"}
    assert ours("banger.images.sources") == set()
    assert {x for x in ours("banger.images.service") if x.startswith("banger.images.sources.")} == set()
    # kernels: catalog and assembly below the fetchers, the fetchers below the service
    for low in ("banger.kernels.catalog", "banger.kernels.assemble", "banger.kernels.sources",
                "banger.kernels.sources.apt", "banger.kernels.sources.url", "banger.kernels.sources.local",
                "banger.kernels.sources.deb"):
        assert "banger.kernels.service" not in _reach(g, low), low
    # workspace: host, guest and planning never reach the workflows; planning is pure
    for low in ("banger.workspace.host", "banger.workspace.guest", "banger.workspace.planning"):
        assert "banger.workspace.service" not in _reach(g, low), low
    assert ours("banger.workspace.planning") == set()
