"""The package's structure: no import cycle, and no module importing one above its layer.

Every `import` of an sslaudio module (at module level or inside a function) is an edge. A package
import that names a submodule (`from sslaudio.methods import losses`) is an edge to the submodule.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "sslaudio"

# Lowest first; a module may import modules of its own layer or below. The README's layout lists
# the same order.
LAYERS = [
    ["sslaudio", "sslaudio.registry", "sslaudio.config", "sslaudio.atomic", "sslaudio.runlock"],
    ["sslaudio.audio", "sslaudio.distributed", "sslaudio.interrupts", "sslaudio.runfolder", "sslaudio.optim",
     "sslaudio.hostint"],
    ["sslaudio.cache", "sslaudio.data", "sslaudio.augment", "sslaudio.frontends", "sslaudio.masking", "sslaudio.synth",
     "sslaudio.kmeans"],
    ["sslaudio.encoders"],
    ["sslaudio.methods"],
    ["sslaudio.build"],
    ["sslaudio.checkpoint"],
    ["sslaudio.inference", "sslaudio.train"],
    ["sslaudio.features", "sslaudio.export", "sslaudio.probe", "sslaudio.finetune", "sslaudio.api",
     "sslaudio.importers", "sslaudio.plots"],
    ["sslaudio.evaluation", "sslaudio.hear"],
    ["sslaudio.cli", "sslaudio.__main__"],
]


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = ("sslaudio",) + p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sslaudio"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sslaudio":
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or {node.module}
            if len(subs) < len(node.names):
                found.add(node.module)
    return {m for m in found if m in known}


def layer_of(mod: str) -> int:
    best = None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (mod == prefix or mod.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{mod} is in no layer of tests/test_architecture.py"
    return best[0]


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def test_every_module_imports_only_its_layer_or_below():
    bad = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
           for m, deps in graph().items() for d in deps if layer_of(d) > layer_of(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    g = graph()
    # a package's __init__ importing its own submodules is how registration works, not a cycle
    g = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in g.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_registry_and_config_depend_on_nothing_in_the_package():
    g = graph()
    assert g["sslaudio.registry"] == set()
    assert g["sslaudio.config"] == set()
