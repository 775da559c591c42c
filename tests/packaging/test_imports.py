"""Imports run one way and do no work: the package's module-level imports form no cycle (leaf helpers
<- kernels <- registered ops <- model layer / PET methods <- the package face), and importing the
package loads neither Triton nor the test-only emulator, and does not initialise CUDA."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "fpet_kernels")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _module_level_imports(path: str, name: str) -> set:
    """Package modules imported at module level (imports inside functions are lazy by design)."""
    tree = ast.parse(open(path).read())
    pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
            if node.module:
                out.add(f"{base}.{node.module}")
            else:  # from . import a, b: the submodules a and b
                out.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fpet_kernels"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("fpet_kernels"))
    return out


def _graph() -> dict:
    mods = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                mods[_module_name(path)] = path
    return {m: {d for d in _module_level_imports(p, m) if d in mods and d != m} for m, p in mods.items()}


def test_no_import_cycle():
    graph = _graph()
    # a package's __init__ may import its submodules (the face); a submodule importing its own
    # package's __init__ back is the cycle we forbid, like any other.
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cyc = stack[stack.index(d):] + [d]
                if not all(a.startswith(b + ".") for a, b in zip(cyc[1:], cyc[:-1])):  # __init__ -> child only
                    raise AssertionError("import cycle: " + " -> ".join(cyc))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_kernels_never_import_the_ops_that_use_them():
    graph = _graph()
    kernels = [m for m in graph if m.endswith("_triton") or "_triton_" in m or m.endswith("triton_common")]
    assert kernels
    ops = {"fpet_kernels.ops.tome", "fpet_kernels.ops.fpet", "fpet_kernels.ops.pyra", "fpet_kernels.ops.attention"}
    for k in kernels:
        assert not (graph[k] & ops), f"{k} imports {graph[k] & ops}"


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
