"""The ``gguf`` MLflow flavor: a llama.cpp GGUF file as an MLflow Model.

The model directory holds the GGUF file (``model.gguf``, the flavor config's ``data``) as its only model file, the
loader code under ``code/`` and MLflow's own ``MLmodel`` and environment files. Two flavors are written:

``gguf``
    loads back as a ``llama_cpp.Llama`` (:func:`load_model`); its config records the file, its sha256, ``n_ctx`` and
    the llama-cpp-python version. Provenance (precision, source, options) is the caller's ``metadata``.
:py:mod:`mlflow.pyfunc`
    ``predict(prompts, params)`` returns one generated string per prompt, under the request contract of every
    mlflow-edge flavor (:data:`mlflow_edge.flavors._common.CONTRACT`), mapped onto llama.cpp's own sampler
    (``create_completion``; ``repetition_penalty`` is llama.cpp's ``repeat_penalty`` over its last 64 tokens).
    ``model_config`` may set ``n_ctx`` at load time.

Example::

    import mlflow
    from mlflow_edge.flavors import gguf

    with mlflow.start_run():
        info = gguf.log_model("model.gguf", name="model", metadata={"mlflow_edge": {"precision": "Q4_K_M"}})
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
from typing import TYPE_CHECKING, Any

from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from mlflow.utils.environment import _mlflow_conda_env

from mlflow_edge import cache
from mlflow_edge.backends.llamacpp import LlamaCppBackend, require_llama_cpp
from mlflow_edge.errors import first_line
from mlflow_edge.flavors import _common

if TYPE_CHECKING:
    import llama_cpp

FLAVOR_NAME = "gguf"
_MODEL_FILE = "model.gguf"


def get_default_pip_requirements() -> list[str]:
    """Pinned pip requirements of this flavor's models: the llama.cpp runtime and what the loader imports."""
    return _common.pip_requirements(LlamaCppBackend.requirements)


def get_default_conda_env() -> dict[str, Any]:
    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())


def save_model(gguf_path: str | os.PathLike, path: str | os.PathLike, *, n_ctx: int = 2048, **kwargs: Any) -> None:
    """Save the GGUF file at ``gguf_path`` as an MLflow Model in the new (or empty) directory ``path``.

    ``n_ctx`` is the context size pyfunc loads with; ``kwargs`` are MLflow's usual ``save_model`` arguments
    (:func:`mlflow_edge.flavors._common.save_model`). Raises :class:`~mlflow_edge.errors.EdgeError` for a corrupt or
    truncated GGUF and ``MlflowException`` for a bad ``n_ctx`` or a ``path`` that is not empty (nothing is written).
    """
    from mlflow_edge.sources import validate_gguf

    llama_cpp_version = require_llama_cpp().__version__
    if int(n_ctx) <= 0:
        raise MlflowException.invalid_parameter_value(f"n_ctx must be positive, got {n_ctx}")
    gguf_path = Path(gguf_path)
    validate_gguf(gguf_path)  # reads the whole tensor table: a few seconds for 100 MB

    def write_files(model_dir: Path) -> dict[str, Any]:
        shutil.copyfile(gguf_path, model_dir / _MODEL_FILE)
        return {"data": _MODEL_FILE, "sha256": cache.sha256_file(model_dir / _MODEL_FILE), "n_ctx": int(n_ctx),
                "llama_cpp_python_version": llama_cpp_version}

    _common.save_model(path, sys.modules[__name__], write_files, model_config={"n_ctx": int(n_ctx)}, **kwargs)


def log_model(gguf_path: str | os.PathLike, name: str | None = None, *, n_ctx: int = 2048, **kwargs: Any) -> ModelInfo:
    """Log the GGUF file as an MLflow Model (in the active run, or a new one); returns its ``ModelInfo``.

    ``kwargs``: :func:`save_model`'s and ``Model.log``'s (see :func:`mlflow_edge.flavors._common.log_model`).
    """
    return _common.log_model(sys.modules[__name__], name, gguf_path=gguf_path, n_ctx=n_ctx, **kwargs)


def _llama(model_file: str | os.PathLike, n_ctx: int) -> llama_cpp.Llama:
    return require_llama_cpp().Llama(model_path=str(model_file), n_ctx=int(n_ctx), verbose=False)


def load_model(model_uri: str, dst_path: str | None = None, n_ctx: int | None = None) -> llama_cpp.Llama:
    """The model at ``model_uri`` as a ``llama_cpp.Llama`` (``n_ctx`` overrides the saved context size)."""
    local = _common.download_model(model_uri, dst_path)
    conf = _common.flavor_conf(local, FLAVOR_NAME)
    return _llama(local / conf["data"], n_ctx if n_ctx is not None else conf["n_ctx"])


class _GGUFModelWrapper:
    """The pyfunc face of a GGUF model: prompts in, one generated string per prompt out."""

    def __init__(self, llm: llama_cpp.Llama) -> None:
        self._llm = llm
        self._lock = threading.Lock()  # a Llama is not thread-safe; servers may call predict concurrently

    def get_raw_model(self) -> llama_cpp.Llama:
        """The underlying ``llama_cpp.Llama``."""
        return self._llm

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        """One completion per prompt; ``params`` as :data:`~mlflow_edge.flavors._common.CONTRACT` declares."""
        request = _common.parse_request(params, self._llm.n_ctx())
        texts = _common.prompts(model_input)
        with self._lock:
            return [self._complete(prompt, request) for prompt in texts]

    def _complete(self, prompt: str, request: _common.Request) -> str:
        kwargs = {
            "max_tokens": request.max_tokens, "temperature": request.temperature, "top_p": request.top_p,
            "top_k": request.top_k, "stop": list(request.stop), "seed": request.seed,
            "repeat_penalty": request.repetition_penalty,
            "min_p": 0.0, "typical_p": 1.0,  # llama-cpp-python's own defaults would add samplers the contract lacks
        }
        try:
            if request.chat:
                result = self._llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], **kwargs)
                return result["choices"][0]["message"]["content"] or ""
            return self._llm.create_completion(prompt, **kwargs)["choices"][0]["text"]
        except ValueError as exc:  # e.g. a prompt longer than the context window
            raise MlflowException.invalid_parameter_value(first_line(exc)) from exc


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> _GGUFModelWrapper:
    """Called by ``mlflow.pyfunc.load_model`` with the path of ``model.gguf``; ``model_config`` may set ``n_ctx``."""
    _common.refuse_undeclared_params(__name__)
    conf = _common.flavor_conf(Path(path).parent, FLAVOR_NAME)
    n_ctx = (model_config or {}).get("n_ctx") or conf["n_ctx"]
    return _GGUFModelWrapper(_llama(path, n_ctx))
