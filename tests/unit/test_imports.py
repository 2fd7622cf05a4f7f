"""The package's import structure, read with `ast` (nothing is imported):

- no import cycle between modules of `pipeline` (function-level imports included: a lazy import
  still ties the two modules together), and none between its folders either (every
  `pipeline.X.*` folded into `pipeline.X`; a root module is its own node);
- the root of `pipeline/` holds only the ground floor, which imports no folder above it;
- only `pipeline/commands` (the command layer) imports `pipeline.commands` or parses arguments
  (imports argparse);
- only `pipeline/backends` imports deepspeed or megablocks;
- tools/ scripts use public library functions only: no `pipeline.commands`, no `_private` names.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "pipeline"
COMMANDS = "pipeline.commands"
BACKENDS = "pipeline.backends"
ENGINE_LIBS = ("deepspeed", "megablocks")


# ----------------------------------------------------------------------------- graph building

def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """(dotted module name, is a package __init__) of a .py file under `root`."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_pkg else parts), is_pkg


def imported_names(name: str, is_pkg: bool, source: str) -> list[tuple[str, list[str]]]:
    """Every import statement of a module as (absolute module, [imported names]); relative
    imports resolved against `name` (a package's `from . import x` is relative to itself)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.append((target, [alias.name for alias in node.names]))
    return out


def import_graph(modules: dict[str, tuple[bool, str]]) -> dict[str, set[str]]:
    """{module: {intra-package modules it imports}} for {name: (is_pkg, source)}.
    `from a import b` points at the submodule a.b when that is a module, else at a."""
    graph: dict[str, set[str]] = {}
    for name, (is_pkg, source) in modules.items():
        deps = set()
        for target, names in imported_names(name, is_pkg, source):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            deps.update(subs)
            if target in modules and (not names or len(subs) < len(names)):
                deps.add(target)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component with more than one
    module (Tarjan), sorted for stable messages."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(_cycle_in(graph, scc) for scc in sccs)


def _cycle_in(graph: dict[str, set[str]], scc: list[str]) -> list[str]:
    """A concrete cycle through the first module of a strongly connected component (BFS)."""
    members, start = set(scc), scc[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return list(reversed(path)) + [start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in component {scc}")


def folder_of(name: str, packages: set[str]) -> str:
    """`pipeline.X` for any module inside the sub-package `pipeline.X`, else the module itself."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 and ".".join(parts[:2]) in packages else name


def folder_graph(graph: dict[str, set[str]], modules: dict[str, tuple[bool, str]]) -> dict[str, set[str]]:
    """The module graph with every sub-package of the top package folded into one node."""
    top = {n.split(".")[0] for n in modules}
    packages = {n for n, (is_pkg, _) in modules.items() if is_pkg and n not in top}
    folded: dict[str, set[str]] = {}
    for name, deps in graph.items():
        node = folder_of(name, packages)
        folded.setdefault(node, set()).update(folder_of(d, packages) for d in deps)
    for node, deps in folded.items():
        deps.discard(node)
    return folded


def _is_within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layer_violations(modules: dict[str, tuple[bool, str]]) -> list[str]:
    """Imports of the command layer (or argparse) from below it, and of engine libraries
    outside backends/."""
    bad = []
    for name, (is_pkg, source) in sorted(modules.items()):
        for target, _ in imported_names(name, is_pkg, source):
            if _is_within(target, COMMANDS) and not _is_within(name, COMMANDS):
                bad.append(f"{name} imports {target} (only {COMMANDS} may: it is the top floor)")
            if target == "argparse" and not _is_within(name, COMMANDS):
                bad.append(f"{name} imports argparse (only {COMMANDS} parses arguments)")
            if target.split(".")[0] in ENGINE_LIBS and not _is_within(name, BACKENDS):
                bad.append(f"{name} imports {target} (only {BACKENDS} may import {ENGINE_LIBS})")
    return bad


def tool_violations(script: str, source: str) -> list[str]:
    """A tools/ script importing the command layer or a private (`_name`) library function."""
    bad = []
    for target, names in imported_names("tools.script", False, source):
        if not _is_within(target, PACKAGE):
            continue
        if _is_within(target, COMMANDS):
            bad.append(f"{script} imports {target} (tools use library functions, not commands)")
        bad += [f"{script} imports private {target}.{n}" for n in names if n.startswith("_")]
        if any(part.startswith("_") and part != "__init__" for part in target.split(".")):
            bad.append(f"{script} imports private module {target}")
    return bad


def package_modules(root: Path = REPO, package: str = PACKAGE) -> dict[str, tuple[bool, str]]:
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        name, is_pkg = module_name(path, root)
        out[name] = (is_pkg, path.read_text())
    return out


# ----------------------------------------------------------------------------- the real package

def test_no_import_cycles():
    modules = package_modules()
    assert f"{PACKAGE}.commands" in modules and len(modules) > 40
    cycles = find_cycles(import_graph(modules))
    assert not cycles, "import cycles in pipeline/:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_no_folder_cycles():
    cycles = find_cycles(folder_graph(import_graph(package_modules()), package_modules()))
    assert not cycles, "import cycles between folders of pipeline/:\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles)


# the root of pipeline/: the package itself and the ground floor (stages.py reads the stage
# graph off the config and registries); everything else lives in a folder
GROUND_FLOOR = {"config", "config_ranges", "config_schema", "dimensions", "env", "io_utils", "layout",
                "precision", "registry", "run_lock", "timing"}
ROOT_MODULES = GROUND_FLOOR | {"__init__", "stages"}
BELOW_GROUND = {"checkpoint"}   # the checkpoint floor may be read by config (Hub ids)


def test_root_holds_only_the_ground_floor():
    root = {p.stem for p in (REPO / PACKAGE).glob("*.py")}
    assert root == ROOT_MODULES, f"root modules besides the ground floor: {sorted(root - ROOT_MODULES)}"
    modules = package_modules()
    graph = folder_graph(import_graph(modules), modules)
    bad = [(f"{PACKAGE}.{m}", d) for m in sorted(GROUND_FLOOR) for d in sorted(graph[f"{PACKAGE}.{m}"])
           if d.split(".")[1] not in GROUND_FLOOR | BELOW_GROUND]
    assert not bad, f"ground-floor modules importing folders above them: {bad}"


def test_layers_are_respected():
    bad = layer_violations(package_modules())
    assert not bad, "import rule broken:\n" + "\n".join("  " + b for b in bad)


def test_tools_use_public_library_functions_only():
    scripts = sorted((REPO / "tools").rglob("*.py"))
    assert scripts
    bad = [b for p in scripts for b in tool_violations(str(p.relative_to(REPO)), p.read_text())]
    assert not bad, "tools/ import rule broken:\n" + "\n".join("  " + b for b in bad)


# ----------------------------------------------------------------------------- the checker itself

SYNTHETIC = {
    "pkg": (True, "from . import a\n"),
    "pkg.a": (False, "from .b import f\n"),
    "pkg.b": (False, "def f():\n    from pkg.sub import c\n"),      # a function-level import
    "pkg.sub": (True, ""),
    "pkg.sub.c": (False, "from .. import a\n"),                      # closes a -> b -> c -> a
    "pkg.d": (False, "import pkg.b\nfrom pkg import sub\n"),
}


def test_relative_and_function_level_imports_are_resolved():
    graph = import_graph(SYNTHETIC)
    assert graph["pkg"] == {"pkg.a"}
    assert graph["pkg.b"] == {"pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.d"] == {"pkg.b", "pkg.sub"}


def test_cycle_finder_reports_the_cycle():
    assert find_cycles(import_graph(SYNTHETIC)) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    assert find_cycles({"x": {"y"}, "y": set()}) == []
    assert find_cycles({"x": {"y"}, "y": {"x"}, "z": {"x"}}) == [["x", "y", "x"]]


def test_folder_graph_folds_sub_packages():
    modules = {**SYNTHETIC, "pkg.top": (False, "from .sub import c\n")}
    folded = folder_graph(import_graph(modules), modules)
    assert folded["pkg.sub"] == {"pkg.a"} and folded["pkg.top"] == {"pkg.sub"}
    # a cycle between folders that no two modules form: pkg.x.m -> pkg.y.n, pkg.y.k -> pkg.x.j
    split = {"pkg": (True, ""), "pkg.x": (True, ""), "pkg.y": (True, ""),
             "pkg.x.m": (False, "from ..y import n\n"), "pkg.x.j": (False, ""),
             "pkg.y.n": (False, ""), "pkg.y.k": (False, "from ..x import j\n")}
    assert find_cycles(import_graph(split)) == []
    assert find_cycles(folder_graph(import_graph(split), split)) == [["pkg.x", "pkg.y", "pkg.x"]]


def test_layer_and_tool_checks_catch_violations():
    modules = {"pipeline.train.loop": (False, "def f():\n    from ..commands import base\n"),
               "pipeline.model.moe": (False, "import megablocks.layers\n"),
               "pipeline.backends.megablocks_moe": (False, "import megablocks\n"),
               "pipeline.commands.base": (False, "import argparse\nfrom . import add_config_arguments\n"),
               "pipeline.surgery.build_moe": (False, "import argparse\n")}
    bad = layer_violations(modules)
    assert len(bad) == 3
    assert bad[0].startswith("pipeline.model.moe imports megablocks.layers")
    assert bad[1].startswith("pipeline.surgery.build_moe imports argparse")
    assert bad[2].startswith("pipeline.train.loop imports pipeline.commands")
    assert tool_violations("t.py", "from pipeline.commands.run import main\n")
    assert tool_violations("t.py", "from pipeline.train.common import _helper\n")
    assert not tool_violations("t.py", "from pipeline.profiling.stage import profile_model_dir\nimport torch\n")


@pytest.mark.parametrize("path, expected", [("pipeline/__init__.py", ("pipeline", True)),
                                            ("pipeline/train/loop.py", ("pipeline.train.loop", False))])
def test_module_name(path, expected):
    assert module_name(REPO / path, REPO) == expected


# ----------------------------------------------------------------------------- registered names

# PRECISIONS is left out: its names double as the resolved dtype ("fp32"/"bf16") and as
# DeepSpeed's own "auto" value, which code compares as values, not as a choice of behaviour
UNCHECKED_REGISTRIES = {"PRECISIONS"}


def registered_names() -> dict[str, list[str]]:
    """name -> the registries holding it (every Registry in pipeline.registry, plus the
    dimensions and score metrics)."""
    from pipeline import registry
    from pipeline.dimensions import DIMENSIONS
    from pipeline.eval.score_metrics import SCORE_METRICS
    regs = {n: r for n, r in vars(registry).items() if isinstance(r, registry.Registry)}
    regs.update(DIMENSIONS=DIMENSIONS, SCORE_METRICS=SCORE_METRICS)
    names: dict[str, list[str]] = {}
    for reg_name, reg in regs.items():
        if reg_name not in UNCHECKED_REGISTRIES:
            for name in reg.names():
                names.setdefault(name, []).append(reg_name)
    return names


def name_compares(source: str, names) -> list[tuple[int, str]]:
    """(line, name) of every `==`/`!=`/`in` comparison with a string constant in `names`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                found += [(node.lineno, c.value) for c in consts if isinstance(c, ast.Constant)
                          and isinstance(c.value, str) and c.value in names]
    return found


def test_no_registered_name_is_compared_outside_its_entry():
    import pipeline.config  # noqa: F401  (registers the built-in dimensions)
    names = registered_names()
    assert {"ties", "router+experts", "moderation", "harmless", "prompts"} <= set(names)
    bad = [f"{p.relative_to(REPO)}:{line}: {name!r} ({', '.join(names[name])})"
           for p in sorted((REPO / PACKAGE).rglob("*.py"))
           for line, name in name_compares(p.read_text(), names)]
    assert not bad, "a registered name compared outside its registry entry:\n" + "\n".join(bad)


def test_name_compare_finder():
    src = "a = x == 'ties'\nb = y in ('tensor', 'other')\nc = z == 'other'\nd = {'ties': 1}\n"
    assert name_compares(src, {"ties", "tensor"}) == [(1, "ties"), (2, "tensor")]
