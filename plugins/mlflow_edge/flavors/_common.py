"""What every mlflow-edge flavor writes the same way: the model's environment files and its metadata config."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Collection, Mapping

import yaml
from mlflow.exceptions import MlflowException
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
)
from mlflow.utils.file_utils import write_to


def write_environment(path: str, conda_env: dict | str | None, pip_requirements: list[str] | str | None,
                      extra_pip_requirements: list[str] | str | None,
                      default_requirements: Callable[[], list[str]]) -> None:
    """``conda.yaml``, ``requirements.txt``, ``constraints.txt`` and ``python_env.yaml`` in the model dir ``path``,
    as MLflow's own flavors write them (``default_requirements`` unless the caller gives requirements)."""
    if conda_env is None:
        default_reqs = default_requirements() if pip_requirements is None else None
        conda_env, pip_requirements, pip_constraints = _process_pip_requirements(
            default_reqs, pip_requirements, extra_pip_requirements
        )
    else:
        conda_env, pip_requirements, pip_constraints = _process_conda_env(conda_env)
    with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if pip_constraints:
        write_to(os.path.join(path, _CONSTRAINTS_FILE_NAME), "\n".join(pip_constraints))
    write_to(os.path.join(path, _REQUIREMENTS_FILE_NAME), "\n".join(pip_requirements))
    _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))


def normalize_metadata_config(metadata_config: Mapping[str, Any] | None, reserved: Collection[str]) -> dict[str, Any]:
    """A plain JSON copy of ``metadata_config`` (tuples become lists); refuse reserved or unserializable keys."""
    if not metadata_config:
        return {}
    if clash := sorted(set(reserved).intersection(metadata_config)):
        raise MlflowException.invalid_parameter_value(f"metadata_config may not set reserved keys: {clash}")
    try:
        return json.loads(json.dumps(dict(metadata_config)))
    except (TypeError, ValueError) as exc:
        raise MlflowException.invalid_parameter_value(f"metadata_config must be JSON-serializable: {exc}") from exc
