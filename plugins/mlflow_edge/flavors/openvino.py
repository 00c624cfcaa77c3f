"""The ``openvino`` MLflow flavor: a stateful causal-LM OpenVINO IR (with its tokenizer) as an MLflow Model.

The model directory holds a folder ``model/`` (the flavor config's ``data``) with the IR (``openvino_model.xml`` /
``.bin``, the ``model_files``) and the tokenizer and configs exported beside it, the loader code under ``code/`` and
MLflow's own ``MLmodel`` and environment files. The ``recipe.json`` of a mixed-precision IR is no part of the model
(:func:`mlflow_edge.flavors.log_artifact_model` logs it under the run's ``recipe/``). Two flavors are written:

``openvino``
    loads back as an optimum-intel ``OVModelForCausalLM`` (:func:`load_model`, needs ``optimum-intel``); its config
    records the folder, the model files and their sha256, the runtime settings (``device``, ``performance_hint``,
    ``inference_precision``, ``max_context``, ``threads``) and the OpenVINO version. Provenance (precision, source,
    NNCF options) is the caller's ``metadata``.
:py:mod:`mlflow.pyfunc`
    ``predict(prompts, params)`` returns one generated string per prompt, on the OpenVINO runtime alone (the
    :class:`~mlflow_edge.backends.openvino.OpenVINORunner` and the HF tokenizer), under the request contract of every
    mlflow-edge flavor (:data:`mlflow_edge.flavors._common.CONTRACT`) with its shared numpy sampler.
    ``model_config`` may set ``device``, ``performance_hint``, ``inference_precision``, ``max_context`` and
    ``threads`` (0: OpenVINO's default) at load time; the ``MLFLOW_EDGE_OPENVINO_DEVICE`` / ``_PERFORMANCE_HINT`` /
    ``_INFERENCE_PRECISION`` variables override both.

Example::

    import mlflow
    from mlflow_edge import flavors, workflow
    from mlflow_edge.flavors import openvino
    from mlflow_edge.sources import resolve_source

    artifact = workflow.convert(resolve_source("demo"), "openvino", "f16")
    with mlflow.start_run():
        info = flavors.log_artifact_model(artifact, name="model")  # this flavor, provenance in Model.metadata
    model = mlflow.pyfunc.load_model(info.model_uri)
    print(model.predict(["The capital of France is"], params={"max_tokens": 8}))
    ov_model = openvino.load_model(info.model_uri)  # an optimum.intel.OVModelForCausalLM
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from mlflow.models.model import ModelInfo

from mlflow_edge.backends.openvino import (
    MODEL_BIN,
    MODEL_XML,
    PERFORMANCE_HINTS,
    OpenVINOBackend,
    OpenVINORunner,
    companion_files,
    model_xml,
    require_openvino,
    runtime_from_env,
)
from mlflow_edge.errors import EdgeError, first_line
from mlflow_edge.flavors import _common

if TYPE_CHECKING:
    from optimum.intel import OVModelForCausalLM

FLAVOR_NAME = "openvino"
_MODEL_DIR = "model"
_MODEL_FILES = (MODEL_XML, MODEL_BIN)
_RUNTIME_KEYS = ("device", "performance_hint", "inference_precision", "max_context", "threads")


def get_default_pip_requirements() -> list[str]:
    """Pinned pip requirements of this flavor's models: the OpenVINO runtime, the HF tokenizer, the loader's imports."""
    return _common.pip_requirements(OpenVINOBackend.requirements)


def get_default_conda_env() -> dict[str, Any]:
    return _common.default_conda_env(get_default_pip_requirements())


def validate_ir(model_path: str | os.PathLike) -> Path:
    """The folder of a stateful causal-LM IR with a tokenizer beside it; :class:`EdgeError` otherwise."""
    xml = model_xml(Path(model_path))
    folder = xml.parent
    if not xml.is_file() or not (folder / MODEL_BIN).is_file():
        raise EdgeError(f"no OpenVINO IR ({MODEL_XML} and {MODEL_BIN}) at {model_path}")
    try:
        model = require_openvino().Core().read_model(str(xml))
    except Exception as exc:
        raise EdgeError(f"not a valid OpenVINO IR: {xml} ({first_line(exc)})") from exc
    names = {name for port in model.inputs for name in port.get_names()}
    if "input_ids" not in names or not model.get_sinks():
        raise EdgeError(f"{xml} is not a stateful causal-LM IR (optimum-intel text-generation-with-past)")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise EdgeError(f"no tokenizer beside {xml}")
    return folder


def save_model(model_path: str | os.PathLike, path: str | os.PathLike, *, max_context: int = 2048,
               device: str = "CPU", performance_hint: str = "LATENCY", inference_precision: str | None = None,
               threads: int = 0, **kwargs: Any) -> None:
    """Save the IR folder (or its ``.xml``) at ``model_path`` as an MLflow Model in the new (or empty) dir ``path``.

    ``max_context``, ``device``, ``performance_hint``, ``inference_precision`` (``None``: the device's own) and
    ``threads`` (0: OpenVINO's default) are the runtime settings pyfunc loads with, unless ``model_config`` overrides
    them; ``kwargs`` are MLflow's usual ``save_model`` arguments (:func:`mlflow_edge.flavors._common.save_model`).
    Raises :class:`~mlflow_edge.errors.EdgeError` for a corrupt IR or one without tokenizer, and ``MlflowException``
    for an invalid runtime setting or a ``path`` that is not empty (nothing is written).
    """
    openvino_version = require_openvino().__version__.split("-")[0]
    # every runtime key is saved (None: the device's own), so pyfunc's model_config may override each at load time
    runtime = {"inference_precision": None,
               **_runtime_config(max_context=max_context, device=device, performance_hint=performance_hint,
                                 inference_precision=inference_precision, threads=threads)}
    source_folder = validate_ir(model_path)

    def write_files(target: Path) -> dict[str, Any]:
        files = [source_folder / name for name in _MODEL_FILES] + companion_files(source_folder)
        conf = _common.copy_model_folder(target, _MODEL_DIR, files, _MODEL_FILES)
        return {**conf, "openvino_version": openvino_version, **runtime}

    _common.save_model(path, sys.modules[__name__], write_files, model_config=dict(runtime), **kwargs)


def _runtime_config(**settings: Any) -> dict[str, Any]:
    """Runtime settings, checked: ``max_context`` and ``threads`` integers, ``performance_hint`` known; ``device``
    upper case and ``inference_precision`` lower case, as OpenVINO names them."""
    return _common.runtime_settings(settings, performance_hint=_common.runtime_choice(PERFORMANCE_HINTS, str.upper),
                                    device=lambda _, value: str(value).upper(),
                                    inference_precision=lambda _, value: str(value).lower())


def log_model(model_path: str | os.PathLike, name: str | None = None, **kwargs: Any) -> ModelInfo:
    """Log the IR folder as an MLflow Model (in the active run, or a new one); returns its ``ModelInfo``.

    ``kwargs``: :func:`save_model`'s (runtime settings, MLflow's) and ``Model.log``'s
    (see :func:`mlflow_edge.flavors._common.log_model`).
    """
    return _common.log_model(sys.modules[__name__], name, model_path=model_path, **kwargs)


def _ov_properties(runtime: Mapping[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = {"PERFORMANCE_HINT": runtime.get("performance_hint", "LATENCY")}
    if runtime.get("inference_precision"):
        properties["INFERENCE_PRECISION_HINT"] = runtime["inference_precision"]
    if runtime.get("threads") and str(runtime.get("device", "CPU")).startswith("CPU"):
        properties["INFERENCE_NUM_THREADS"] = int(runtime["threads"])
    return properties


def load_model(model_uri: str, dst_path: str | None = None, device: str | None = None) -> OVModelForCausalLM:
    """The model at ``model_uri`` as an optimum-intel ``OVModelForCausalLM`` (``device`` overrides the saved one)."""
    from optimum.intel import OVModelForCausalLM

    local = _common.download_model(model_uri, dst_path)
    conf = _common.flavor_conf(local, FLAVOR_NAME)
    _common.check_model_files(local / conf["data"], conf.get("model_sha256"))
    runtime = {**{k: conf[k] for k in _RUNTIME_KEYS if k in conf}, **runtime_from_env()}
    if device is not None:
        runtime["device"] = device
    return OVModelForCausalLM.from_pretrained(local / conf["data"], device=runtime.get("device", "CPU"),
                                              ov_config=_ov_properties(runtime), compile=True)


def _eos_token_ids(folder: Path, tokenizer: Any) -> list[int]:
    """End-of-sequence ids from ``generation_config.json``, else the tokenizer's."""
    ids: Any = None
    config = folder / "generation_config.json"
    if config.is_file():
        ids = json.loads(config.read_text()).get("eos_token_id")
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, list) else [ids])]


def load_generator(path: str, model_config: dict[str, Any] | None = None) -> _common.LogitsModelWrapper:
    """The text generator of a saved model (what pyfunc and mlflow-edge's server run), from the path of ``model/``;
    ``model_config`` may set runtime settings."""
    from transformers import AutoTokenizer

    _common.refuse_undeclared_params(__name__)
    conf = _common.flavor_conf(Path(path).parent, FLAVOR_NAME)
    _common.check_model_files(path, conf.get("model_sha256"))
    # MLflow passes the saved config updated with the caller's model_config; the environment overrides both
    runtime = {k: conf[k] for k in _RUNTIME_KEYS if k in conf}
    runtime.update(_runtime_config(**{k: v for k, v in (model_config or {}).items() if k in _RUNTIME_KEYS}))
    runtime.update(runtime_from_env())
    runner = OpenVINORunner(
        Path(path), threads=int(runtime.get("threads", 0)), context_tokens=int(runtime.get("max_context", 2048)),
        device=runtime.get("device", "CPU"), performance_hint=runtime.get("performance_hint", "LATENCY"),
        inference_precision=runtime.get("inference_precision"),
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    return _common.LogitsModelWrapper(runner, tokenizer, _eos_token_ids(Path(path), tokenizer))


_load_pyfunc = load_generator
"""MLflow's pyfunc loader hook (``mlflow.pyfunc.load_model`` calls it)."""
