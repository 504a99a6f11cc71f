"""The import graph of the tree's packages, and its circles.

    python3 tools/import_graph.py            # circles, if any (exit 1), else a one-line summary
    python3 tools/import_graph.py --edges    # every edge, "importer -> imported"

Nodes are the modules of the top-level packages beside this folder (every folder with an
``__init__.py``: ``magdr``, ``daemon``, ``bench``, ``training``, ``tests``). Edges are read with
``ast``, not by importing anything, and count:

- imports at module top level, including those under ``if``/``try`` (``TYPE_CHECKING`` too);
- imports inside functions and methods. A deferred import hides a circle from the interpreter
  (nothing fails at start-up) but not from the reader: the two modules still need each other,
  and the first top-level import someone adds later closes it. The circles issue 31 names
  (``bench.scaling`` taking ``commit`` from ``bench.__main__``, ``magdr.train.classifier`` taking
  ``WEIGHTS`` from ``stargan``) were function-level imports.

An edge goes to the module named: ``from a.b import c`` is an edge to ``a.b.c`` when that is a
module, else to ``a.b``; relative imports are resolved. Not counted: the parent packages that
Python initialises on the way (``import a.b.c`` runs ``a/__init__.py`` too; counting that would
make every package whose ``__init__`` re-exports its modules a circle), and imports by string
(``importlib.import_module(...)``, ``magdr/__init__.py``'s lazy names), which ``ast`` cannot
follow. Imports of anything outside the tree (stdlib, torch) are dropped.

A circle is a strongly connected component of more than one module, or a module importing
itself.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def packages(root: Path = ROOT) -> list[str]:
    """The top-level packages under ``root`` (folders holding an ``__init__.py``)."""
    return sorted(p.parent.name for p in root.glob("*/__init__.py"))


def modules(root: Path = ROOT, pkgs: Iterable[str] | None = None) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file of the packages."""
    out: dict[str, Path] = {}
    for pkg in packages(root) if pkgs is None else pkgs:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            # A module counts only when every folder above it is a package.
            if any(not (root.joinpath(*parts[:i]) / "__init__.py").exists()
                   for i in range(1, len(parts))):  # fmt: skip
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """``name`` or its longest prefix that is a module of the tree."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The tree's modules that ``module`` (source at ``path``) imports, anywhere in its body."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_pkg:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from a import b` names the module a.b when there is one, else a's attribute b.
            names = [f"{prefix}.{alias.name}" for alias in node.names] or [prefix]
        else:
            continue
        for name in names:
            target = _resolve(name, known)
            if target is not None and target != module:
                out.add(target)
            elif target == module and isinstance(node, ast.Import):
                out.add(target)  # `import self`: a circle of one
    return out


def graph(root: Path = ROOT, pkgs: Iterable[str] | None = None) -> dict[str, set[str]]:
    """Module -> the tree's modules it imports."""
    known = modules(root, pkgs)
    return {m: imports_of(m, p, known) for m, p in known.items()}


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or with a self-edge), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(g):
        if start in index:
            continue
        # Tarjan's algorithm, iteratively (no recursion limit on a deep graph).
        work = [(start, iter(sorted(g[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in g:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(g[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
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
                if len(comp) > 1 or v in g[v]:
                    found.append(sorted(comp))
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    """Print the circles (exit 1) or a summary (exit 0)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edges", action="store_true", help="print every edge")
    ap.add_argument("packages", nargs="*", help="packages to read (default: all in the tree)")
    a = ap.parse_args(argv)
    g = graph(ROOT, a.packages or None)
    if a.edges:
        for m in sorted(g):
            for t in sorted(g[m]):
                print(f"{m} -> {t}")
    found = circles(g)
    for comp in found:
        inside = [f"{m} -> {t}" for m in comp for t in sorted(g[m]) if t in comp]
        print(f"circle of {len(comp)}: " + ", ".join(comp))
        for edge in inside:
            print(f"    {edge}")
    n_edges = sum(len(v) for v in g.values())
    print(f"{len(g)} modules, {n_edges} edges, {len(found)} circle(s)", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
