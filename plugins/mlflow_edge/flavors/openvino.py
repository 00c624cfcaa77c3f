"""The ``openvino`` MLflow flavor: a stateful causal-LM OpenVINO IR (with its tokenizer) as an MLflow Model.

The model directory holds a folder ``model/`` with the IR (``openvino_model.xml``/``.bin``, the model files) and the
tokenizer and configs exported beside it, next to MLflow's own ``MLmodel`` and environment files. Two flavors are
written:

``openvino``
    loads back as an optimum-intel ``OVModelForCausalLM`` (:func:`load_model`, needs ``optimum-intel``); its config
    records the folder, the model files and their sha256, the runtime settings (``device``, ``performance_hint``,
    ``inference_precision``, ``max_context``), the OpenVINO version and whatever the caller passes in
    ``metadata_config`` (precision, source, NNCF options).
:py:mod:`mlflow.pyfunc`
    ``predict(prompts, params)`` returns one generated string per prompt, on the OpenVINO runtime alone (the
    :class:`~mlflow_edge.backends.openvino.OpenVINORunner` and the HF tokenizer), so ``mlflow models serve`` and
    ``mlflow.pyfunc.load_model`` work unchanged. Generation params (``max_new_tokens``, ``temperature``, ``top_p``,
    ``top_k``, ``repetition_penalty``, ``seed``, ``chat``, ``ignore_eos``) are declared in the default signature;
    ``temperature=0`` is greedy. ``model_config`` may set ``device``, ``performance_hint``,
    ``inference_precision``, ``max_context`` and ``threads`` (0: OpenVINO's default) at load time; the
    ``MLFLOW_EDGE_OPENVINO_DEVICE`` / ``_PERFORMANCE_HINT`` / ``_INFERENCE_PRECISION`` variables override both.

Example::

    import mlflow
    from mlflow_edge import workflow
    from mlflow_edge.flavors import openvino
    from mlflow_edge.sources import resolve_source

    artifact = workflow.convert(resolve_source("demo"), "openvino", "f16")
    with mlflow.start_run():
        info = openvino.log_model(artifact.path, name="model", metadata_config={"precision": artifact.precision})
    model = mlflow.pyfunc.load_model(info.model_uri)
    print(model.predict(["The capital of France is"], params={"max_new_tokens": 8}))
    ov_model = openvino.load_model(info.model_uri)  # an optimum.intel.OVModelForCausalLM
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

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
from mlflow_edge.backends.base import EdgeError
from mlflow_edge.flavors._common import normalize_metadata_config, write_environment
from mlflow_edge.backends.openvino import (
    MODEL_BIN,
    MODEL_XML,
    PERFORMANCE_HINTS,
    OpenVINORunner,
    companion_files,
    model_xml,
    require_openvino,
    runtime_from_env,
)
from mlflow_edge.flavors.gguf import _prompts  # the same prompt input forms as the gguf flavor

if TYPE_CHECKING:
    from optimum.intel import OVModelForCausalLM

FLAVOR_NAME = "openvino"
_MODEL_DIR = "model"
_MODEL_FILES = (MODEL_XML, MODEL_BIN)
_RUNTIME_KEYS = ("device", "performance_hint", "inference_precision", "max_context", "threads")
_RESERVED_KEYS = frozenset({"model_dir", "model_files", "model_sha256", "openvino_version", "code", *_RUNTIME_KEYS})

# name, MLflow param type, default: the single source of the params schema and of predict's defaults
GENERATION_PARAMS: tuple[tuple[str, str, Any], ...] = (
    ("max_new_tokens", "long", 64),
    ("temperature", "double", 0.0),
    ("top_p", "double", 1.0),
    ("top_k", "long", 50),
    ("repetition_penalty", "double", 1.0),
    ("seed", "long", 0),
    ("chat", "boolean", False),
    ("ignore_eos", "boolean", False),
)


def get_default_pip_requirements() -> list[str]:
    """Pinned pip requirements every model of this flavor needs: openvino, transformers (tokenizer), mlflow-edge."""
    return [
        _get_pinned_requirement("openvino"),
        _get_pinned_requirement("transformers"),
        _get_pinned_requirement("mlflow-edge", module="mlflow_edge"),
    ]


def get_default_conda_env() -> dict[str, Any]:
    """The default conda environment for models of this flavor."""
    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())


def default_signature() -> ModelSignature:
    """One string column (the prompts) in, one string per prompt out, and the generation params with defaults.

    The input column is unnamed for the reason :func:`mlflow_edge.flavors.gguf.default_signature` gives.
    """
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec(name, dtype, default) for name, dtype, default in GENERATION_PARAMS]),
    )


def validate_ir(model_path: str | os.PathLike) -> Path:
    """The folder of a stateful causal-LM IR with a tokenizer beside it; :class:`EdgeError` otherwise."""
    xml = model_xml(Path(model_path))
    folder = xml.parent
    if not xml.is_file() or not (folder / MODEL_BIN).is_file():
        raise EdgeError(f"no OpenVINO IR ({MODEL_XML} and {MODEL_BIN}) at {model_path}")
    try:
        model = require_openvino().Core().read_model(str(xml))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgeError(f"not a valid OpenVINO IR: {xml} ({reason[:300]})") from exc
    names = {name for port in model.inputs for name in port.get_names()}
    if "input_ids" not in names or not model.get_sinks():
        raise EdgeError(f"{xml} is not a stateful causal-LM IR (optimum-intel text-generation-with-past)")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise EdgeError(f"no tokenizer beside {xml}")
    return folder


def save_model(
    model_path: str | os.PathLike,
    path: str | os.PathLike,
    *,
    metadata_config: Mapping[str, Any] | None = None,
    max_context: int = 2048,
    device: str = "CPU",
    performance_hint: str = "LATENCY",
    inference_precision: str | None = None,
    threads: int = 0,
    conda_env: dict | str | None = None,
    code_paths: list[str] | None = None,
    mlflow_model: Model | None = None,
    signature: ModelSignature | None = None,
    input_example: ModelInputExample | None = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Save the IR folder (or its ``.xml``) at ``model_path`` as an MLflow Model in the new (or empty) dir ``path``.

    ``max_context``, ``device``, ``performance_hint``, ``inference_precision`` (``None``: the device's own) and
    ``threads`` (0: OpenVINO's default) are the runtime settings pyfunc loads with, unless ``model_config`` overrides
    them.
    Raises :class:`~mlflow_edge.backends.base.EdgeError` for a corrupt IR or one without tokenizer (nothing is
    written), and ``MlflowException`` when ``path`` exists and is not empty, a runtime setting is invalid or
    ``metadata_config`` is not JSON-serializable.
    """
    openvino_version = require_openvino().__version__.split("-")[0]
    flavor_extra = normalize_metadata_config(metadata_config, _RESERVED_KEYS)
    # every runtime key is saved (None: the device's own), so pyfunc's model_config may override each at load time
    runtime = {"inference_precision": None,
               **_runtime_config(max_context=max_context, device=device, performance_hint=performance_hint,
                                 inference_precision=inference_precision, threads=threads)}
    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    source_folder = validate_ir(model_path)

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

        model_dir = Path(path, _MODEL_DIR)
        model_dir.mkdir()
        for file in [source_folder / name for name in _MODEL_FILES] + companion_files(source_folder):
            shutil.copyfile(file, model_dir / file.name)
        pyfunc.add_to_model(
            mlflow_model,
            loader_module=__name__,
            data=_MODEL_DIR,
            conda_env=_CONDA_ENV_FILE_NAME,
            python_env=_PYTHON_ENV_FILE_NAME,
            code=code_dir_subpath,
            model_config=dict(runtime),
        )
        mlflow_model.add_flavor(
            FLAVOR_NAME,
            model_dir=_MODEL_DIR,
            model_files=list(_MODEL_FILES),
            model_sha256={name: cache.sha256_file(model_dir / name) for name in _MODEL_FILES},
            openvino_version=openvino_version,
            code=code_dir_subpath,
            **runtime,
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


def _runtime_config(**settings: Any) -> dict[str, Any]:
    """Runtime settings, checked: ``max_context`` and ``threads`` integers, ``performance_hint`` known."""
    config: dict[str, Any] = {}
    for key, value in settings.items():
        if value is None:
            continue
        if key in ("max_context", "threads"):
            config[key] = int(value)
            if config[key] < (1 if key == "max_context" else 0):
                raise MlflowException.invalid_parameter_value(f"{key} must be positive, got {value}")
        elif key == "performance_hint":
            config[key] = str(value).upper()
            if config[key] not in PERFORMANCE_HINTS:
                raise MlflowException.invalid_parameter_value(
                    f"performance_hint must be one of {', '.join(PERFORMANCE_HINTS)}, got {value}")
        elif key == "device":
            config[key] = str(value).upper()
        else:
            config[key] = str(value).lower()
    return config


def log_model(
    model_path: str | os.PathLike,
    name: str | None = None,
    *,
    artifact_path: str | None = None,
    metadata_config: Mapping[str, Any] | None = None,
    max_context: int = 2048,
    device: str = "CPU",
    performance_hint: str = "LATENCY",
    inference_precision: str | None = None,
    threads: int = 0,
    registered_model_name: str | None = None,
    signature: ModelSignature | None = None,
    input_example: ModelInputExample | None = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
    await_registration_for: int = DEFAULT_AWAIT_MAX_SLEEP_SECONDS,
    **kwargs: Any,
) -> ModelInfo:
    """Log the IR folder as an MLflow Model (in the active run, or a new one); returns its ``ModelInfo``.

    ``name`` is the MLflow 3 model name; ``artifact_path`` is MLflow's deprecated alias for it. Other keyword
    arguments (``code_paths``, ``conda_env``, ``params``, ``tags``, ``model_type``, ``step``, ``model_id``, ``run_id``)
    go to :py:meth:`mlflow.models.Model.log`.
    """
    return Model.log(
        artifact_path=artifact_path,
        name=name,
        flavor=sys.modules[__name__],
        model_path=model_path,
        metadata_config=metadata_config,
        max_context=max_context,
        device=device,
        performance_hint=performance_hint,
        inference_precision=inference_precision,
        threads=threads,
        registered_model_name=registered_model_name,
        await_registration_for=await_registration_for,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        metadata=metadata,
        **kwargs,
    )


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

    local_model_path = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    flavor_conf = _get_flavor_configuration(model_path=local_model_path, flavor_name=FLAVOR_NAME)
    _add_code_from_conf_to_system_path(local_model_path, flavor_conf)
    runtime = {**{k: flavor_conf[k] for k in _RUNTIME_KEYS if k in flavor_conf}, **runtime_from_env()}
    if device is not None:
        runtime["device"] = device
    return OVModelForCausalLM.from_pretrained(
        os.path.join(local_model_path, flavor_conf["model_dir"]), device=runtime.get("device", "CPU"),
        ov_config=_ov_properties(runtime), compile=True,
    )


class _OpenVINOModelWrapper:
    """The pyfunc face of an OpenVINO IR: prompts in, generated strings out."""

    def __init__(self, runner: OpenVINORunner, tokenizer: Any, eos_token_ids: Sequence[int]) -> None:
        self._runner = runner
        self._tokenizer = tokenizer
        self._eos = frozenset(int(t) for t in eos_token_ids)
        self._lock = threading.Lock()  # one infer request, one sequence: servers may call predict concurrently

    def get_raw_model(self) -> OpenVINORunner:
        """The underlying :class:`~mlflow_edge.backends.openvino.OpenVINORunner`."""
        return self._runner

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        """One completion per prompt; ``params`` as declared in :func:`default_signature`."""
        options = {name: default for name, _, default in GENERATION_PARAMS}
        options.update({k: v for k, v in (params or {}).items() if k in options and v is not None})
        if int(options["max_new_tokens"]) < 1:
            raise MlflowException.invalid_parameter_value(
                f"max_new_tokens must be positive, got {options['max_new_tokens']}")
        outputs = []
        with self._lock:
            rng = np.random.default_rng(int(options["seed"]))
            for prompt in _prompts(model_input):
                ids = self._prompt_ids(prompt, bool(options["chat"]))
                generated = self.generate_ids(ids, options, rng)
                outputs.append(self._tokenizer.decode(generated, skip_special_tokens=True))
        return outputs

    def _prompt_ids(self, prompt: str, chat: bool) -> list[int]:
        if chat:
            if not getattr(self._tokenizer, "chat_template", None):
                raise MlflowException.invalid_parameter_value("this model's tokenizer has no chat template")
            text = self._tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                       add_generation_prompt=True)
            ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self._tokenizer(prompt)["input_ids"]
        if not ids:
            raise MlflowException.invalid_parameter_value("the prompt is empty")
        return list(ids)

    def generate_ids(self, ids: Sequence[int], options: Mapping[str, Any], rng: np.random.Generator) -> list[int]:
        """New token ids after ``ids``: at most ``max_new_tokens``, stopping at end-of-sequence unless ``ignore_eos``.

        ``options`` holds every generation param (see :data:`GENERATION_PARAMS`); ``rng`` draws the samples.
        """
        runner = self._runner
        room = runner.context_tokens - len(ids)
        if room < 1:
            raise MlflowException.invalid_parameter_value(
                f"prompt of {len(ids)} tokens does not fit the context of {runner.context_tokens}")
        limit = min(int(options["max_new_tokens"]), room)
        ignore_eos = bool(options["ignore_eos"])
        runner.reset()
        logits = runner.forward(ids)[-1]
        generated: list[int] = []
        seen = set(ids)
        while True:
            token = _next_token(logits, options, rng, seen)
            if token in self._eos and not ignore_eos:
                break
            generated.append(token)
            if len(generated) >= limit:
                break
            seen.add(token)
            logits = runner.forward([token])[-1]
        return generated


def _next_token(logits: np.ndarray, options: Mapping[str, Any], rng: np.random.Generator, seen: set[int]) -> int:
    """Greedy at ``temperature`` 0, else a sample after repetition penalty, temperature, top-k and top-p."""
    penalty = float(options["repetition_penalty"])
    temperature = float(options["temperature"])
    if penalty == 1.0 and temperature <= 0:
        return int(logits.argmax())
    scores = np.array(logits, dtype=np.float64)
    if penalty != 1.0 and seen:
        index = np.fromiter(seen, dtype=np.int64)
        values = scores[index]
        scores[index] = np.where(values > 0, values / penalty, values * penalty)
    if temperature <= 0:
        return int(scores.argmax())
    scores /= temperature
    top_k = int(options["top_k"])
    if 0 < top_k < scores.size:
        cutoff = np.partition(scores, -top_k)[-top_k]
        scores[scores < cutoff] = -np.inf
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    top_p = float(options["top_p"])
    if 0 < top_p < 1:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < top_p  # the smallest set whose mass reaches top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


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


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> _OpenVINOModelWrapper:
    """Called by ``mlflow.pyfunc.load_model`` with the path of ``model/``; ``model_config`` may set runtime settings."""
    from transformers import AutoTokenizer

    flavor_conf = _get_flavor_configuration(model_path=str(Path(path).parent), flavor_name=FLAVOR_NAME)
    # MLflow passes the saved config updated with the caller's model_config; the environment overrides both
    runtime = {k: flavor_conf[k] for k in _RUNTIME_KEYS if k in flavor_conf}
    runtime.update(_runtime_config(**{k: v for k, v in (model_config or {}).items() if k in _RUNTIME_KEYS}))
    runtime.update(runtime_from_env())
    runner = OpenVINORunner(
        Path(path), threads=int(runtime.get("threads", 0)), context_tokens=int(runtime.get("max_context", 2048)),
        device=runtime.get("device", "CPU"), performance_hint=runtime.get("performance_hint", "LATENCY"),
        inference_precision=runtime.get("inference_precision"),
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    return _OpenVINOModelWrapper(runner, tokenizer, _eos_token_ids(Path(path), tokenizer))
