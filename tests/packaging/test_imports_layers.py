"""Imports of the model and PET layers run one way, function-level imports included:
``ops`` <- ``integrations`` <- ``layers`` <- ``patch`` <- ``pet``, no import cycle through those
modules, and no ``importlib.import_module`` of a package module by string there."""
from __future__ import annotations

import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "fpet_kernels")
#: The layers in import order: a module may import its own layer and those before it, never a later one.
LAYERS = ["fpet_kernels.ops", "fpet_kernels.integrations", "fpet_kernels.layers", "fpet_kernels.patch",
          "fpet_kernels.pet"]


def _modules() -> dict:
    mods = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                name = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _imports(path: str, name: str, mods: dict) -> dict:
    """``{package module: line}`` of every import in ``path`` (``ast.walk``: inside functions too)."""
    def resolve(target):
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target

    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = {}
    for node in ast.walk(ast.parse(open(path).read())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = pkg
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            mod = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            if t.startswith("fpet_kernels") and resolve(t) and resolve(t) != name:
                out.setdefault(resolve(t), node.lineno)
    return out


def _layer(name: str) -> int:
    return max((i for i, l in enumerate(LAYERS) if name == l or name.startswith(l + ".")), default=-1)


def test_model_and_pet_layers_import_downward_only():
    mods = _modules()
    bad = []
    for name, path in mods.items():
        me = _layer(name)
        if me < 0:
            continue
        for dep, line in _imports(path, name, mods).items():
            if _layer(dep) > me:
                bad.append(f"{name}:{line} imports {dep}")
    assert not bad, "imports pointing up the layers: " + "; ".join(bad)


def test_no_cycle_through_the_model_and_pet_layers():
    mods = _modules()
    graph = {m: _imports(p, m, mods) for m, p in mods.items()}
    area = [m for m in graph if _layer(m) >= 1]
    for start in area:  # a path from a module back to itself
        seen, todo = set(), [(start, [start])]
        while todo:
            m, trail = todo.pop()
            for d in graph[m]:
                if d == start:
                    raise AssertionError("import cycle: " + " -> ".join(trail + [d]))
                if d not in seen and _layer(d) >= 1:
                    seen.add(d)
                    todo.append((d, trail + [d]))


def test_no_importlib_by_string_in_the_model_and_pet_layers():
    found = []
    for name, path in _modules().items():
        if _layer(name) < 1:
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
                found.append(f"{name}:{node.lineno}")
    assert not found, f"importlib.import_module in {found}"


def test_no_top_level_patch_hf():
    assert not os.path.exists(os.path.join(PKG, "patch_hf.py"))
