"""Imports run one way and do no work: the package's import graph, function-level imports included,
has no cycle (``ops`` <- ``integrations`` <- the layers patches and PET share <- ``patch`` <- ``pet``
<- the package face); no package module is imported by a string (``importlib.import_module``,
``__import__``, a ``sys.modules`` lookup); there is no top-level ``fpet_kernels/patch_hf.py``; and
importing the package loads neither Triton nor the test-only emulator, and does not initialise CUDA.

The import graph (:func:`import_graph`) has an edge ``a -> b`` when module ``a`` imports package
module ``b`` anywhere in its file: at module level, inside a function, under ``try`` or
``if TYPE_CHECKING`` alike. Relative imports are resolved; ``from pkg import name`` is an edge to the
submodule ``pkg.name`` when ``name`` is one (a ``.py`` file, or a name ``pkg/__init__.py`` does not
bind: a compiled extension such as ``_C``), else to ``pkg`` itself.

Package ``__init__``s: importing ``a.b.c`` runs the ``__init__`` of ``a`` and ``a.b`` first, so those
are edges too, except the packages that enclose the importer itself: their ``__init__`` is already
running when the importer runs (Python imports a module's packages before it), so importing a
sibling or a cousin does not depend on them again. A package that encloses the importer still counts
when it is named for a name its ``__init__`` defines (``from .. import something``, ``import
fpet_kernels``): that reads a half-initialised module. So ``pet/lora.py`` importing
``fpet_kernels.patch.core`` gives ``pet.lora -> patch.core`` and ``pet.lora -> patch`` (patch's
``__init__``, with whatever it imports), not ``pet.lora -> fpet_kernels``; and the layering holds
when each package's ``__init__`` imports only its own layer and those below it."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "fpet_kernels")


# ------------------------------------------------------------------------------------ the import graph
def _modules(pkg_dir: str) -> dict:
    """{dotted module name: path} of every .py file of the package at ``pkg_dir`` (named by its folder)."""
    top = os.path.dirname(os.path.abspath(pkg_dir))
    mods = {}
    for root, dirs, files in os.walk(pkg_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(root, f)
                name = os.path.relpath(path, top)[:-3].replace(os.sep, ".")
                mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _bound_names(path: str) -> set | None:
    """The names a module binds at its top level (assignments, defs, classes, imports, also inside
    top-level if / try); ``None`` when it star-imports (anything may be bound)."""
    names = set()

    def walk(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    if a.name == "*":
                        return False
                    names.add(a.asname or a.name.split(".")[0])
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for part in ("body", "orelse", "finalbody", "handlers"):
                    sub = getattr(node, part, [])
                    if part == "handlers":
                        sub = [s for h in sub for s in h.body]
                    if walk(sub) is False:
                        return False
        return True

    with open(path) as f:
        return names if walk(ast.parse(f.read()).body) else None


def import_graph(pkg_dir: str) -> dict:
    """{module: {imported package module: [line numbers]}} for the package at ``pkg_dir`` (rules: the
    module docstring). Self-edges are dropped; modules outside the package are not nodes."""
    mods = _modules(pkg_dir)
    bound = {}

    def binds(package, name):
        if package not in bound:
            bound[package] = _bound_names(mods[package])
        return bound[package] is None or name in bound[package]

    graph = {}
    for m, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        parts = m.split(".")
        running = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}  # m and the packages enclosing it
        here = m if is_pkg else ".".join(parts[:-1])
        edges = {}

        def add(target, line, named):
            """``target`` imported (``named``: by name, not only as the parent of a submodule), and the
            ``__init__`` of its packages that are not yet running."""
            t = target.split(".")
            for i in range(1, len(t) + 1):
                mod = ".".join(t[:i])
                if mod in mods and mod != m and (mod not in running or (named and i == len(t))):
                    edges.setdefault(mod, []).append(line)

        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    add(a.name, node.lineno, True)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                if src not in mods:  # a third-party module, or a non-Python one (fpet_kernels._C)
                    add(src, node.lineno, False)
                    continue
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    if sub in mods:  # from pkg import submodule
                        add(sub, node.lineno, True)
                        add(src, node.lineno, False)
                    elif a.name != "*" and os.path.basename(mods[src]) == "__init__.py" and not binds(src, a.name):
                        add(src, node.lineno, False)  # a non-Python submodule (the compiled extension)
                    else:  # a name the module defines
                        add(src, node.lineno, True)
        graph[m] = {t: sorted(set(lines)) for t, lines in edges.items()}
    return graph


def _sccs(graph: dict) -> list:
    """The strongly connected components of ``graph`` (Tarjan), each a sorted list of modules."""
    index, low, on, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(graph):  # (recursion as deep as the longest import chain: a few dozen modules)
        if v not in index:
            visit(v)
    return out


def import_cycles(graph: dict) -> list:
    """The import cycles of ``graph``: for every module on a cycle, the shortest cycle through it (one
    list per cycle, starting at its smallest module, the first module repeated at the end); distinct
    cycles only, sorted."""
    cycles = set()
    for comp in _sccs(graph):
        if len(comp) < 2:
            continue
        inside = set(comp)
        for start in comp:
            prev, frontier, found = {start: None}, [start], None
            while frontier and found is None:
                nxt = []
                for v in frontier:
                    for w in sorted(graph[v]):
                        if w == start:
                            found = v
                            break
                        if w in inside and w not in prev:
                            prev[w] = v
                            nxt.append(w)
                    if found is not None:
                        break
                frontier = nxt
            path, v = [], found
            while v is not None:
                path.append(v)
                v = prev[v]
            path.reverse()  # start ... found, and found imports start
            i = path.index(min(path))
            cycles.add(tuple(path[i:] + path[:i]))
    return [list(c) + [c[0]] for c in sorted(cycles)]


def describe_cycle(graph: dict, pkg_dir: str, cycle: list) -> str:
    """``a -> b (a.py:12) -> c (b.py:3, 40) -> a (c.py:7)``: each import with where it is written."""
    mods, top = _modules(pkg_dir), os.path.dirname(os.path.abspath(pkg_dir))
    out = [cycle[0]]
    for a, b in zip(cycle[:-1], cycle[1:]):
        out.append(f"{b} ({os.path.relpath(mods[a], top)}:{', '.join(map(str, graph[a][b]))})")
    return " -> ".join(out)


# ------------------------------------------------------------------------------- imports by string
_IMPORT_CALLS = {"import_module", "__import__"}


def _string_prefix(node) -> str | None:
    """The constant start of a string expression: "a.b", f"a.{x}" -> "a.", "a." + x -> "a."."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return node.values[0].value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _string_prefix(node.left)
    return None


def string_imports(pkg_dir: str) -> list:
    """["path:line: code"] for every import of one of the package's modules by a string:
    ``importlib.import_module("pkg...")`` (or a relative name with ``package=``), ``__import__("pkg...")``,
    ``sys.modules["pkg..."]`` / ``sys.modules.get("pkg...")``; f-strings and concatenations included."""
    name = os.path.basename(os.path.abspath(pkg_dir))
    top = os.path.dirname(os.path.abspath(pkg_dir))
    found = []
    for path in _modules(pkg_dir).values():
        with open(path) as f:
            src = f.read()
        for node in ast.walk(ast.parse(src, path)):
            arg = None
            if isinstance(node, ast.Call) and node.args:
                fn = node.func
                fname = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
                if fname in _IMPORT_CALLS:
                    arg = node.args[0]
                elif (fname == "get" and isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Attribute)
                      and fn.value.attr == "modules"):
                    arg = node.args[0]
            elif (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
                  and node.value.attr == "modules"):
                arg = node.slice
            prefix = _string_prefix(arg) if arg is not None else None
            if prefix is not None and (prefix == name or prefix.startswith((name + ".", "."))):
                found.append((os.path.relpath(path, top), node.lineno, ast.get_source_segment(src, node)))
    return [f"{p}:{line}: {code}" for p, line, code in sorted(found)]


# ---------------------------------------------------------------------------------- the package
def test_no_import_cycle():
    graph = import_graph(PKG)
    assert "fpet_kernels.ops.tome" in graph and graph["fpet_kernels"], "the graph misses the package"
    cycles = import_cycles(graph)
    assert not cycles, f"{len(cycles)} import cycles (function-level imports included):\n" + "\n".join(
        describe_cycle(graph, PKG, c) for c in cycles)


def test_no_import_by_string():
    """A package module is imported by an import statement (at module level, or in a function where it
    must be lazy), never by a string: the import graph above sees every import statement."""
    found = string_imports(PKG)
    assert not found, "package modules imported by a string (write an import statement):\n" + "\n".join(found)


def test_no_top_level_patch_hf():
    """The Hugging Face patcher lives in the patch package (fk.patch.hf), not beside it."""
    assert not os.path.exists(os.path.join(PKG, "patch_hf.py")), "fpet_kernels/patch_hf.py still exists"


#: The model and PET layers in import order: a module may import its own layer and those before it.
LAYERS = ["fpet_kernels.ops", "fpet_kernels.integrations", "fpet_kernels.layers", "fpet_kernels.patch",
          "fpet_kernels.pet"]


def _layer(name: str) -> int:
    return max((i for i, layer in enumerate(LAYERS) if name == layer or name.startswith(layer + ".")), default=-1)


def test_layers_import_downward_only():
    """``ops`` <- ``integrations`` <- ``layers`` <- ``patch`` <- ``pet``: no module imports a later layer
    (function-level imports included: the graph sees them)."""
    graph = import_graph(PKG)
    bad = [f"{m}:{lines[0]} imports {dep}" for m, deps in graph.items() if _layer(m) >= 0
           for dep, lines in deps.items() if _layer(dep) > _layer(m)]
    assert not bad, "imports pointing up the layers: " + "; ".join(bad)


def test_kernels_never_import_the_ops_that_use_them():
    graph = import_graph(PKG)
    kernels = [m for m in graph if m.endswith("_triton") or "_triton_" in m or m.endswith("triton_common")]
    assert kernels
    ops = {"fpet_kernels.ops.tome", "fpet_kernels.ops.fpet", "fpet_kernels.ops.pyra", "fpet_kernels.ops.attention"}
    for k in kernels:
        assert not (set(graph[k]) & ops), f"{k} imports {set(graph[k]) & ops}"


def test_import_does_no_work():
    code = ("import sys, torch; import fpet_kernels, fpet_kernels.patch, fpet_kernels.pet; "
            "print(int('triton' in sys.modules), int('torch._dynamo' in sys.modules), "
            "int(torch.cuda.is_initialized()), int(any('fpet_simt' in m for m in sys.modules)))")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.path.dirname(PKG) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    triton, dynamo, cuda, simt = map(int, out.stdout.split())
    assert not triton, "importing fpet_kernels imported triton"
    assert not dynamo, "importing fpet_kernels imported torch._dynamo (which imports triton)"
    assert not cuda, "importing fpet_kernels initialised CUDA"
    assert not simt, "the test-only emulator is loaded by the package"


# --------------------------------------------------------------- the checker on a package of its own
TOY = {
    "__init__.py": """
        from . import low, high
        from .low import helper
        VERSION = "1"
        """,
    "low/__init__.py": """
        from .core import helper
        """,
    "low/core.py": """
        import os
        from .. import _ext  # a compiled extension: not a .py file, not bound in toy/__init__.py

        def helper():
            from toy.low import util  # function level; toy.low encloses this module: no edge to it
            return util
        """,
    "low/util.py": """
        def k():
            return 1
        """,
    "high/__init__.py": "",
    "high/user.py": """
        from toy.low import core  # from pkg import submodule: toy.low.core, and toy.low's __init__

        def h():
            import toy.low.util
            return toy.low.util, core
        """,
}


def _toy(tmp_path, **changes):
    files = dict(TOY, **changes)
    for rel, text in files.items():
        path = tmp_path / "toy" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return str(tmp_path / "toy")


def test_graph_of_an_acyclic_package(tmp_path):
    graph = import_graph(_toy(tmp_path))
    assert graph == {
        "toy": {"toy.low": [2, 3], "toy.high": [2]},
        "toy.low": {"toy.low.core": [2]},
        "toy.low.core": {"toy.low.util": [6]},
        "toy.low.util": {},
        "toy.high": {},
        "toy.high.user": {"toy.low.core": [2], "toy.low": [2, 5], "toy.low.util": [5]},
    }
    assert import_cycles(graph) == []


def test_graph_finds_function_level_cycles(tmp_path):
    """A back-edge inside a function closes a cycle; so does one through a package's __init__, and a
    module reading a name from the __init__ of its own package."""
    pkg = _toy(tmp_path, **{"low/util.py": """
        def k():
            from ..high import user
            return user
        """})
    graph = import_graph(pkg)
    assert graph["toy.low.util"] == {"toy.high.user": [3], "toy.high": [3]}
    # the shortest cycle through each module on one: user -> util, and the longer ones through toy.low's
    # __init__ (user imports it) and toy.low.core (which imports util in a function)
    assert import_cycles(graph) == [
        ["toy.high.user", "toy.low", "toy.low.core", "toy.low.util", "toy.high.user"],
        ["toy.high.user", "toy.low.core", "toy.low.util", "toy.high.user"],
        ["toy.high.user", "toy.low.util", "toy.high.user"]]
    text = describe_cycle(graph, pkg, ["toy.high.user", "toy.low.util", "toy.high.user"])
    assert text == "toy.high.user -> toy.low.util (toy/high/user.py:5) -> toy.high.user (toy/low/util.py:3)"

    pkg = _toy(tmp_path, **{"high/__init__.py": "from .user import h\n", "low/util.py": """
        import toy.high
        """})
    assert ["toy.high", "toy.high.user", "toy.low.util", "toy.high"] in import_cycles(import_graph(pkg))

    pkg = _toy(tmp_path, **{"low/util.py": """
        from .. import VERSION
        """})
    graph = import_graph(pkg)
    assert graph["toy.low.util"] == {"toy": [2]}
    assert ["toy", "toy.low", "toy.low.core", "toy.low.util", "toy"] in import_cycles(graph)


def test_string_imports_found(tmp_path):
    pkg = _toy(tmp_path, **{"high/lazy.py": """
        import importlib
        import sys

        def load(x):
            importlib.import_module("toy.low.util")
            __import__("toy")
            importlib.import_module(f"toy.low.{x}")
            importlib.import_module(".util", package="toy.low")
            sys.modules.get("toy.low")
            sys.modules["toy." + x]
            importlib.import_module("triton")
            sys.modules.get("torch.onnx")
            return importlib.import_module(x)
        """})
    found = string_imports(pkg)
    assert [int(f.split(":")[1]) for f in found] == [6, 7, 8, 9, 10, 11], found
    assert all(f.startswith(os.path.join("toy", "high", "lazy.py") + ":") for f in found)
    assert string_imports(_toy(tmp_path / "clean")) == []


@pytest.mark.parametrize("mod", ["fpet_kernels.ops", "fpet_kernels.patch", "fpet_kernels.pet"])
def test_graph_sees_the_package_faces(mod):
    """The real package's graph is not empty where it must not be: each subpackage's __init__ imports
    modules of its own."""
    graph = import_graph(PKG)
    assert any(t.startswith(mod + ".") for t in graph[mod]), graph[mod]
