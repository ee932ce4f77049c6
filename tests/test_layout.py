"""The package's layout, read from the source (no imports run): what sits at the root, that no
module imports in a circle, that the shared error type is at the bottom, and that the product
never imports its own test bench."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "classifiers", "edm2", "guiders", "nodes", "testbed")
ROOT_PY = {"__init__.py", "__main__.py"}   # ComfyUI's entry point and the command line


def _module(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    out = {}
    for p in sorted(REPO.glob("*.py")) + [f for pkg in PACKAGES for f in (REPO / pkg).rglob("*.py")]:
        out[_module(p)] = p
    return out


def _imports(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The pack's modules that ``name`` imports, anywhere in the file (function-level imports too)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if name else []
    if not is_pkg:
        base = base[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            anchor = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join(anchor + (node.module.split(".") if node.module else []))
            # ``from X import a``: the module X.a where it is one, else X (a is defined in X)
            for a in node.names:
                sub = f"{target}.{a.name}".lstrip(".")
                if sub in known:
                    found.add(sub)
                elif target in known:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("comfyui_gfcg"):
            found.add(node.module[len("comfyui_gfcg."):])
    found.discard(name)
    return found


def _graph() -> Dict[str, Set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _edges_between_packages(graph):
    """module -> imported module, a package's ``__init__`` counting as importing its own modules."""
    return [(a, b) for a, bs in graph.items() for b in bs if a.split(".")[0] != b.split(".")[0]]


def test_the_root_holds_only_the_entry_points():
    stray = sorted(p.name for p in REPO.glob("*.py") if p.name not in ROOT_PY)
    assert not stray, f"Python files at the root besides {sorted(ROOT_PY)}: {stray}; they belong in a package"


def test_the_graph_is_read():
    g = _graph()
    assert len(g) >= 40, len(g)
    assert "guiders.engine" in g["guiders.comfy_guider"]
    assert "common.errors" in g["classifiers.timm_classifier"]


def test_no_module_imports_in_a_circle():
    circles = _cycles(_graph())
    assert not circles, "modules importing each other in a circle: " + "; ".join(" <-> ".join(c) for c in circles)


def test_a_circle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_shared_error_type_is_at_the_bottom():
    """``common`` imports nothing of the pack's other packages, and every package that raises
    GFCGInputError takes it from there (classifiers no longer import guiders for it)."""
    g = _graph()
    up = [(a, b) for a, b in _edges_between_packages(g) if a.startswith("common")]
    assert not up, f"common imports other packages: {up}"
    assert not [(a, b) for a, b in _edges_between_packages(g) if a.startswith("classifiers") and b.startswith("guiders")]


def test_the_product_never_imports_the_testbed():
    """Only the testbed itself and the command line (``__main__``) import ``testbed``."""
    g = _graph()
    bad = [(a, b) for a, bs in g.items() for b in bs
           if b.split(".")[0] == "testbed" and a.split(".")[0] != "testbed" and a != "__main__"]
    assert not bad, f"product modules that import the testbed: {bad}"


def test_comfyui_glue_stays_in_its_files():
    """Framework-free modules import no ComfyUI module at their top level (the glue is the files
    named comfy_*, the nodes, and the entry point)."""
    bad = []
    for m, p in _modules().items():
        leaf = m.split(".")[-1]
        if m.startswith(("nodes", "testbed")) or leaf.startswith("comfy_") or m in ("", "__main__"):
            continue
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            bad += [f"{m}: {n}" for n in names if n.split(".")[0] in ("comfy", "folder_paths", "server", "comfy_execution",
                                                                   "comfy_api", "nodes", "execution")]
    assert not bad, bad
