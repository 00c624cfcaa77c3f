"""The package's layering: every module imports on its own (no import circle), the bottom layers import nothing of
ours, the run helpers know no search library, and no framework is named outside its own backend and flavor modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mlflow_edge
from mlflow_edge.backends import backend_names, get_backend

PACKAGE = Path(mlflow_edge.__file__).parent


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _imported(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_every_module_imports_first():
    """Each module imported first, in a fresh set of mlflow_edge modules: an import circle fails here."""
    script = (
        "import sys, importlib\n"
        f"names = {_modules()!r}\n"
        "failed = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m == 'mlflow_edge' or m.startswith('mlflow_edge.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The nodes under ``if TYPE_CHECKING:``: annotations, never imported when the code runs."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside.update(id(child) for statement in node.body for child in ast.walk(statement))
    return inside


def _dependencies(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports at any level (module, class or function body), each with the
    packages above it, whose ``__init__`` runs first; ``TYPE_CHECKING`` imports aside."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            named.update({base, *(f"{base}.{alias.name}" for alias in node.names)})
    found = set()
    for module in named:
        while module and module not in modules:
            module = module.rpartition(".")[0]
        while module and module != "mlflow_edge":
            if module != name and not name.startswith(module + "."):
                found.add(module)
            module = module.rpartition(".")[0]
    return found


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles


def test_no_import_circle_at_any_level():
    """No two modules import each other, directly or through others, even inside a function: a function-level
    import that closes a circle works only by the order things happen to load in."""
    paths = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: _dependencies(name, path, set(paths)) for name, path in paths.items()}
    assert _circles(graph) == []
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check itself


def test_promotion_imports_no_backend():
    """The readiness report reads what a logged model records (its native servers), so promoting needs no framework
    code: the registry and the report import no backend."""
    modules = {name for name in _modules()}
    for name in ("readiness", "registry"):
        found = _dependencies(f"mlflow_edge.{name}", PACKAGE / f"{name}.py", modules)
        assert not {m for m in found if m.startswith("mlflow_edge.backends")}, (name, found)


def test_bottom_layers_import_nothing_of_ours():
    for name in ("errors.py", "metrics.py", "tags.py"):
        ours = {m for m in _imported(PACKAGE / name) if m.startswith("mlflow_edge")}
        assert not ours, f"{name} imports {ours}"


def test_run_helpers_know_no_search_library_and_search_no_flows():
    assert not {m for m in _imported(PACKAGE / "runs.py") if m.split(".")[0] == "optuna"}
    for path in (PACKAGE / "search").rglob("*.py"):
        assert "mlflow_edge.workflow" not in _imported(path), path


def _owned_path(module: str) -> Path:
    """The file of ``module`` inside the package, or its package folder when it lies in a backend package
    (``backends/llamacpp/quantize.py`` → ``backends/llamacpp``), relative to the package."""
    parts = module.split(".")[1:]
    if len(parts) > 2 and parts[0] == "backends":
        return Path(*parts[:2])
    return Path(*parts) if (PACKAGE / Path(*parts)).is_dir() else Path(*parts).with_suffix(".py")


def test_no_framework_named_outside_its_own_modules():
    """A registered backend's name or format appears only in its backend module, its flavor module (and the
    package's docs); generic code derives everything from the entry points."""
    words = {}
    for name in backend_names():
        backend = get_backend(name)
        owned = {_owned_path(type(backend).__module__), _owned_path(backend.flavor)}
        for word in (name, backend.format):
            words.setdefault(word, set()).update(owned)
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in words:
                if not any(relative == owned or owned in relative.parents for owned in words[node.value]):
                    offenders.append(f"{relative}:{node.lineno}: {node.value!r}")
    assert not offenders, "\n".join(offenders)
