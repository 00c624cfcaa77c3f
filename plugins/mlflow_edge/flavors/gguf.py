"""The ``gguf`` MLflow flavor: a llama.cpp GGUF file as an MLflow Model.

The model directory holds the GGUF file (``model.gguf``) as its only model file, next to MLflow's own ``MLmodel`` and
environment files. Two flavors are written:

``gguf``
    loads back as a ``llama_cpp.Llama`` (:func:`load_model`); its config records the file, its sha256, ``n_ctx``, the
    llama-cpp-python version and whatever the caller passes in ``metadata_config`` (quant type, source, options).
:py:mod:`mlflow.pyfunc`
    ``predict(prompts, params)`` returns one generated string per prompt, so ``mlflow models serve`` and
    ``mlflow.pyfunc.load_model`` work unchanged. Generation params (``max_tokens``, ``temperature``, ``top_p``,
    ``top_k``, ``repeat_penalty``, ``seed``, ``chat``) are declared in the default signature.

Example::

    import mlflow
    from mlflow_edge.flavors import gguf
    from mlflow_edge.sources import demo_gguf_path

    with mlflow.start_run():
        info = gguf.log_model(demo_gguf_path(), name="model", metadata_config={"precision": "Q4_1"})
    model = mlflow.pyfunc.load_model(info.model_uri)
    print(model.predict(["The capital of France is"], params={"max_tokens": 8}))
    llm = gguf.load_model(info.model_uri)  # a llama_cpp.Llama
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd

from mlflow import pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelInputExample, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME, ModelInfo
from mlflow.models.utils import _save_example
from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _mlflow_conda_env,
    _validate_env_arguments,
)
from mlflow.utils.file_utils import get_total_file_size
from mlflow.utils.model_utils import (
    _add_code_from_conf_to_system_path,
    _get_flavor_configuration,
    _validate_and_copy_code_paths,
    _validate_and_prepare_target_save_path,
)
from mlflow.utils.requirements_utils import _get_pinned_requirement

from mlflow_edge import cache
from mlflow_edge.backends.llamacpp import require_llama_cpp
from mlflow_edge.flavors._common import normalize_metadata_config, write_environment
from mlflow_edge.sources import validate_gguf

if TYPE_CHECKING:
    import llama_cpp

FLAVOR_NAME = "gguf"
_MODEL_FILE = "model.gguf"
_RESERVED_KEYS = frozenset({"gguf_file", "gguf_sha256", "n_ctx", "llama_cpp_python_version", "code"})

# name, MLflow param type, default: the single source of the params schema and of predict's defaults
GENERATION_PARAMS: tuple[tuple[str, str, Any], ...] = (
    ("max_tokens", "long", 64),
    ("temperature", "double", 0.0),
    ("top_p", "double", 1.0),
    ("top_k", "long", 40),
    ("repeat_penalty", "double", 1.0),
    ("seed", "long", 0),
    ("chat", "boolean", False),
)


def get_default_pip_requirements() -> list[str]:
    """Pinned pip requirements every model of this flavor needs: llama-cpp-python and mlflow-edge."""
    return [
        _get_pinned_requirement("llama-cpp-python", module="llama_cpp"),
        _get_pinned_requirement("mlflow-edge", module="mlflow_edge"),
    ]


def get_default_conda_env() -> dict[str, Any]:
    """The default conda environment for models of this flavor."""
    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())


def default_signature() -> ModelSignature:
    """One string column (the prompts) in, one string per prompt out, and the generation params with defaults.

    The input column is unnamed on purpose: MLflow's schema enforcement turns a list of strings (and serving's
    ``{"inputs": [...]}``) into a DataFrame with column ``0``, which a column named ``prompt`` would reject; an unnamed
    column accepts that and ``{"prompt": ...}`` / ``dataframe_records`` alike.
    """
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec(name, dtype, default) for name, dtype, default in GENERATION_PARAMS]),
    )


def save_model(
    gguf_path: str | os.PathLike,
    path: str | os.PathLike,
    *,
    metadata_config: Mapping[str, Any] | None = None,
    n_ctx: int = 2048,
    conda_env: dict | str | None = None,
    code_paths: list[str] | None = None,
    mlflow_model: Model | None = None,
    signature: ModelSignature | None = None,
    input_example: ModelInputExample | None = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Save the GGUF file at ``gguf_path`` as an MLflow Model in the new (or empty) directory ``path``.

    Raises :class:`~mlflow_edge.backends.base.EdgeError` for a corrupt or truncated GGUF (nothing is written), and
    ``MlflowException`` when ``path`` exists and is not empty or ``metadata_config`` is not JSON-serializable.
    """
    llama_cpp_version = require_llama_cpp().__version__
    flavor_extra = normalize_metadata_config(metadata_config, _RESERVED_KEYS)
    if int(n_ctx) <= 0:
        raise MlflowException.invalid_parameter_value(f"n_ctx must be positive, got {n_ctx}")
    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    gguf_path = Path(gguf_path)
    validate_gguf(gguf_path)  # reads the whole tensor table: a few seconds for 100 MB

    path = os.path.abspath(path)
    created = not os.path.exists(path)
    _validate_and_prepare_target_save_path(path)
    try:
        code_dir_subpath = _validate_and_copy_code_paths(code_paths, path)
        if mlflow_model is None:
            mlflow_model = Model()
        mlflow_model.signature = signature if signature is not None else default_signature()
        if input_example is not None:
            _save_example(mlflow_model, input_example, path)
        if metadata is not None:
            mlflow_model.metadata = metadata

        shutil.copyfile(gguf_path, os.path.join(path, _MODEL_FILE))
        pyfunc.add_to_model(
            mlflow_model,
            loader_module=__name__,
            data=_MODEL_FILE,
            conda_env=_CONDA_ENV_FILE_NAME,
            python_env=_PYTHON_ENV_FILE_NAME,
            code=code_dir_subpath,
            model_config={"n_ctx": int(n_ctx)},
        )
        mlflow_model.add_flavor(
            FLAVOR_NAME,
            gguf_file=_MODEL_FILE,
            gguf_sha256=cache.sha256_file(Path(path, _MODEL_FILE)),
            n_ctx=int(n_ctx),
            llama_cpp_python_version=llama_cpp_version,
            code=code_dir_subpath,
            **flavor_extra,
        )
        if size := get_total_file_size(path):
            mlflow_model.model_size_bytes = size
        mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))

        write_environment(path, conda_env, pip_requirements, extra_pip_requirements, get_default_pip_requirements)
    except BaseException:
        if created:  # never leave a half-written model directory behind
            shutil.rmtree(path, ignore_errors=True)
        raise


def log_model(
    gguf_path: str | os.PathLike,
    name: str | None = None,
    *,
    artifact_path: str | None = None,
    metadata_config: Mapping[str, Any] | None = None,
    n_ctx: int = 2048,
    registered_model_name: str | None = None,
    signature: ModelSignature | None = None,
    input_example: ModelInputExample | None = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
    await_registration_for: int = DEFAULT_AWAIT_MAX_SLEEP_SECONDS,
    **kwargs: Any,
) -> ModelInfo:
    """Log the GGUF file as an MLflow Model (in the active run, or a new one); returns its ``ModelInfo``.

    ``name`` is the MLflow 3 model name; ``artifact_path`` is MLflow's deprecated alias for it. Other keyword
    arguments (``code_paths``, ``conda_env``, ``params``, ``tags``, ``model_type``, ``step``, ``model_id``, ``run_id``)
    go to :py:meth:`mlflow.models.Model.log`.
    """
    return Model.log(
        artifact_path=artifact_path,
        name=name,
        flavor=sys.modules[__name__],
        gguf_path=gguf_path,
        metadata_config=metadata_config,
        n_ctx=n_ctx,
        registered_model_name=registered_model_name,
        await_registration_for=await_registration_for,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        metadata=metadata,
        **kwargs,
    )


def _llama(model_file: str, n_ctx: int) -> llama_cpp.Llama:
    return require_llama_cpp().Llama(model_path=model_file, n_ctx=int(n_ctx), verbose=False)


def load_model(model_uri: str, dst_path: str | None = None, n_ctx: int | None = None) -> llama_cpp.Llama:
    """Load the model at ``model_uri`` as a ``llama_cpp.Llama`` (``n_ctx`` overrides the saved context size)."""
    local_model_path = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    flavor_conf = _get_flavor_configuration(model_path=local_model_path, flavor_name=FLAVOR_NAME)
    _add_code_from_conf_to_system_path(local_model_path, flavor_conf)
    model_file = os.path.join(local_model_path, flavor_conf["gguf_file"])
    return _llama(model_file, n_ctx if n_ctx is not None else flavor_conf["n_ctx"])


class _GGUFModelWrapper:
    """The pyfunc face of a GGUF model: prompts in, generated strings out."""

    def __init__(self, llm: llama_cpp.Llama) -> None:
        self._llm = llm
        self._lock = threading.Lock()  # a Llama is not thread-safe; servers may call predict concurrently

    def get_raw_model(self) -> llama_cpp.Llama:
        """The underlying ``llama_cpp.Llama``."""
        return self._llm

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        """One completion per prompt; ``params`` as declared in :func:`default_signature`."""
        options = {name: default for name, _, default in GENERATION_PARAMS}
        options.update({k: v for k, v in (params or {}).items() if k in options and v is not None})
        kwargs = {
            "max_tokens": int(options["max_tokens"]),
            "temperature": float(options["temperature"]),
            "top_p": float(options["top_p"]),
            "top_k": int(options["top_k"]),
            "repeat_penalty": float(options["repeat_penalty"]),
            "seed": int(options["seed"]),
        }
        chat = bool(options["chat"])
        outputs = []
        with self._lock:
            for prompt in _prompts(model_input):
                try:
                    if chat:
                        result = self._llm.create_chat_completion(
                            messages=[{"role": "user", "content": prompt}], **kwargs
                        )
                        outputs.append(result["choices"][0]["message"]["content"] or "")
                    else:
                        result = self._llm.create_completion(prompt, **kwargs)
                        outputs.append(result["choices"][0]["text"])
                except ValueError as exc:  # e.g. prompt longer than the context window
                    raise MlflowException.invalid_parameter_value(str(exc)) from exc
        return outputs


def _prompts(model_input: Any) -> list[str]:
    """Prompts from a DataFrame (``prompt`` or first column), a Series/array/list of str, a str or ``{"prompt": …}``."""
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] == 0:
            raise MlflowException.invalid_parameter_value("input DataFrame has no columns; expected 'prompt'")
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        values = []
        for value in model_input[column].tolist():  # MLflow turns {"prompt": [a, b]} into one cell holding a list
            if isinstance(value, np.ndarray):
                value = value.tolist()
            values.extend(value if isinstance(value, list) else [value])
    elif isinstance(model_input, dict):
        if "prompt" not in model_input:
            raise MlflowException.invalid_parameter_value("dict input needs a 'prompt' key")
        values = model_input["prompt"]
        values = [values] if isinstance(values, str) else list(values)
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, (list, tuple, pd.Series, np.ndarray)):
        values = [v["prompt"] if isinstance(v, dict) and "prompt" in v else v for v in np.ravel(model_input).tolist()]
    else:
        raise MlflowException.invalid_parameter_value(
            f"unsupported input type {type(model_input).__name__}; pass a DataFrame, list of str, str or dict"
        )
    if bad := [type(v).__name__ for v in values if not isinstance(v, str)]:
        raise MlflowException.invalid_parameter_value(f"prompts must be strings, got {bad[0]}")
    return values


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> _GGUFModelWrapper:
    """Called by ``mlflow.pyfunc.load_model`` with the path of ``model.gguf``; ``model_config`` may set ``n_ctx``."""
    flavor_conf = _get_flavor_configuration(model_path=str(Path(path).parent), flavor_name=FLAVOR_NAME)
    n_ctx = (model_config or {}).get("n_ctx") or flavor_conf["n_ctx"]
    return _GGUFModelWrapper(_llama(path, n_ctx))
