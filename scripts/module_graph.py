"""The layer graph of apexdsp, drawn from its imports (stdlib ``ast``; matplotlib only to draw).

    .venv/bin/python scripts/module_graph.py                 # docs/images/module-graph.png
    .venv/bin/python scripts/module_graph.py --check         # print what breaks the layering; exit 1 if any

Every ``import`` statement of the package counts, at module level or inside a function (an import inside a
function hides a dependency, it does not remove it); those under ``if TYPE_CHECKING:`` count for the
layering but not for import cycles, since they never run. An edge's number is how many import statements
of one layer name a module of the other.

The layers, bottom to top: the core under ``apexdsp/`` (LM, data, metrics, rewards, tracking, paths,
evaluation), then ``indexes``, ``programs``, ``optimizers``, ``experiments``, and the CLI (``apexdsp/cli``)
on the top floor. The claim checked: the core imports none of the four layers above it; only the CLI and
the modules named in :data:`PUBLIC_ENTRY_POINTS` may reach up.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folder -> the package it installs as (pyproject's [tool.setuptools] package-dir).
FOLDERS = {"apexdsp": "apexdsp", "programs": "apexdsp.programs", "optimizers": "apexdsp.optimizers",
           "indexes": "apexdsp.indexes", "experiments": "apexdsp.experiments"}
UPPER_LAYERS = ("programs", "optimizers", "indexes", "experiments")
LAYERS = ("core", "indexes", "programs", "optimizers", "experiments", "cli")  # bottom to top, as drawn
# Core modules that may reach up, as public entry points over the whole stack (an ``apexdsp.compile``-style
# function); the CLI, the top floor, always may.
PUBLIC_ENTRY_POINTS: tuple[str, ...] = ()
LAYER_TITLES = {"core": "core  (apexdsp/)", "cli": "cli  (apexdsp/cli/)", "programs": "programs  (programs/)",
                "optimizers": "optimizers  (optimizers/)", "indexes": "indexes  (indexes/)",
                "experiments": "experiments  (experiments/)"}
LAYER_CONTENTS = defaultdict(str, core="lm, data, metrics, rewards, tracking, ...")


@dataclass(frozen=True)
class Import:
    """One import statement's dependency of module ``source`` on module ``target``."""

    source: str
    target: str
    line: int
    in_function: bool = False
    type_checking: bool = False


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package by its dotted name (``apexdsp.programs.base``: ``programs/base.py``)."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(root / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The package module ``name`` is, or lies in (``apexdsp.programs.base.QAProgram``: its module)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


class _Finder(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: dict[str, Path]):
        self.module, self.known = module, known
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[Import] = []
        self._functions = 0
        self._type_checking = 0

    def _add(self, names: Iterable[str], line: int) -> None:
        targets = dict.fromkeys(_resolve(name, self.known) for name in names)  # one per module a statement names
        for target in targets:
            if target is not None and target != self.module:
                self.found.append(Import(self.module, target, line, self._functions > 0, self._type_checking > 0))

    def visit_Import(self, node: ast.Import) -> None:
        self._add([alias.name for alias in node.names], node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.package.split(".")
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        # ``from pkg import sub`` depends on the module ``pkg.sub`` when there is one, else on ``pkg``.
        self._add([f"{base}.{alias.name}" if f"{base}.{alias.name}" in self.known else base
                   for alias in node.names], node.lineno)

    def _function(self, node: ast.AST) -> None:
        self._functions += 1
        self.generic_visit(node)
        self._functions -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        test = ast.unparse(node.test)
        if test in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            self._type_checking += 1
            for child in node.body:
                self.visit(child)
            self._type_checking -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)


def package_imports(root: Path = ROOT) -> list[Import]:
    """Every import of one package module by another, in module order."""
    known = package_modules(root)
    found: list[Import] = []
    for module, path in known.items():
        finder = _Finder(module, path.name == "__init__.py", known)
        finder.visit(ast.parse(path.read_text(), filename=str(path)))
        found.extend(finder.found)
    return found


def layer_of(module: str) -> str:
    """``cli``, one of :data:`UPPER_LAYERS`, or ``core``."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in (*UPPER_LAYERS, "cli"):
        return parts[1]
    return "core"


def layer_edges(imports: Iterable[Import]) -> Counter[tuple[str, str]]:
    """Import statements from one layer to another, by (importing layer, imported layer)."""
    return Counter((layer_of(i.source), layer_of(i.target)) for i in imports
                   if layer_of(i.source) != layer_of(i.target))


def _allowed_to_reach_up(module: str) -> bool:
    return any(module == entry or module.startswith(entry + ".") for entry in PUBLIC_ENTRY_POINTS)


def upward_imports(imports: Iterable[Import]) -> list[Import]:
    """Imports from the core up to programs, optimizers, indexes or experiments (the CLI and the public
    entry points excepted): what breaks the layering."""
    return [i for i in imports if layer_of(i.source) == "core" and layer_of(i.target) in UPPER_LAYERS
            and not _allowed_to_reach_up(i.source)]


def import_cycles(imports: Iterable[Import]) -> list[list[str]]:
    """Groups of modules that import each other, directly or round a loop (imports that run only; Tarjan's
    strongly connected components of more than one module)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for i in imports:
        if not i.type_checking:
            graph[i.source].add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def layer_sizes(root: Path = ROOT) -> dict[str, tuple[int, int]]:
    """Per layer: (modules, lines)."""
    sizes: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for module, path in package_modules(root).items():
        size = sizes[layer_of(module)]
        size[0] += 1
        size[1] += len(path.read_text().splitlines())
    return {layer: (s[0], s[1]) for layer, s in sizes.items()}


def _short(module: str) -> str:
    """``apexdsp.rewards.decomposition`` -> ``rewards/decomposition``, for the figure's notes."""
    return module.removeprefix("apexdsp.").replace(".", "/")


def draw(imports: list[Import], out: Path, root: Path = ROOT) -> Path:
    """The layer graph as a PNG: a box per layer (modules, lines), an arrow per pair of layers with its
    number of import statements; arrows up from the core in red, with the modules they start from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    edges, sizes, upward = layer_edges(imports), layer_sizes(root), upward_imports(imports)
    step, width, height = 1.6, 4.2, 0.66
    y = {layer: step * rank for rank, layer in enumerate(LAYERS)}
    fig, ax = plt.subplots(figsize=(11, 9.5))
    for layer in LAYERS:
        modules, lines = sizes.get(layer, (0, 0))
        ax.add_patch(FancyBboxPatch((-width / 2, y[layer] - height / 2), width, height,
                                    boxstyle="round,pad=0.04", facecolor="#e8eef7", edgecolor="#34495e"))
        lines_of = [LAYER_TITLES[layer], *([LAYER_CONTENTS[layer]] if LAYER_CONTENTS[layer] else []),
                    f"{modules} modules, {lines:,} lines"]
        for row, text in enumerate(lines_of):
            ax.text(0, y[layer] + (len(lines_of) - 1) * 0.12 - 0.24 * row - (0.02 if row else 0), text,
                    ha="center", va="center", fontsize=10.5 if row == 0 else 8.5, weight="bold" if row == 0 else None)

    # Neighbours: straight arrows in the middle. Longer arrows bow out on a side (the core's upward ones on
    # the left, beside their note), and meet each box at its own height, the farthest ends lowest or highest.
    bad = {e for e in edges if e[0] == "core" and e[1] in UPPER_LAYERS}
    span = {e: round(abs(y[e[0]] - y[e[1]]) / step) for e in edges}
    side, turn = {}, 0
    for edge in sorted(edges, key=lambda e: (span[e], LAYERS.index(e[0]))):
        if span[edge] > 1:
            side[edge] = -1 if edge in bad else (1 if turn % 2 == 0 else -1)
            turn += edge not in bad
    ends: dict[tuple[str, int], list[tuple[float, tuple[str, str]]]] = defaultdict(list)
    for edge, where in side.items():
        for here, there in (edge, edge[::-1]):
            ends[(here, where)].append((y[there], edge))
    offset: dict[tuple[str, tuple[str, str]], float] = {}
    for (here, _), attached in ends.items():
        attached.sort()
        for rank, (_, edge) in enumerate(attached):
            offset[(here, edge)] = (rank - (len(attached) - 1) / 2) * min(0.12, 0.5 * height / len(attached))
    for edge, count in sorted(edges.items()):
        source, target = edge
        up = y[target] > y[source]
        color = "#c0392b" if edge in bad else "#2c3e50"
        if span[edge] == 1:
            x, half = (0.7 if up else 0.0), (1 if up else -1) * height / 2
            start, end = (x, y[source] + half), (x, y[target] - half)
            rad = 0.0
        else:
            x = side[edge] * width / 2
            start, end = (x, y[source] + offset[(source, edge)]), (x, y[target] + offset[(target, edge)])
            rad = side[edge] * (0.12 + 0.07 * span[edge]) * (1 if up else -1)
        ax.add_patch(FancyArrowPatch(start, end, connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>",
                                     mutation_scale=13, lw=0.8 + 0.3 * min(count, 64) ** 0.5, color=color,
                                     linestyle="--" if edge in bad else "-", shrinkA=3, shrinkB=3))
        dx, dy = end[0] - start[0], end[1] - start[1]
        # The arc's middle: halfway to matplotlib's arc3 control point, middle + rad * (dy, -dx).
        lx, ly = (start[0] + end[0]) / 2 + 0.5 * rad * dy, (start[1] + end[1]) / 2 - 0.5 * rad * dx
        ax.text(lx + (0.25 if span[edge] == 1 else 0), ly, str(count), ha="center", va="center",
                fontsize=9, color=color, bbox={"boxstyle": "round,pad=0.15", "facecolor": "white",
                                               "edgecolor": color, "lw": 0.6})
    if upward:
        by_module = Counter(_short(i.source) for i in upward)
        note = "\n".join(f"{module}: {count}" for module, count in sorted(by_module.items()))
        ax.text(-width / 2 - 4.9, y["core"] + 0.9, "the core importing a layer above\n(import statements, "
                f"red dashed):\n{note}", fontsize=8, color="#c0392b", va="bottom", ha="left", family="monospace")
    ax.set_xlim(-width / 2 - 5.0, width / 2 + 2.6)
    ax.set_ylim(-0.6, y["cli"] + 0.6)
    ax.set_axis_off()
    ax.set_title("apexdsp's layers, drawn from the code's imports (scripts/module_graph.py)\n"
                 "an arrow points from the importing layer; its number: import statements, module level and "
                 "in functions",
                 fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def report(imports: list[Import]) -> list[str]:
    """What breaks the layering, and the import cycles, as lines (none: the claim holds)."""
    lines = [f"core reaches up: {_short(i.source)} (line {i.line}) imports {_short(i.target)}"
             + (" inside a function" if i.in_function else "") for i in upward_imports(imports)]
    lines += [f"import cycle: {' <-> '.join(_short(m) for m in group)}" for group in import_cycles(imports)]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "module-graph.png")
    parser.add_argument("--check", action="store_true", help="print what breaks the layering; draw nothing")
    args = parser.parse_args(argv)
    imports = package_imports()
    if args.check:
        problems = report(imports)
        print("\n".join(problems) or "the core imports no layer above it, and no import cycle")
        return 1 if problems else 0
    for (source, target), count in sorted(layer_edges(imports).items()):
        print(f"{source:>11} -> {target:<11} {count}")
    print(f"wrote {draw(imports, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
