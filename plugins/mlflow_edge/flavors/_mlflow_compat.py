"""Every private MLflow name mlflow-edge uses, and its one patch of MLflow, in one place.

The flavors save models as MLflow's own flavors do (``mlflow/onnx``, ``mlflow/sklearn``): the environment files, the
code paths, the input example, pinned requirements. MLflow offers those helpers only under private names, so they are
imported here and nowhere else, under public names of ours; :data:`CHECKED_VERSIONS` says which MLflow releases they
were read against (``tests/flavors/test_mlflow_compat.py`` fails on any other, so a new MLflow is read before it is
trusted). The patch, :func:`refuse_undeclared_params`, makes pyfunc refuse undeclared params for our models.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading
from typing import Any, Callable, Mapping

import mlflow
from mlflow.models.utils import _save_example as save_example
from mlflow.utils.environment import _CONDA_ENV_FILE_NAME as CONDA_ENV_FILE_NAME
from mlflow.utils.environment import _CONSTRAINTS_FILE_NAME as CONSTRAINTS_FILE_NAME
from mlflow.utils.environment import _PYTHON_ENV_FILE_NAME as PYTHON_ENV_FILE_NAME
from mlflow.utils.environment import _REQUIREMENTS_FILE_NAME as REQUIREMENTS_FILE_NAME
from mlflow.utils.environment import _mlflow_conda_env
from mlflow.utils.environment import _process_conda_env as process_conda_env
from mlflow.utils.environment import _process_pip_requirements as process_pip_requirements
from mlflow.utils.environment import _PythonEnv as PythonEnv
from mlflow.utils.environment import _validate_env_arguments as validate_env_arguments
from mlflow.utils.model_utils import _validate_and_copy_code_paths as copy_code_paths
from mlflow.utils.model_utils import _validate_and_prepare_target_save_path as prepare_save_path
from mlflow.utils.requirements_utils import _get_pinned_requirement as pinned_requirement

__all__ = ["CHECKED_VERSIONS", "CONDA_ENV_FILE_NAME", "CONSTRAINTS_FILE_NAME", "PYTHON_ENV_FILE_NAME", "PythonEnv",
           "REQUIREMENTS_FILE_NAME", "STRICT_MARK", "conda_env_with", "copy_code_paths", "pinned_requirement",
           "prepare_save_path", "process_conda_env", "process_pip_requirements", "refuse_undeclared_params",
           "save_example", "validate_env_arguments", "version_checked"]

CHECKED_VERSIONS = ("3.17", "3.18")
"""The MLflow minor releases whose private helpers above (names, signatures, behaviour) and whose
``mlflow.pyfunc._validate_prediction_input`` were read and tested with this module."""


def version_checked(version: str = mlflow.__version__) -> bool:
    """Whether ``version`` is one of :data:`CHECKED_VERSIONS` (its major.minor)."""
    return ".".join(version.split(".")[:2]) in CHECKED_VERSIONS


def conda_env_with(pip_requirements: list[str]) -> dict[str, Any]:
    """MLflow's default conda environment of a model, with ``pip_requirements``."""
    return _mlflow_conda_env(additional_pip_deps=pip_requirements)


# -- refusing undeclared params under MLflow's pyfunc -----------------------------------------------------------------
_STRICT_LOADERS: set[str] = set()
_STRICT_LOCK = threading.Lock()
STRICT_MARK = "_mlflow_edge_refuses_undeclared_params"
_VALIDATE_ARGS = ["data", "params", "input_schema", "params_schema", "flavor"]


def refuse_undeclared_params(loader_module: str, check: Callable[[Mapping[str, Any] | None, list[str]], None]) -> None:
    """Make ``PyFuncModel.predict`` refuse, not drop, params undeclared by models whose loader is ``loader_module``:
    ``check(params, declared_names)`` raises for them.

    MLflow's ``PyFuncModel._predict`` passes the caller's params through ``mlflow.pyfunc._validate_prediction_input``,
    whose ``_enforce_params_schema`` drops every undeclared param with a warning before the model's ``predict`` sees
    them (``mlflow models serve`` calls the same ``PyFuncModel.predict``), and MLflow has no public option to refuse
    them. So the loader wraps that function, once per process: for its own models (the ``flavor`` argument is the
    loader module) it checks the names first; every other model is left as MLflow treats it. Should a future MLflow
    change that function, nothing is wrapped and undeclared params are dropped again (the flavor tests catch it).
    """
    module = importlib.import_module("mlflow.pyfunc")  # the module itself: `mlflow.pyfunc` may be a lazy proxy
    with _STRICT_LOCK:
        _STRICT_LOADERS.add(loader_module)
        original = getattr(module, "_validate_prediction_input", None)
        if original is None or getattr(original, STRICT_MARK, False):
            return
        if list(inspect.signature(original).parameters) != _VALIDATE_ARGS:
            return

        @functools.wraps(original)
        def validate(data, params, input_schema, params_schema, flavor=None):
            if flavor in _STRICT_LOADERS:
                declared = [spec.name for spec in params_schema.params] if params_schema is not None else []
                check(params if isinstance(params, Mapping) else None, declared)
            return original(data, params, input_schema, params_schema, flavor)

        setattr(validate, STRICT_MARK, True)
        module._validate_prediction_input = validate
