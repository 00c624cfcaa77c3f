"""The MLflow internals the flavors use (:mod:`mlflow_edge.flavors._mlflow_compat`): checked on the MLflow releases
it names, and refused loudly on any other until someone reads that release's helpers again."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import mlflow
import pytest

import mlflow_edge
from mlflow_edge.flavors import _mlflow_compat

PACKAGE = Path(mlflow_edge.__file__).parent


def test_the_installed_mlflow_is_one_the_compat_module_was_checked_on():
    assert _mlflow_compat.version_checked(), (
        f"MLflow {mlflow.__version__} is not among the releases mlflow_edge.flavors._mlflow_compat was checked on "
        f"({', '.join(_mlflow_compat.CHECKED_VERSIONS)}): read its private helpers in this release, then add it")


@pytest.mark.parametrize(("version", "checked"), [("3.17.2", True), ("3.18.0", True), ("3.18.1rc0", True),
                                                  ("3.19.0", False), ("4.0.0", False), ("3.1.0", False)])
def test_version_check_reads_major_and_minor(version, checked):
    assert _mlflow_compat.version_checked(version) is checked


def test_the_patched_function_has_the_signature_the_patch_expects():
    """The one patch wraps ``mlflow.pyfunc._validate_prediction_input``; a release that renames or reshapes it
    leaves it unwrapped (undeclared params dropped again), so that is caught here first."""
    import importlib

    validate = importlib.import_module("mlflow.pyfunc")._validate_prediction_input
    original = getattr(validate, "__wrapped__", validate)
    assert list(inspect.signature(original).parameters) == ["data", "params", "input_schema", "params_schema", "flavor"]


def test_the_helpers_keep_the_shapes_the_flavors_call():
    assert list(inspect.signature(_mlflow_compat.process_pip_requirements).parameters)[:3] == [
        "default_pip_requirements", "pip_requirements", "extra_pip_requirements"]
    assert "additional_pip_deps" in inspect.signature(_mlflow_compat._mlflow_conda_env).parameters
    assert _mlflow_compat.pinned_requirement("numpy").startswith("numpy==")
    env = _mlflow_compat.conda_env_with(["numpy==1.0"])
    assert "numpy==1.0" in env["dependencies"][-1]["pip"]


def _private_mlflow_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow":
            found += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if ast.unparse(node.value).split(".")[0] == "mlflow":
                found.append(f"{path.name}: {ast.unparse(node)}")
    return found


def test_no_other_module_uses_a_private_mlflow_name():
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) if path.name != "_mlflow_compat.py"
                 for hit in _private_mlflow_imports(path)]
    assert offenders == []
    assert _private_mlflow_imports(PACKAGE / "flavors" / "_mlflow_compat.py")  # the check finds them where they are
