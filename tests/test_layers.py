"""The package's layers, enforced over its import graph.

core (flat ``loopsearch/*.py``: what plugins import) < eval (measurements of checkpoints) <
search (Optuna) < results (tables and plots) < experiments (multi-step runs) < top (the CLI,
the conformance kit, ``python -m loopsearch``). A module may import its own layer or a lower
one, never a higher one; no two modules import each other, directly or around a cycle; and the
core imports neither Optuna, SQLAlchemy, click nor rich at module level.

``check`` parses every module with ``ast`` (imports at module level and inside functions alike)
and returns what is wrong, one line each: the importing file and line and the imported module.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import loopsearch

PACKAGE = Path(loopsearch.__file__).resolve().parent
LAYERS = ("core", "eval", "search", "results", "experiments", "top")
SUBPACKAGES = {"eval": "eval", "search": "search", "results": "results", "experiments": "experiments"}
TOP = {"cli", "testing", "__main__", "api"}
CORE_FORBIDDEN = {"optuna", "sqlalchemy", "click", "rich"}  # storage, Optuna and the CLI stay out of the core


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    path: str  # file, relative to the package's parent
    line: int
    imported: str  # dotted module name (a loopsearch module, or the top-level name of another package)
    module_level: bool


@dataclass
class Findings:
    upward: list[str] = field(default_factory=list)
    cycles: list[str] = field(default_factory=list)
    core_deps: list[str] = field(default_factory=list)

    def all(self) -> list[str]:
        return self.upward + self.cycles + self.core_deps


def layer(module: str) -> str:
    """The layer of a dotted loopsearch module name."""
    parts = module.split(".")
    if len(parts) == 1:
        return "core"  # loopsearch/__init__.py
    if parts[1] in SUBPACKAGES:
        return SUBPACKAGES[parts[1]]
    return "top" if parts[1] in TOP else "core"


def modules(root: Path) -> dict[str, Path]:
    """{dotted name: file} of every module of the package at ``root`` (a ``loopsearch`` folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, rel: str, known: set[str], ours: str = "loopsearch") -> list[Import]:
    """The imports of module ``name`` (file ``path``, shown as ``rel``); ``known``: the dotted names
    of the modules of package ``ours``, to which its imports are resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def add(node: ast.AST, target: str, top: bool) -> None:
        if target.split(".")[0] == ours:
            while target not in known and "." in target:  # `import loopsearch.x.y` of an attribute: its module
                target = target.rpartition(".")[0]
        else:
            target = target.split(".")[0]
        found.append(Import(name, rel, node.lineno, target, top))

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name, top)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(node, sub if sub in known else source, top)  # `from pkg import module` imports the module
        inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, True)
    return found


def import_graph(root: Path = PACKAGE) -> list[Import]:
    """Every import statement of every module of the package at ``root``."""
    mods = modules(root)
    return [imp for name, path in mods.items()
            for imp in _imports(name, path, str(path.relative_to(root.parent)), set(mods), root.name)]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def check(root: Path = PACKAGE) -> Findings:
    """Upward imports, import cycles between modules, and core modules importing Optuna, SQLAlchemy,
    click or rich at module level, in the package at ``root``."""
    imports = import_graph(root)
    pkg = root.name
    ours = [i for i in imports if i.imported == pkg or i.imported.startswith(pkg + ".")]
    findings = Findings()
    for i in ours:
        a, b = layer(i.importer), layer(i.imported)
        if LAYERS.index(b) > LAYERS.index(a):
            findings.upward.append(f"{i.path}:{i.line}: {i.importer} ({a}) imports {i.imported} ({b}), a higher layer")
    graph: dict[str, set[str]] = {}
    for i in ours:
        if i.imported != i.importer:
            graph.setdefault(i.importer, set()).add(i.imported)
    for component in _cycles(graph):
        members = set(component)
        edges = sorted({(i.path, i.line, i.imported) for i in ours
                        if i.importer in members and i.imported in members and i.imported != i.importer})
        findings.cycles.append(f"import cycle between {', '.join(component)}: "
                               + "; ".join(f"{p}:{n} imports {m}" for p, n, m in edges))
    for i in imports:
        if i.module_level and layer(i.importer) == "core" and i.imported in CORE_FORBIDDEN:
            findings.core_deps.append(f"{i.path}:{i.line}: core module {i.importer} imports {i.imported} at module "
                                      f"level (the core stays free of storage, the CLI and Optuna)")
    return findings


# ---- the package as it is ------------------------------------------------------------------------------
def test_every_module_is_in_a_known_layer():
    names = set(modules(PACKAGE))
    assert {"loopsearch.search.study", "loopsearch.eval.metrics", "loopsearch.results.report",
            "loopsearch.experiments.repro", "loopsearch.flops", "loopsearch.cli"} <= names
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(SUBPACKAGES), f"a new subpackage needs a layer in tests/test_layers.py: {folders}"
    for sub in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / sub / "__init__.py").read_text()))
        assert doc and "Layer:" in doc, f"loopsearch/{sub}/__init__.py: say what it holds and may import"


def test_no_module_imports_a_higher_layer():
    upward = check().upward
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    cycles = check().cycles
    assert not cycles, "\n".join(cycles)


def test_core_imports_no_optuna_sqlalchemy_click_or_rich():
    deps = check().core_deps
    assert not deps, "\n".join(deps)


def test_importing_the_core_loads_no_optuna_sqlalchemy_click_or_rich():
    core = sorted(name for name in modules(PACKAGE) if layer(name) == "core")
    code = (f"import importlib, sys\nfor m in {core!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in {sorted(CORE_FORBIDDEN)!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_builtin_plugins_import_only_the_core_and_the_core_no_plugin():
    """The builtins (plugins/, installed as loopsearch_builtins) are written like third-party
    plugins: against the core only. The package never imports them (they come in through
    entry points)."""
    known = set(modules(PACKAGE))
    plugins = PACKAGE.parent / "plugins"
    wrong = [f"{i.path}:{i.line}: imports {i.imported} ({layer(i.imported)})"
             for path in sorted(plugins.glob("*.py"))
             for i in _imports(f"loopsearch_builtins.{path.stem}", path, f"plugins/{path.name}", known)
             if i.imported.split(".")[0] == "loopsearch" and layer(i.imported) != "core"]
    assert not wrong, "\n".join(wrong)
    assert not [i for i in import_graph() if i.imported == "loopsearch_builtins"]


# ---- the checker catches what it should ---------------------------------------------------------------------
def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "loopsearch"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _plant(root: Path, module: str, line: str) -> int:
    """Append ``line`` to ``module`` (a path under the package); returns its line number."""
    path = root / module
    text = path.read_text()
    text += ("" if text.endswith("\n") else "\n") + line + "\n"
    path.write_text(text)
    return text.count("\n")


def test_a_planted_upward_import_is_reported_with_its_file_and_line(tmp_path):
    root = _copy(tmp_path)
    assert not check(root).all()
    line = _plant(root, "flops.py", "from loopsearch.search import study")
    found = check(root)
    assert found.upward == [f"loopsearch/flops.py:{line}: loopsearch.flops (core) imports loopsearch.search.study "
                            f"(search), a higher layer"]
    # study -> ... -> flops
    assert any("loopsearch.flops" in c and "loopsearch.search.study" in c for c in found.cycles)


def test_a_planted_function_local_relative_import_is_reported(tmp_path):
    root = _copy(tmp_path)
    line = _plant(root, "eval/metrics.py", "def _late():\n    from ..results import leaderboard")
    assert check(root).upward == [f"loopsearch/eval/metrics.py:{line}: loopsearch.eval.metrics (eval) imports "
                                  f"loopsearch.results.leaderboard (results), a higher layer"]


def test_a_planted_cycle_within_a_layer_is_reported(tmp_path):
    root = _copy(tmp_path)
    line = _plant(root, "resume.py", "from . import train")  # train imports resume
    found = check(root)
    assert not found.upward
    assert len(found.cycles) == 1
    assert found.cycles[0].startswith("import cycle between loopsearch.resume, loopsearch.train: ")
    assert f"loopsearch/resume.py:{line} imports loopsearch.train" in found.cycles[0]


def test_a_planted_optuna_import_in_the_core_is_reported(tmp_path):
    root = _copy(tmp_path)
    line = _plant(root, "units.py", "import optuna.trial")
    assert check(root).core_deps == [f"loopsearch/units.py:{line}: core module loopsearch.units imports optuna at "
                                     f"module level (the core stays free of storage, the CLI and Optuna)"]
