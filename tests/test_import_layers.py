"""The import graph of eventstream/: no cycle between modules, no import of a higher layer.

Read from the source with ast (every import statement, also those inside functions: a lazy import is
still a dependency), not by importing. A module may import modules of its own package and of the
layers below its package's layer; packages that share a layer are siblings and import neither way.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "eventstream"

# Bottom first. `eventstream.X` is the package or top-level module X; "" is the root package.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "log"),          # leaf modules anything may use
    ("core",),                  # arena, atomics, records, payload arena, rings, pool, dedup: no engine knowledge
    ("runtime",),               # affinity, GIL check, systemd notify, topology
    ("config",),                # schema, loader, validation of every key
    ("protocol",),              # sans-I/O frames
    ("storage",),               # the event log (format, writer, reader, tail)
    ("ingest", "client"),       # sockets and threads in front of the engine; the client library
    ("metrics",),               # registry, exporter
    ("engine",),                # bus, processors, DLQ, control plane, the Engine
    ("subscribe", "connectors"),  # edges that follow the engine: subscribers, NATS
    ("flow",),                  # dataflows over the log, run by the service
    ("service",),               # assembles and runs
    ("testing",),               # helpers for handler and flow authors
    ("cli",),                   # commands
    ("__main__",),              # python -m eventstream
    ("",),                      # the public API (eventstream/__init__.py)
]
# The root package may be imported from below only for these names (defined in it, imports nothing).
ROOT_NAMES_ALLOWED = {"__version__"}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["eventstream", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the eventstream modules it imports (`from pkg import sub` counts as pkg.sub)."""
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target == "eventstream":
                    names = {a.name for a in node.names}
                    subs = {f"eventstream.{n}" for n in names if f"eventstream.{n}" in mods}
                    deps.update(subs)
                    rest = {n for n in names if f"eventstream.{n}" not in mods}
                    if rest - ROOT_NAMES_ALLOWED:
                        deps.add("eventstream")
                    continue
                subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods}
                deps.update(subs)
                if len(subs) < len(node.names) and target in mods:
                    deps.add(target)
        deps.discard(name)
        graph[name] = deps
    return graph


def layer_of(module: str) -> tuple[int, str]:
    top = module.split(".")[1] if "." in module else ""
    for i, group in enumerate(LAYERS):
        if top in group:
            return i, top
    raise AssertionError(f"{module}: its package {top!r} is in no layer of LAYERS (add it where it belongs)")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_every_package_has_a_layer():
    for module in modules():
        layer_of(module)


def test_no_import_cycle():
    found = cycles(imports(modules()))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_upward_or_sideways_import():
    bad = []
    for module, deps in sorted(imports(modules()).items()):
        mine, my_pkg = layer_of(module)
        for dep in sorted(deps):
            theirs, their_pkg = layer_of(dep)
            if their_pkg == my_pkg:
                continue
            if theirs > mine:
                bad.append(f"{module} imports {dep} (layer {LAYERS[theirs]} is above {LAYERS[mine]})")
            elif theirs == mine:
                bad.append(f"{module} imports {dep} (siblings in layer {LAYERS[mine]})")
    assert not bad, "\n".join(bad)


def test_the_checks_can_fail():
    """The walker sees lazy imports and cycles (a test that cannot fail proves nothing)."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert layer_of("eventstream.core.ring")[0] < layer_of("eventstream.engine.bus")[0]
    lazy = imports(modules())["eventstream.config.loader"]
    assert "eventstream.config.subjects" in lazy  # imported inside a function
