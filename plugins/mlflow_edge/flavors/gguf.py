"""The ``gguf`` MLflow flavor: a llama.cpp GGUF file as an MLflow Model.

The model directory holds the GGUF file (``model.gguf``, the flavor config's ``data``) as its only model file, the
loader code under ``code/`` and MLflow's own ``MLmodel`` and environment files. Two flavors are written:

``gguf``
    loads back as a ``llama_cpp.Llama`` (:func:`load_model`); its config records the file, its sha256, ``n_ctx`` and
    the llama-cpp-python version. Provenance (precision, source, options) is the caller's ``metadata``.
:py:mod:`mlflow.pyfunc`
    ``predict(prompts, params)`` returns one generated string per prompt, under the request contract of every
    mlflow-edge flavor (:data:`mlflow_edge.flavors._common.CONTRACT`), mapped onto llama.cpp's own sampler
    (``Llama.generate``; ``repetition_penalty`` is llama.cpp's ``repeat_penalty`` over its last 64 tokens); chat
    prompts use the GGUF's own chat template, rendered in a Jinja sandbox.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo

from mlflow_edge import cache
from mlflow_edge.backends.llamacpp import LlamaCppBackend, require_llama_cpp
from mlflow_edge.flavors import _common

if TYPE_CHECKING:
    import llama_cpp

FLAVOR_NAME = "gguf"
_MODEL_FILE = "model.gguf"


def get_default_pip_requirements() -> list[str]:
    """Pinned pip requirements of this flavor's models: the llama.cpp runtime and what the loader imports."""
    return _common.pip_requirements(LlamaCppBackend.requirements)


def get_default_conda_env() -> dict[str, Any]:
    return _common.default_conda_env(get_default_pip_requirements())


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
    _common.check_model_files(local, _recorded(conf))
    return _llama(local / conf["data"], n_ctx if n_ctx is not None else conf["n_ctx"])


def _recorded(conf: dict[str, Any]) -> dict[str, str]:
    """The model file and the sha256 its flavor config recorded (none for a model saved before hashes were)."""
    return {conf["data"]: conf["sha256"]} if conf.get("sha256") else {}


class _GGUFModelWrapper(_common.TextGenerator):
    """The pyfunc face of a GGUF model: the shared generation loop on llama.cpp's own tokenizer and sampler, and the
    chat template the GGUF file carries."""

    def __init__(self, llm: llama_cpp.Llama) -> None:
        super().__init__()
        self._llm = llm
        self.eos_token_ids = frozenset(_end_of_generation_ids(llm))

    def get_raw_model(self) -> llama_cpp.Llama:
        """The underlying ``llama_cpp.Llama``."""
        return self._llm

    @property
    def context_tokens(self) -> int:
        return self._llm.n_ctx()

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)

    def decode(self, ids: list[int]) -> str:
        return self._llm.detokenize(ids).decode("utf-8", errors="replace")

    def sample(self, ids: list[int], request: _common.Request) -> Iterator[int]:
        """llama.cpp's sampler under the contract (``repetition_penalty`` is its ``repeat_penalty`` over the last 64
        tokens); ``min_p`` and ``typical_p`` off, since llama-cpp-python's defaults would add samplers the contract
        lacks."""
        self._llm.set_seed(request.seed)
        return self._llm.generate(ids, top_k=request.top_k, top_p=request.top_p, min_p=0.0, typical_p=1.0,
                                  temp=request.temperature, repeat_penalty=request.repetition_penalty, reset=True)

    @property
    def chat_template(self) -> str | None:
        template = self._llm.metadata.get("tokenizer.chat_template")
        return template if isinstance(template, str) else None

    @property
    def special_tokens(self) -> dict[str, str]:
        tokens = {"bos_token": self._llm.token_bos(), "eos_token": self._llm.token_eos()}
        return {name: self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")
                for name, token in tokens.items() if token >= 0}


def _end_of_generation_ids(llm: llama_cpp.Llama) -> set[int]:
    """The end-of-sequence and end-of-turn ids the GGUF declares."""
    ids = {llm.token_eos()}
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = llm.metadata.get(key)
        if value is not None and str(value).lstrip("-").isdigit():
            ids.add(int(value))
    return {i for i in ids if i >= 0}


def load_generator(path: str, model_config: dict[str, Any] | None = None) -> _GGUFModelWrapper:
    """The text generator of a saved model (what pyfunc and mlflow-edge's server run), from the path of ``model.gguf``;
    ``model_config`` may set ``n_ctx``."""
    _common.refuse_undeclared_params(__name__)
    conf = _common.flavor_conf(Path(path).parent, FLAVOR_NAME)
    _common.check_model_files(Path(path).parent, _recorded(conf))
    n_ctx = (model_config or {}).get("n_ctx") or conf["n_ctx"]
    return _GGUFModelWrapper(_llama(path, n_ctx))


_load_pyfunc = load_generator
"""MLflow's pyfunc loader hook (``mlflow.pyfunc.load_model`` calls it)."""
