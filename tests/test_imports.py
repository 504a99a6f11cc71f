"""The shape of the tree: no import circle anywhere, and the runtime never loads the training code.

The import graph is ``tools/import_graph.py``'s: read with ``ast``, imports at module top level
*and* inside functions counted (a deferred import hides a circle from the interpreter, not from
the reader; see its docstring for what else counts).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "import_graph.py"
RUNTIME = ("magdr", "daemon")


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_tree_has_no_import_circle():
    ig = _import_graph()
    assert set(ig.packages()) >= {"magdr", "daemon", "bench", "training", "tests"}
    g = ig.graph()
    assert "training.shared" in g and "bench.run_info" in g  # the tree is really read
    found = ig.circles(g)
    assert found == [], "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_a_circle_closed_inside_a_function(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import A  # a package re-exporting its modules: no circle\n",
        "pkg/a.py": "from pkg import b\nA = 1\n",
        "pkg/b.py": """\
            def later():
                from .a import A  # relative, deferred: still an edge back to pkg.a
                return A
            """,
        "pkg/c.py": "import pkg.b\nimport os\n",
        "other/__init__.py": "",
        "other/x.py": "from other import y\n",
        "other/y.py": "from other.x import *\n",
        "loose/z.py": "import loose.z\n",  # no __init__.py: not a package, not read
    })  # fmt: skip
    ig = _import_graph()
    assert ig.packages(tmp_path) == ["other", "pkg"]
    g = ig.graph(tmp_path)
    assert g["pkg.b"] == {"pkg.a"} and g["pkg.c"] == {"pkg.b"} and g["pkg"] == {"pkg.a"}
    assert ig.circles(g) == [["other.x", "other.y"], ["pkg.a", "pkg.b"]]
    # Remove the deferred import and pkg's circle is gone; other's stays.
    (tmp_path / "pkg/b.py").write_text("def later():\n    return 1\n")
    assert ig.circles(ig.graph(tmp_path)) == [["other.x", "other.y"]]


def test_no_runtime_module_imports_training_even_deferred():
    ig = _import_graph()
    g = ig.graph()
    seen = {m for m in g if m.split(".")[0] in RUNTIME}
    todo = list(seen)
    while todo:
        for t in g[todo.pop()]:
            if t not in seen:
                seen.add(t)
                todo.append(t)
    reached = sorted(m for m in seen if m.split(".")[0] not in RUNTIME)
    assert not [m for m in reached if m.split(".")[0] == "training"], reached


def test_importing_magdr_and_daemon_loads_no_training_module():
    """A fresh interpreter imports ``magdr`` and ``daemon`` and then every module of both."""
    code = textwrap.dedent("""\
        import importlib, pkgutil, sys
        import magdr, daemon
        for pkg in (magdr, daemon):
            assert pkg.__file__.startswith(sys.argv[1]), pkg.__file__  # this checkout's
            for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                if not m.name.endswith(".__main__"):  # __main__ runs the CLI
                    importlib.import_module(m.name)
        print(len(sys.modules))
        print(" ".join(sorted(n for n in sys.modules if n.split(".")[0] == "training")))
        """)
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_modules, training = (proc.stdout.splitlines() + [""])[:2]
    assert int(n_modules) > 500  # the runtime really was imported (torch and all)
    assert training == "", f"training modules loaded by the runtime: {training}"
