"""The package's import graph: every module imports in a fresh interpreter, and no module
reaches itself through the imports it names (top-level or inside functions). A submodule's
implicit dependence on its parent package (Python starts the parent first) is not an edge;
an explicit ``from ..data import X`` is one, to ``data/__init__.py``."""
import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"vit_accel": ROOT / "vit_accel", "vit_accel_kernels": ROOT / "vit_accel_kernels"}


def _modules() -> Dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [pkg] + list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)


def import_graph() -> Dict[str, Set[str]]:
    """module -> the package modules it imports (resolved to files: a name imported from a
    package is the submodule when one has that name, else the package)."""
    mods = _modules()
    graph = {}  # type: Dict[str, Set[str]]
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]
        deps = set()  # type: Set[str]
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for stmt in ast.walk(tree) if _is_type_checking_block(stmt) for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run
                continue
            targets = []  # type: List[str]
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod + "." + a.name if mod + "." + a.name in mods else mod for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import vit_accel.data.loader` binds a known module, or a parent
                    t = t.rpartition(".")[0]
                if t:
                    deps.add(t)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One example cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_cycle_finder_finds_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(g) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "vit_accel.data.digits" in graph["vit_accel.data.make_shards"]  # the graph sees the package
    assert find_cycles(graph) == []


def test_every_module_imports_in_a_fresh_interpreter():
    """One new interpreter imports every module in turn (cli first: what `vit-accel` loads);
    ``__main__`` runs the CLI and is left out."""
    names = sorted(n for n in _modules() if not n.endswith(".__main__"))
    code = ("import importlib, json, sys\n"
            "bad = {}\n"
            "for n in json.loads(sys.argv[1]):\n"
            "    try:\n"
            "        importlib.import_module(n)\n"
            "    except Exception as e:\n"
            "        bad[n] = '%s: %s' % (type(e).__name__, e)\n"
            "print(json.dumps(bad))\n")
    env_path = "%s:%s" % (ROOT, ROOT / ".shim")
    p = subprocess.run([sys.executable, "-c", code, json.dumps(["vit_accel.cli"] + names)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {}
