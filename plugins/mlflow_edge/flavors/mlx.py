"""The ``mlx`` MLflow flavor: an mlx-lm model folder (MLX safetensors, config, tokenizer) as an MLflow Model.

The model directory holds a folder ``model/`` (the flavor config's ``data``) with the MLX folder as mlx-lm saved it
(``model*.safetensors``, ``config.json``, the tokenizer files) and, when the model carries one, an mlx-lm LoRA adapter
under ``model/adapters/`` (``adapters.safetensors`` + ``adapter_config.json``) that is applied at load; the loader code
under ``code/`` and MLflow's own ``MLmodel`` and environment files. Two flavors are written:

``mlx``
    loads back as mlx-lm's own pair ``(model, tokenizer)`` (:func:`load_model`, what ``mlx_lm.load`` returns, with the
    adapter applied); its config records the folder, the model files and their sha256, ``max_context``, the adapter
    and the mlx/mlx-lm versions. Provenance (precision, source, options) is the caller's ``metadata``.
:py:mod:`mlflow.pyfunc`
    ``predict(prompts, params)`` returns one generated string per prompt, on MLX (the
    :class:`~mlflow_edge.backends.mlx.MLXRunner` and mlx-lm's tokenizer), under the request contract of every
    mlflow-edge flavor (:data:`mlflow_edge.flavors._common.CONTRACT`) with its shared numpy sampler.
    ``model_config`` may set ``max_context`` at load time. MLX has no thread setting.

Example::

    import mlflow
    from mlflow_edge import artifacts, flavors
    from mlflow_edge.backends.mlx import MLXBackend
    from mlflow_edge.flavors import mlx
    from mlflow_edge.sources import resolve_source

    source = resolve_source("demo")
    q4 = MLXBackend().quantize(artifacts.convert(source, "mlx"), Path("q4"), "q4_g64")
    with mlflow.start_run():
        info = flavors.log_artifact_model(q4, name="model")  # this flavor, provenance in Model.metadata
        tuned = mlx.log_model(q4.path, name="tuned", adapter_path="adapters")  # a LoRA adapter applied at load
    model = mlflow.pyfunc.load_model(info.model_uri)
    print(model.predict(["The capital of France is"], params={"max_tokens": 8}))
    mlx_model, tokenizer = mlx.load_model(info.model_uri)  # as mlx_lm.load returns them
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo

from mlflow_edge.backends.mlx import (
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    MLXBackend,
    MLXRunner,
    check_adapter,
    check_folder,
    model_files,
    require_mlx_lm,
)
from mlflow_edge.errors import EdgeError
from mlflow_edge.flavors import _common

FLAVOR_NAME = "mlx"
_MODEL_DIR = "model"
_NOT_COPIED = frozenset({"artifact.json", "key.json"})  # the cache's own records
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def get_default_pip_requirements() -> list[str]:
    """Pinned pip requirements of this flavor's models: mlx, its backend library, mlx-lm, the loader's imports."""
    return _common.pip_requirements(MLXBackend.requirements)


def get_default_conda_env() -> dict[str, Any]:
    return _common.default_conda_env(get_default_pip_requirements())


def validate_folder(model_path: str | os.PathLike, adapter_path: str | os.PathLike | None = None) -> Path:
    """The MLX folder at ``model_path``, checked (weights whole, tokenizer present, adapter matching)."""
    folder = Path(model_path)
    check_folder(folder)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise EdgeError(f"no tokenizer in {folder}")
    if adapter_path is not None:
        if (folder / ADAPTER_DIR).exists():
            raise EdgeError(f"{folder} already carries an adapter ({ADAPTER_DIR}/); log it without adapter_path")
        check_adapter(Path(adapter_path), folder)
    elif (folder / ADAPTER_DIR).exists():
        check_adapter(folder / ADAPTER_DIR, folder)
    return folder


def _copy_folder(folder: Path, target: Path, adapter_path: Path | None) -> None:
    target.mkdir()
    for item in sorted(folder.iterdir()):
        if item.is_file() and not item.name.startswith(".") and item.name not in _NOT_COPIED:
            shutil.copyfile(item, target / item.name)
    adapter = adapter_path or (folder / ADAPTER_DIR if (folder / ADAPTER_DIR).is_dir() else None)
    if adapter is not None:
        (target / ADAPTER_DIR).mkdir()
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            shutil.copyfile(Path(adapter) / name, target / ADAPTER_DIR / name)


def save_model(model_path: str | os.PathLike, path: str | os.PathLike, *, max_context: int = 2048,
               adapter_path: str | os.PathLike | None = None, **kwargs: Any) -> None:
    """Save the MLX folder at ``model_path`` as an MLflow Model in the new (or empty) directory ``path``.

    ``max_context`` is the context size pyfunc loads with (``model_config`` may override it); ``adapter_path`` an
    mlx-lm LoRA adapter folder logged with the model and applied at load. ``kwargs`` are MLflow's usual ``save_model``
    arguments (:func:`mlflow_edge.flavors._common.save_model`). Raises :class:`~mlflow_edge.errors.EdgeError` for a
    corrupt folder or an adapter that does not match the model, and ``MlflowException`` for a bad ``max_context`` or
    a ``path`` that is not empty (nothing is written).
    """
    require_mlx_lm()
    if int(max_context) <= 0:
        raise MlflowException.invalid_parameter_value(f"max_context must be positive, got {max_context}")
    folder = validate_folder(model_path, adapter_path)
    versions = {"mlx_version": version("mlx"), "mlx_lm_version": version("mlx-lm")}

    def write_files(target: Path) -> dict[str, Any]:
        model_dir = target / _MODEL_DIR
        _copy_folder(folder, model_dir, Path(adapter_path) if adapter_path is not None else None)
        files = [str(file.relative_to(model_dir)) for file in model_files(model_dir)]
        return {**_common.folder_conf(model_dir, _MODEL_DIR, files),
                "adapter": ADAPTER_DIR if (model_dir / ADAPTER_DIR).is_dir() else None,
                "max_context": int(max_context), **versions}

    _common.save_model(path, sys.modules[__name__], write_files, model_config={"max_context": int(max_context)},
                       **kwargs)


def log_model(model_path: str | os.PathLike, name: str | None = None, **kwargs: Any) -> ModelInfo:
    """Log the MLX folder as an MLflow Model (in the active run, or a new one); returns its ``ModelInfo``.

    ``kwargs``: :func:`save_model`'s (``max_context``, ``adapter_path``, MLflow's) and ``Model.log``'s
    (see :func:`mlflow_edge.flavors._common.log_model`).
    """
    return _common.log_model(sys.modules[__name__], name, model_path=model_path, **kwargs)


def load_model(model_uri: str, dst_path: str | None = None) -> tuple[Any, Any]:
    """The model at ``model_uri`` as mlx-lm's ``(model, tokenizer)``, its adapter applied (``mlx_lm.load``)."""
    from mlx_lm import load

    local = _common.download_model(model_uri, dst_path)
    conf = _common.flavor_conf(local, FLAVOR_NAME)
    _common.check_model_files(local / conf["data"], conf.get("model_sha256"))
    folder = validate_folder(local / conf["data"])
    adapter = folder / conf["adapter"] if conf.get("adapter") else None
    return load(str(folder), adapter_path=str(adapter) if adapter else None)


def load_generator(path: str, model_config: dict[str, Any] | None = None) -> _common.LogitsModelWrapper:
    """The text generator of a saved model (what pyfunc and mlflow-edge's server run), from the path of ``model/``;
    ``model_config`` may set ``max_context``."""
    from mlx_lm.utils import load_config, load_tokenizer

    _common.refuse_undeclared_params(__name__)
    conf = _common.flavor_conf(Path(path).parent, FLAVOR_NAME)
    _common.check_model_files(path, conf.get("model_sha256"))
    # MLflow passes the saved config updated with the caller's model_config
    max_context = int((model_config or {}).get("max_context", conf.get("max_context", 2048)))
    if max_context <= 0:
        raise MlflowException.invalid_parameter_value(f"max_context must be positive, got {max_context}")
    folder = Path(path)
    runner = MLXRunner(folder, threads=0, context_tokens=max_context)  # applies model/adapters/ when present
    # mlx-lm's tokenizer, with the end-of-sequence ids mlx-lm reads (generation_config.json first, then config.json)
    tokenizer = load_tokenizer(folder, eos_token_ids=load_config(folder).get("eos_token_id"))
    return _common.LogitsModelWrapper(runner, tokenizer, tokenizer.eos_token_ids)


_load_pyfunc = load_generator
"""MLflow's pyfunc loader hook (``mlflow.pyfunc.load_model`` calls it)."""
