"""The ``onnx`` format's MLflow flavor: an ONNX Runtime GenAI model folder (``model.onnx`` + external data,
``genai_config.json``, tokenizer) as an MLflow Model.

The model directory holds a folder ``model/`` (the flavor config's ``data``) with the model files (the
``model_files``) and the GenAI config, tokenizer and chat template beside them, the loader code under ``code/`` and
MLflow's own ``MLmodel`` and environment files. Two flavors are written:

``onnxruntime_genai``
    (not ``onnx``: that is MLflow's built-in flavor for a single ``.onnx`` file, which this folder is not) loads back
    as an ``onnxruntime_genai.Model`` (:func:`load_model`); its config records the folder, the model files and their
    sha256, the runtime settings (``execution_provider``, ``max_context``, ``threads``) and the ONNX Runtime GenAI
    version. Provenance (precision, source, quantization options) is the caller's ``metadata``.
:py:mod:`mlflow.pyfunc`
    ``predict(prompts, params)`` returns one generated string per prompt, on ONNX Runtime GenAI alone (the
    :class:`~mlflow_edge.backends.onnxruntime.ONNXRuntimeGenAIRunner` and the GenAI tokenizer of the folder, which
    gives the source tokenizer's ids), under the request contract of every mlflow-edge flavor
    (:data:`mlflow_edge.flavors._common.CONTRACT`) with its shared numpy sampler. ``model_config`` may set
    ``execution_provider``, ``max_context`` and ``threads`` (0: ONNX Runtime's default) at load time;
    ``MLFLOW_EDGE_ONNXRUNTIME_EXECUTION_PROVIDER`` overrides both.

Example::

    import mlflow
    from mlflow_edge import artifacts, flavors
    from mlflow_edge.flavors import onnx
    from mlflow_edge.sources import resolve_source

    source = resolve_source("demo")
    artifact = artifacts.quantize(source, artifacts.convert(source, "onnxruntime"), "int4_rtn")
    with mlflow.start_run():
        info = flavors.log_artifact_model(artifact, name="model")  # this flavor, provenance in Model.metadata
    model = mlflow.pyfunc.load_model(info.model_uri)
    print(model.predict(["The capital of France is"], params={"max_tokens": 8}))
    genai_model = onnx.load_model(info.model_uri)  # an onnxruntime_genai.Model
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo

from mlflow_edge.backends.onnxruntime import (
    EXECUTION_PROVIDERS,
    QUANTIZATION_RECORD,
    ONNXRuntimeBackend,
    ONNXRuntimeGenAIRunner,
    companion_files,
    genai_config,
    genai_model,
    model_folder,
    read_graph,
    require_genai,
    runtime_from_env,
)
from mlflow_edge.errors import EdgeError
from mlflow_edge.flavors import _common

FLAVOR_NAME = "onnxruntime_genai"
_MODEL_DIR = "model"
_RUNTIME_KEYS = ("execution_provider", "max_context", "threads")
_DEFAULT_CONTEXT = 2048


def get_default_pip_requirements() -> list[str]:
    """Pinned pip requirements of this flavor's models: ONNX Runtime GenAI (and its tokenizer), onnx, the loader's
    imports."""
    return _common.pip_requirements(ONNXRuntimeBackend.requirements)


def get_default_conda_env() -> dict[str, Any]:
    return _common.default_conda_env(get_default_pip_requirements())


def validate_model_folder(model_path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """The GenAI model folder at ``model_path`` (the folder or its ``.onnx``) and its model files, with a tokenizer
    beside them; :class:`EdgeError` otherwise."""
    folder = model_folder(Path(model_path))
    if folder is None:
        raise EdgeError(f"no ONNX Runtime GenAI model folder (genai_config.json and model.onnx) at {model_path}")
    _, files = read_graph(folder)  # a corrupt graph, missing or truncated external data: one line
    if not (folder / "tokenizer.json").is_file():
        raise EdgeError(f"no tokenizer.json beside {files[0]}")
    return folder, files


def save_model(model_path: str | os.PathLike, path: str | os.PathLike, *, max_context: int | None = None,
               execution_provider: str = "cpu", threads: int = 0, **kwargs: Any) -> None:
    """Save the GenAI model folder at ``model_path`` as an MLflow Model in the new (or empty) dir ``path``.

    ``max_context`` (default: the model's context length, at most 2048 tokens; the KV cache is allocated for it),
    ``execution_provider`` (``cpu``, ``cuda``, ``dml``; checked when the model loads) and ``threads`` (0: ONNX
    Runtime's default) are the runtime settings pyfunc loads with, unless ``model_config`` overrides them; ``kwargs``
    are MLflow's usual ``save_model`` arguments (:func:`mlflow_edge.flavors._common.save_model`). Raises
    :class:`~mlflow_edge.errors.EdgeError` for a corrupt model folder or one without tokenizer, and
    ``MlflowException`` for an invalid runtime setting or a ``path`` that is not empty (nothing is written).
    """
    folder, files = validate_model_folder(model_path)
    limit = int(genai_config(folder)["model"].get("context_length") or _DEFAULT_CONTEXT)
    default_context = min(limit, _DEFAULT_CONTEXT)
    runtime = _runtime_config(max_context=default_context if max_context is None else max_context,
                              execution_provider=execution_provider, threads=threads)
    if runtime["max_context"] > limit:
        raise MlflowException.invalid_parameter_value(
            f"max_context {runtime['max_context']} exceeds the model's context length of {limit}")
    genai_version = require_genai().__version__
    extra = [folder / QUANTIZATION_RECORD] if (folder / QUANTIZATION_RECORD).is_file() else []

    def write_files(target: Path) -> dict[str, Any]:
        conf = _common.copy_model_folder(target, _MODEL_DIR, [*files, *companion_files(folder), *extra],
                                         [file.name for file in files])
        return {**conf, "onnxruntime_genai_version": genai_version, **runtime}

    _common.save_model(path, sys.modules[__name__], write_files, model_config=dict(runtime), **kwargs)


def _runtime_config(**settings: Any) -> dict[str, Any]:
    """Runtime settings, checked: ``max_context`` and ``threads`` integers, ``execution_provider`` known."""
    return _common.runtime_settings(settings, execution_provider=_common.runtime_choice(
        EXECUTION_PROVIDERS, lambda text: text.strip().lower()))


def log_model(model_path: str | os.PathLike, name: str | None = None, **kwargs: Any) -> ModelInfo:
    """Log the GenAI model folder as an MLflow Model (in the active run, or a new one); returns its ``ModelInfo``.

    ``kwargs``: :func:`save_model`'s (runtime settings, MLflow's) and ``Model.log``'s
    (see :func:`mlflow_edge.flavors._common.log_model`).
    """
    return _common.log_model(sys.modules[__name__], name, model_path=model_path, **kwargs)


def load_model(model_uri: str, dst_path: str | None = None, execution_provider: str | None = None) -> Any:
    """The model at ``model_uri`` as an ``onnxruntime_genai.Model`` (``execution_provider`` overrides the saved one
    and the environment); use it with ``onnxruntime_genai.Tokenizer`` and ``Generator``."""
    local = _common.download_model(model_uri, dst_path)
    conf = _common.flavor_conf(local, FLAVOR_NAME)
    _common.check_model_files(local / conf["data"], conf.get("model_sha256"))
    runtime = {**{k: conf[k] for k in _RUNTIME_KEYS if k in conf}, **runtime_from_env()}
    if execution_provider is not None:
        runtime["execution_provider"] = execution_provider
    folder, _ = validate_model_folder(local / conf["data"])
    return genai_model(folder, int(runtime.get("threads", 0)), runtime.get("execution_provider", "cpu"))


class _ONNXModelWrapper(_common.LogitsModelWrapper):
    """The pyfunc face of an ONNX Runtime GenAI model: the shared logits loop on the GenAI runner, with the GenAI
    tokenizer and the chat template of the model folder."""

    def __init__(self, runner: ONNXRuntimeGenAIRunner, tokenizer: Any, eos_token_ids: Sequence[int],
                 folder: Path) -> None:
        super().__init__(runner, tokenizer, eos_token_ids)
        self._folder = folder
        self._tokenizer_config = _tokenizer_config(folder)

    def get_raw_model(self) -> ONNXRuntimeGenAIRunner:
        """The underlying :class:`~mlflow_edge.backends.onnxruntime.ONNXRuntimeGenAIRunner`."""
        return self._runner

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return [int(i) for i in self._tokenizer.encode(text)] if text else []  # GenAI adds what the model needs

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(np.asarray(ids, dtype=np.int32)) if ids else ""

    @property
    def chat_template(self) -> str | None:
        template = self._tokenizer_config.get("chat_template")
        path = self._folder / "chat_template.jinja"
        if not isinstance(template, str) and path.is_file():
            template = path.read_text(encoding="utf-8")
        return template if isinstance(template, str) else None

    @property
    def special_tokens(self) -> dict[str, str]:
        tokens = {}
        for name in ("bos_token", "eos_token"):
            value = self._tokenizer_config.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                tokens[name] = value
        return tokens


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise EdgeError(f"cannot read {path}: {str(exc).splitlines()[0]}") from exc
    return config if isinstance(config, dict) else {}


def load_generator(path: str, model_config: dict[str, Any] | None = None) -> _ONNXModelWrapper:
    """The text generator of a saved model (what pyfunc and mlflow-edge's server run), from the path of ``model/``;
    ``model_config`` may set runtime settings."""
    og = require_genai()
    _common.refuse_undeclared_params(__name__)
    conf = _common.flavor_conf(Path(path).parent, FLAVOR_NAME)
    _common.check_model_files(path, conf.get("model_sha256"))
    # MLflow passes the saved config updated with the caller's model_config; the environment overrides both
    runtime = {k: conf[k] for k in _RUNTIME_KEYS if k in conf}
    runtime.update(_runtime_config(**{k: v for k, v in (model_config or {}).items() if k in _RUNTIME_KEYS}))
    runtime.update(runtime_from_env())
    runner = ONNXRuntimeGenAIRunner(Path(path), threads=int(runtime.get("threads", 0)),
                                    context_tokens=int(runtime.get("max_context", _DEFAULT_CONTEXT)),
                                    execution_provider=runtime.get("execution_provider", "cpu"))
    tokenizer = og.Tokenizer(runner.genai_model)
    return _ONNXModelWrapper(runner, tokenizer, list(tokenizer.eos_token_ids), Path(path))


_load_pyfunc = load_generator
"""MLflow's pyfunc loader hook (``mlflow.pyfunc.load_model`` calls it)."""
