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


def test_bottom_layers_import_nothing_of_ours():
    for name in ("errors.py", "metrics.py"):
        ours = {m for m in _imported(PACKAGE / name) if m.startswith("mlflow_edge")}
        assert not ours, f"{name} imports {ours}"


def test_run_helpers_know_no_search_library_and_search_no_flows():
    assert not {m for m in _imported(PACKAGE / "runs.py") if m.split(".")[0] == "optuna"}
    for path in (PACKAGE / "search").rglob("*.py"):
        assert "mlflow_edge.workflow" not in _imported(path), path


def test_no_framework_named_outside_its_own_modules():
    """A registered backend's name or format appears only in its backend module, its flavor module (and the
    package's docs); generic code derives everything from the entry points."""
    words = {}
    for name in backend_names():
        backend = get_backend(name)
        owned = {Path(*backend.__module__.split(".")[1:]).with_suffix(".py"),
                 Path(*backend.flavor.split(".")[1:]).with_suffix(".py")}
        for word in (name, backend.format):
            words.setdefault(word, set()).update(owned)
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in words:
                if relative not in words[node.value]:
                    offenders.append(f"{relative}:{node.lineno}: {node.value!r}")
    assert not offenders, "\n".join(offenders)
