"""The package's layers import one way: each module's imports (module-level and the lazy ones in
functions alike) are read with ``ast``, mapped to their subpackage, and checked against the
declared order; no two modules may import each other, directly or round a longer loop."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_memaudit"
# Lowest first: a layer may import the layers before it and itself, never one after it.
# ``errors`` (the shared exceptions) and the package's ``__init__`` sit below every layer.
LAYERS = ("metric", "data", "models", "controls", "analysis", "results", "pipeline", "gates", "report", "plugin")
BASE = ("errors", "")


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, package_dir: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, module below the package) of every import of the package in ``path``, lazy ones included;
    ``from . import x`` counts as an import of module ``x`` where ``x`` is one."""
    name = module_name(path, package_dir)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [part for part in package if part]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("pytest_memaudit"):
                target = node.module.removeprefix("pytest_memaudit").removeprefix(".")
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                is_module = (package_dir / sub.replace(".", "/")).with_suffix(".py").exists() or \
                    (package_dir / sub.replace(".", "/")).is_dir()
                found.append((node.lineno, sub if is_module else target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.removeprefix("pytest_memaudit").removeprefix("."))
                      for alias in node.names if alias.name.startswith("pytest_memaudit")]
    return found


def layer_of(module: str) -> str:
    top = module.split(".")[0]
    if top in BASE:
        return top
    assert top in LAYERS, f"module pytest_memaudit.{module} lies in no declared layer: add it to LAYERS"
    return top


def rank(layer: str) -> int:
    return -1 if layer in BASE else LAYERS.index(layer)


def upward_imports(package: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        here = module_name(path, package)
        for line, target in imports_of(path, package):
            if target in ("", "__version__"):
                continue
            if rank(layer_of(target)) > rank(layer_of(here)):
                problems.append(f"{path.relative_to(package.parent)}:{line}: {layer_of(here)} imports {target}, "
                                f"a layer above it")
    return problems


def import_cycles(package: Path = PACKAGE) -> list[list[str]]:
    graph = {module_name(path, package): {target for _, target in imports_of(path, package)}
             for path in package.rglob("*.py")}
    graph = {module: {t for t in targets if t in graph and t != module and not module.startswith(t + ".")}
             for module, targets in graph.items()}
    cycles, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return cycles


def test_every_module_lies_in_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


def test_no_layer_imports_one_above_it():
    assert upward_imports() == []


def test_no_import_cycle():
    assert [" -> ".join(cycle) for cycle in import_cycles()] == []


def test_every_subpackage_says_what_it_owns_and_may_import():
    for layer in LAYERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text())) or ""
        assert "May import:" in doc, f"pytest_memaudit/{layer}/__init__.py: its docstring names no 'May import:'"


@pytest.mark.parametrize("source", [
    "from ..plugin import parallel\n",  # the metric reaching up to the pytest layer
    "def late():\n    from ..report import write_report\n",  # a lazy import counts too
])
def test_an_upward_import_is_caught(tmp_path, source):
    """The check itself, on a copy of the package with one import added to ``metric/stats.py``."""
    import shutil

    copy = tmp_path / "pytest_memaudit"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    stats = copy / "metric" / "stats.py"
    stats.write_text(stats.read_text() + "\n" + source)
    added = [problem for problem in upward_imports(copy) if problem not in upward_imports()]
    assert len(added) == 1 and added[0].startswith("pytest_memaudit/metric/stats.py:") and "metric imports" in added[0]


def test_a_cycle_is_caught(tmp_path):
    import shutil

    copy = tmp_path / "pytest_memaudit"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    stats = copy / "metric" / "stats.py"
    stats.write_text(stats.read_text() + "\nfrom .verdict import decide\n")  # verdict imports stats
    added = [cycle for cycle in import_cycles(copy) if cycle not in import_cycles()]
    assert added and all("metric.stats" in cycle and "metric.verdict" in cycle for cycle in added)


def test_the_public_api_is_imported_on_first_use():
    """``import pytest_memaudit`` imports no torch; each public name resolves to where it is defined."""
    import subprocess
    import sys

    script = ("import sys, pytest_memaudit as p\n"
              "assert 'torch' not in sys.modules\n"
              "for name, module in p.PUBLIC.items():\n"
              "    assert getattr(p, name).__module__ == 'pytest_memaudit.' + module, name\n"
              "try:\n    p.run_audits\nexcept AttributeError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "module 'pytest_memaudit' has no attribute 'run_audits'\n"


def test_every_subpackage_ships_in_the_wheel():
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(("pytest_memaudit", *path.parent.relative_to(PACKAGE).parts))
             for path in PACKAGE.rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
