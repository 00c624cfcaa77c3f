"""ONNX Runtime backend: the ONNX Runtime GenAI model builder, Olive's ONNX quantization passes, the GenAI runtime.

- ``convert``: the ONNX Runtime GenAI model builder (what ``python -m onnxruntime_genai.models.builder -i <hf folder>
  -o <out> -p fp32 -e cpu`` runs, called in this process) writes ``model.onnx`` (+ external data
  ``model.onnx.data``), ``genai_config.json`` and the tokenizer files, at ``fp32`` (the builder's CPU graph, ``-e
  cpu``: the base) or ``fp16`` (its GPU precision, the ``-e cuda`` graph, which runs on the CPU too: its ``-e cpu``
  fp16 graph fails on the second decoding step in ONNX Runtime 1.32's CPU kernels); ``f32``/``f16`` are accepted
  too. Both graphs use ``GroupQueryAttention`` with the KV cache as inputs and outputs, a tied embedding as the LM
  head's weight (``Transpose`` → ``Gather``). Olive's own LLM export does not run here (``olive auto-opt``'s torch
  exporter fails inside transformers 5.5, its ``--use_model_builder`` path needs a module onnxruntime-genai 0.16+
  dropped); the tests keep checking that.
- ``quantize``: on that graph, each pass run on its own (Olive's ``Pass.run``; no engine, so no footprints):

  * weight-only ``MatMulNBits``, precision ``int<bits>_<algorithm>``: ``int4_rtn``/``int8_rtn`` (Olive's
    ``OnnxBlockWiseRtnQuantization``), ``int4_k_quant``/``int8_k_quant`` (``OnnxKQuantQuantization``), ``int4_hqq``
    and ``int4_gptq`` (calibration text) by ONNX Runtime's own HQQ and GPTQ quantizers: Olive 0.13's
    ``OnnxHqqQuantization`` writes blocks the runtime reads as other weights (a test keeps checking), its GPTQ is a
    PyTorch pass whose ONNX export is the path that fails here. k-quant and HQQ take about a minute for SmolLM2-135M
    on 2 cores, GPTQ longer. Options:
    ``block_size`` (a power of two from 16 dividing every quantized layer: 32 and 64 suit SmolLM2's 576-wide layers
    and the 256-wide test model, 128 does not divide 576), ``is_symmetric`` (RTN, GPTQ; k-quant and HQQ are
    asymmetric), ``accuracy_level`` (MatMulNBits' compute type of the activations: 0 unset, 1 fp32, 2 fp16, 3 bf16,
    4 int8, the default here as in the builder for CPUs: unset, Olive's default, decodes SmolLM2 ~15x slower here),
    ``last_matmul`` (the LM head, and a tied embedding with it, in ``int8`` or left ``float``: the builder's
    ``matmul_mixed_precision=last_matmul:int8``) and ``nodes_to_exclude`` (comma-separated node names left float);
  * ``int8_dynamic``: Olive's ``OnnxDynamicQuantization`` (``quantize_dynamic``: ``MatMulInteger``, activations
    quantized at run time), options ``per_channel``, ``reduce_range``, ``weight_type``;
  * ``int8_static``: Olive's ``OnnxStaticQuantization`` (``quantize_static``) calibrated on the calibration text,
    options ``calibrate_method`` (``MinMax``, ``Entropy``, ``Percentile``), ``quant_format`` (``QDQ``,
    ``QOperator``), ``activation_type``, ``weight_type``, ``per_channel``, ``reduce_range``. The GenAI graph takes it:
    its MatMuls are quantized, ``GroupQueryAttention`` and the KV cache stay float, calibration feeds fresh sequences.

  Both int8 methods quantize only MatMuls and need the fp32 base (their quantizers take float32 activations); the fp16
  base quantizes with RTN. A tied embedding shares the LM head's blocks where ``GatherBlockQuantized`` reads them
  (RTN, k-quant, GPTQ: as the builder's own int4 export ties them); otherwise (HQQ's float zero points, the int8
  methods' weights) and for an untied table, the embedding is block-quantized by Olive's RTN pass at the precision's
  bit width; with a float LM head it stays float. Data-aware methods read ``calibration_samples`` windows of
  ``calibration_tokens`` tokens of the calibration text (source tokenizer) and record ``calib.dataset`` and
  ``calib.sha256``. ``quantization.json`` in the artifact folder records the passes that ran (Olive's
  ``Pass.to_json``), the graph's metadata its precision.
- ``load``: an :class:`ONNXRuntimeGenAIRunner` on ``onnxruntime_genai`` (logits of every position from the model's
  ``logits`` output, greedy decoding that reuses the KV cache).

Runtime option, read at load time (the environment wins over the artifact's options): ``execution_provider`` /
``MLFLOW_EDGE_ONNXRUNTIME_EXECUTION_PROVIDER``: ``cpu`` (default), ``cuda`` or ``dml`` (the builder's ``-e`` names);
one that this ONNX Runtime GenAI build lacks is refused. ``threads`` sets the session's ``intra_op_num_threads``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np

from mlflow_edge.backends.base import Artifact, Bits, Generation, OptionSpec, StageNeed, typed_options
from mlflow_edge.errors import EdgeError, first_line

MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
QUANTIZATION_RECORD = "quantization.json"
CONVERT_PRECISIONS = ("fp32", "fp16")
# the builder's graph for each: its CPU graph in fp32; fp16 is its GPU precision (its fp16 CPU graph fails on the
# second decoding step in ONNX Runtime 1.32's CPU kernels, its CUDA graph runs on the CPU too)
BUILDER_PROVIDER = {"fp32": "cpu", "fp16": "cuda"}
_CONVERT_ALIASES = {"f32": "fp32", "f16": "fp16", "float32": "fp32", "float16": "fp16"}
# precision -> (algorithm, bits) of the weight-only MatMulNBits methods
WEIGHT_ONLY: dict[str, tuple[str, int]] = {
    "int4_rtn": ("rtn", 4), "int4_k_quant": ("k_quant", 4), "int4_hqq": ("hqq", 4), "int4_gptq": ("gptq", 4),
    "int8_rtn": ("rtn", 8), "int8_k_quant": ("k_quant", 8),
}
INT8_DYNAMIC, INT8_STATIC = "int8_dynamic", "int8_static"
QUANTIZE_PRECISIONS = (*WEIGHT_ONLY, INT8_DYNAMIC, INT8_STATIC)
DATA_AWARE = frozenset({"int4_gptq", INT8_STATIC})
FROM_FP16 = ("int4_rtn", "int8_rtn")  # what quantizes the builder's fp16 graph (its GPU precision)
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits: a power of two from 16
EXECUTION_PROVIDERS = ("cpu", "cuda", "dml")
ENV_PREFIX = "MLFLOW_EDGE_ONNXRUNTIME_"
_EXTRA = "pip install 'mlflow-edge[onnxruntime]'"
# files of an artifact folder that are not the model but travel with it (GenAI config, tokenizer, chat template)
_COMPANION_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model")
_NOT_COMPANIONS = frozenset({"artifact.json", "key.json", QUANTIZATION_RECORD})
_METADATA_PRECISION = "mlflow_edge.precision"
_NOT_CAUSAL_LM = frozenset({"WhisperForConditionalGeneration"})  # the builder exports it, but it is speech-to-text

# which options apply to which precisions (the runtime option applies to all)
_INT8 = frozenset({INT8_DYNAMIC, INT8_STATIC})
_APPLIES_TO: dict[str, frozenset[str]] = {
    "block_size": frozenset(WEIGHT_ONLY),
    "accuracy_level": frozenset(WEIGHT_ONLY),
    "last_matmul": frozenset(WEIGHT_ONLY),
    "nodes_to_exclude": frozenset(WEIGHT_ONLY) | _INT8,
    "is_symmetric": frozenset({"int4_rtn", "int8_rtn", "int4_gptq"}),
    "percdamp": frozenset({"int4_gptq"}),
    "per_channel": _INT8,
    "reduce_range": _INT8,
    "weight_type": _INT8,
    "activation_type": frozenset({INT8_STATIC}),
    "calibrate_method": frozenset({INT8_STATIC}),
    "quant_format": frozenset({INT8_STATIC}),
    "calibration_samples": DATA_AWARE,
    "calibration_tokens": DATA_AWARE,
}


def require_genai():
    """The ``onnxruntime_genai`` module, or a one-line error naming the extra to install."""
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise EdgeError(f"onnxruntime-genai is not installed: {_EXTRA}") from exc
    return onnxruntime_genai


def require_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise EdgeError(f"onnx is not installed: {_EXTRA}") from exc
    return onnx


def require_olive_passes():
    """Olive's ONNX pass classes, by name, with Olive's logging at warnings."""
    try:
        from olive.logging import set_verbosity_warning
        from olive.passes.onnx.kquant_quantization import OnnxKQuantQuantization
        from olive.passes.onnx.quantization import OnnxDynamicQuantization, OnnxStaticQuantization
        from olive.passes.onnx.rtn_quantization import OnnxBlockWiseRtnQuantization
    except ImportError as exc:
        raise EdgeError(f"olive-ai is not installed: {_EXTRA}") from exc
    set_verbosity_warning()
    return {"rtn": OnnxBlockWiseRtnQuantization, "k_quant": OnnxKQuantQuantization, "dynamic": OnnxDynamicQuantization,
            "static": OnnxStaticQuantization}


def available_execution_providers() -> tuple[str, ...]:
    """The execution providers (builder names) this ONNX Runtime GenAI build can use here; ``cpu`` always."""
    og = require_genai()
    found = ["cpu"]
    if og.is_cuda_available():
        found.append("cuda")
    if og.is_dml_available():
        found.append("dml")
    return tuple(found)


def check_execution_provider(name: str) -> str:
    """``name`` (lower-cased) when this ONNX Runtime GenAI build has it here, else a one-line error."""
    provider = str(name).strip().lower()
    if provider not in EXECUTION_PROVIDERS:
        raise EdgeError(f"unknown execution_provider '{name}' (choose from {', '.join(EXECUTION_PROVIDERS)})")
    available = available_execution_providers()
    if provider not in available:
        raise EdgeError(f"ONNX Runtime execution provider '{provider}' is not available here "
                        f"(available: {', '.join(available)})")
    return provider


def runtime_from_env() -> dict[str, str]:
    """Runtime options from the environment (``MLFLOW_EDGE_ONNXRUNTIME_EXECUTION_PROVIDER``)."""
    value = os.environ.get(ENV_PREFIX + "EXECUTION_PROVIDER")
    return {"execution_provider": value} if value else {}


class ONNXRuntimeBackend:
    """ONNX model folders for ONNX Runtime GenAI: model-builder export, Olive quantization, the GenAI runtime."""

    name: ClassVar[str] = "onnxruntime"
    format: ClassVar[str] = "onnx"
    flavor: ClassVar[str] = "mlflow_edge.flavors.onnx"
    # the runtime, and onnx, which checks a model's files before the runtime maps them
    requirements: ClassVar[tuple[str, ...]] = ("onnxruntime-genai", "onnxruntime", "onnx")
    targets: ClassVar[Mapping[str, str]] = {"cpu": "primary", "nvidia-gpu": "primary", "intel-cpu": "secondary"}
    base_precision: ClassVar[str] = "fp32"  # the builder's CPU graph; fp16 is its GPU precision
    sweep_types: ClassVar[tuple[str, ...]] = ("int4_rtn", "int4_k_quant", "int4_hqq", "int8_rtn", INT8_DYNAMIC,
                                              INT8_STATIC)
    native_serve_commands: ClassVar[tuple[str, ...]] = ()  # ONNX Runtime GenAI ships no server

    def convert_precisions(self) -> Sequence[str]:
        return CONVERT_PRECISIONS

    def quantize_precisions(self) -> Sequence[str]:
        return QUANTIZE_PRECISIONS

    def option_specs(self) -> Sequence[OptionSpec]:
        return (
            OptionSpec("block_size", int, 32, label="b{value}",
                       help="weight-only: weights per MatMulNBits block along the inputs "
                            "(a power of two from 16 dividing every quantized layer)"),
            OptionSpec("is_symmetric", bool, None, label="", label_off="asym",
                       help="RTN, GPTQ: signed weights without zero points (default true)"),
            OptionSpec("accuracy_level", int, 4, choices=(0, 1, 2, 3, 4),
                       help="weight-only: MatMulNBits compute type of the activations "
                            "(0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8: the builder's CPU default)"),
            OptionSpec("last_matmul", str, None, choices=("int8", "float"),
                       help="weight-only: the last MatMul (LM head, and the tied embedding) in int8 or left in float"),
            OptionSpec("nodes_to_exclude", str, None, help="comma-separated node names left in float"),
            OptionSpec("percdamp", float, None, help="int4_gptq: dampening, share of the mean Hessian diagonal (0.01)"),
            OptionSpec("per_channel", bool, None, help="int8: one scale per weight column"),
            OptionSpec("reduce_range", bool, None, help="int8: 7-bit weights (CPUs without VNNI)"),
            OptionSpec("weight_type", str, None, choices=("QInt8", "QUInt8"), help="int8: weight type"),
            OptionSpec("activation_type", str, None, choices=("QInt8", "QUInt8"),
                       help="int8_static: activation type (Olive's default QInt8)"),
            OptionSpec("calibrate_method", str, None, choices=("MinMax", "Entropy", "Percentile"),
                       help="int8_static: how activation ranges are calibrated"),
            OptionSpec("quant_format", str, None, choices=("QDQ", "QOperator"),
                       help="int8_static: QuantizeLinear/DequantizeLinear pairs or quantized operators"),
            OptionSpec("calibration_samples", int, None, help="int4_gptq, int8_static: calibration windows (16)"),
            OptionSpec("calibration_tokens", int, 128, help="int4_gptq, int8_static: tokens per calibration window"),
            OptionSpec("execution_provider", str, None, choices=EXECUTION_PROVIDERS, label="",
                       help="runtime: cpu, cuda or dml (measured only where that hardware and build are present)"),
        )

    def versions(self) -> Mapping[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        require_genai()  # the runtime imports; the quantizers are imported when they run
        try:
            return {"onnxruntime": version("onnxruntime"), "onnxruntime_genai": version("onnxruntime-genai"),
                    "olive_ai": version("olive-ai")}
        except PackageNotFoundError as exc:
            raise EdgeError(f"{exc.name} is not installed: {_EXTRA}") from exc

    def unsupported_reason(self, source: Any) -> str | None:
        known = builder_architectures()
        if source.architecture in known:
            return None
        return (f"the ONNX Runtime GenAI model builder ({len(known)} causal-LM architectures) cannot export "
                f"{source.architecture}")

    def open_artifact(self, path: Path, source: Any) -> Artifact | None:
        folder = model_folder(Path(path))
        if folder is None:
            return None
        graph, files = read_graph(folder)  # a corrupt or truncated model is refused here, in one line
        return self._artifact(folder, graph_precision(graph), source.name, source.sha256, source.num_parameters,
                              {}, files)

    def starting_points(self) -> Sequence[Mapping[str, Any]]:
        # the builder's and `olive auto-opt --precision int4`'s int4 (RTN, symmetric, block 32, int8 compute on CPU),
        # and `--precision int8`'s dynamic quantization
        provider = _searched_providers()
        extra = {"onnxruntime.execution_provider": provider[-1]} if len(provider) > 1 else {}
        return ({"onnxruntime.precision": "int4_rtn", "onnxruntime.block_size": 32, "onnxruntime.is_symmetric": True,
                 "onnxruntime.last_matmul": None, **extra},
                {"onnxruntime.precision": INT8_DYNAMIC, "onnxruntime.per_channel": False, **extra})

    def search_space(self, trial: Any) -> tuple[str, dict[str, Any]]:
        precision = trial.suggest_categorical("onnxruntime.precision",
                                              ["int4_rtn", "int4_k_quant", "int4_hqq", "int8_rtn", INT8_DYNAMIC])
        options: dict[str, Any] = {}
        if precision in WEIGHT_ONLY:
            # 32 and 64 divide every layer of SmolLM2 (576 wide) and of the tiny test model (256)
            options["block_size"] = trial.suggest_categorical("onnxruntime.block_size", [32, 64])
            if precision.endswith("_rtn"):
                options["is_symmetric"] = trial.suggest_categorical("onnxruntime.is_symmetric", [True, False])
            if precision.startswith("int4"):
                options["last_matmul"] = trial.suggest_categorical("onnxruntime.last_matmul", [None, "int8"])
        else:
            options["per_channel"] = trial.suggest_categorical("onnxruntime.per_channel", [False, True])
        providers = _searched_providers()
        if len(providers) > 1:  # an accelerator's provider is sampled only where it is installed
            options["execution_provider"] = trial.suggest_categorical("onnxruntime.execution_provider", providers)
        return precision, {k: v for k, v in options.items() if v is not None}

    def resource_needs(self, facts: Any) -> Sequence[StageNeed]:
        # the GenAI model builder loads the model in torch fp32 and writes an fp32 graph (its CPU base); Olive's
        # weight-only passes load that graph and write the quantized one
        runtime, fp32 = 1 << 30, facts.bytes_at("float32")
        return (StageNeed("onnxruntime conversion (fp32 graph)", runtime + 2 * fp32, fp32,
                          "leave onnxruntime out (--backends)"),
                StageNeed("onnxruntime quantization (Olive)", runtime + fp32 + facts.parameters, facts.parameters,
                          "leave onnxruntime out (--backends)"))

    def precision_bits(self, precision: str, options: Mapping[str, Any], source: Any) -> Bits | None:
        # MatMulNBits: the weight bits, an fp16 scale per block, and a zero point of the weight's bits when asymmetric
        if precision in WEIGHT_ONLY:
            algorithm, bits = WEIGHT_ONLY[precision]
            block = int(options.get("block_size") or 32)
            symmetric = options.get("is_symmetric", True) not in (False, "false", "False")
            last = f"+last_matmul={options['last_matmul']}" if options.get("last_matmul") else ""
            return Bits(algorithm + last, bits + (16 + (0 if symmetric else bits)) / block)
        if precision in (INT8_DYNAMIC, INT8_STATIC):  # weights and activations, one scale per tensor or channel
            return Bits(precision.removeprefix("int8_"), 8.0)
        return None

    # -- convert -------------------------------------------------------------------------------------------------
    def convert(self, source: Any, out_dir: Path, precision: str) -> Artifact:
        precision = _CONVERT_ALIASES.get(precision.strip().lower(), precision.strip().lower())
        if precision not in CONVERT_PRECISIONS:
            raise EdgeError(f"unknown ONNX Runtime GenAI conversion type '{precision}' "
                            f"(choose from {', '.join(CONVERT_PRECISIONS)})")
        if reason := self.unsupported_reason(source):
            raise EdgeError(f"unsupported architecture: {reason}")
        require_genai()
        provider = BUILDER_PROVIDER[precision]
        with _staging(out_dir, ".export.partial") as staging:
            _run_model_builder(Path(source.path), staging, precision, provider, source.name)
            _, files = read_graph(staging)
            _publish(staging, out_dir)
        return self._artifact(out_dir, precision, source.name, source.sha256, source.num_parameters,
                              {"builder_execution_provider": provider}, [out_dir / f.name for f in files])

    def _artifact(self, folder: Path, precision: str, source_name: str, source_sha256: str, num_parameters: int,
                  options: Mapping[str, Any], files: Sequence[Path]) -> Artifact:
        return Artifact(path=folder, backend=self.name, format=self.format, precision=precision,
                        source_name=source_name, source_sha256=source_sha256, num_parameters=num_parameters,
                        options=dict(options), files=tuple(files))

    # -- quantize ------------------------------------------------------------------------------------------------
    def quantize(
        self,
        base: Artifact,
        out_dir: Path,
        precision: str,
        options: Mapping[str, Any] | None = None,
        calibration: Any = None,
        source: Any = None,
    ) -> Artifact:
        request = self._request(precision, options)
        if base.precision.lower() not in CONVERT_PRECISIONS:
            raise EdgeError(f"{Path(base.path).name} is already quantized ({base.precision}); "
                            f"quantize an {' or '.join(CONVERT_PRECISIONS)} conversion")
        if base.precision.lower() == "fp16" and request.precision not in FROM_FP16:
            raise EdgeError(f"{request.precision} quantizes the fp32 conversion (its quantizer takes float32 "
                            f"weights and activations); from fp16 only {', '.join(FROM_FP16)}")
        folder = model_folder(Path(base.path))
        if folder is None:
            raise EdgeError(f"no ONNX Runtime GenAI model folder ({GENAI_CONFIG} and {MODEL_FILE}) at {base.path}")
        graph, _ = read_graph(folder)
        plan = _plan(request, graph)
        windows = None
        if request.precision in DATA_AWARE:
            windows = _calibration_windows(request, calibration, Path(source.path) if source is not None else folder)
        recorded = {**plan.recorded(), **_calibration_record(calibration, windows), "base_precision": base.precision}
        require_olive_passes()
        with _staging(out_dir, ".quantize.partial") as staging:
            model, record = _quantize_graph(folder, staging, plan, windows)
            final = _write_quantized(folder, staging, plan, model, record, recorded)
            del model
            _, files = read_graph(final)
            _publish(final, out_dir)
            shutil.rmtree(staging)
        return self._artifact(out_dir, request.precision, base.source_name, base.source_sha256, base.num_parameters,
                              recorded, [out_dir / f.name for f in files])

    def _request(self, precision: str, options: Mapping[str, Any] | None) -> "_Request":
        options = typed_options(self.name, self.option_specs(), options)
        precision = str(precision).strip().lower()
        if precision not in QUANTIZE_PRECISIONS:
            raise EdgeError(f"unknown ONNX Runtime quantization precision '{precision}' "
                            f"(choose from {', '.join(QUANTIZE_PRECISIONS)})")
        for name in options:
            if name in _APPLIES_TO and precision not in _APPLIES_TO[name]:
                allowed = [p for p in QUANTIZE_PRECISIONS if p in _APPLIES_TO[name]]
                raise EdgeError(f"option {name} applies to {', '.join(allowed)}, not {precision}")
        if options.get("last_matmul") == "int8" and WEIGHT_ONLY.get(precision, ("", 4))[1] == 8:
            raise EdgeError(f"last_matmul=int8 changes nothing for {precision}; use last_matmul=float to keep it float")
        if "execution_provider" in options:
            options["execution_provider"] = check_execution_provider(options["execution_provider"])
        for name in ("calibration_samples", "calibration_tokens"):
            if name in options and options[name] < (8 if name == "calibration_tokens" else 1):
                raise EdgeError(f"{name} must be at least {8 if name == 'calibration_tokens' else 1}, "
                                f"got {options[name]}")
        if "percdamp" in options and not 0 < options["percdamp"] < 1:
            raise EdgeError(f"percdamp must be in (0, 1), got {options['percdamp']}")
        return _Request(precision, options)

    # -- load ----------------------------------------------------------------------------------------------------
    def load(self, artifact: Artifact, threads: int, context_tokens: int) -> "ONNXRuntimeGenAIRunner":
        settings = {**{k: v for k, v in artifact.options.items() if k == "execution_provider"}, **runtime_from_env()}
        return ONNXRuntimeGenAIRunner(artifact.path, threads=threads, context_tokens=context_tokens, **settings)


def _searched_providers() -> list[str]:
    """Execution providers the search samples: those installed here (``cpu`` first)."""
    try:
        return list(available_execution_providers())
    except EdgeError:
        return ["cpu"]


# -- model folders ---------------------------------------------------------------------------------------------------
def builder_architectures() -> frozenset[str]:
    """HF architectures the installed model builder exports as causal LMs (read from its source, not imported:
    importing it loads torch)."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    script = Path(next(iter(spec.submodule_search_locations))) / "models" / "builder.py"
    try:
        text = script.read_text(encoding="utf-8")
    except OSError:
        return frozenset()
    return frozenset(re.findall(r"architectures\[0\] == \"([A-Za-z0-9_]+)\"", text)) - _NOT_CAUSAL_LM


def model_folder(path: Path) -> Path | None:
    """The GenAI model folder of ``path`` (a folder with ``genai_config.json``, or its decoder ``.onnx``), or
    ``None`` when it is none."""
    folder = path.parent if path.is_file() and path.suffix.lower() == ".onnx" else path
    if not folder.is_dir() or not (folder / GENAI_CONFIG).is_file():
        return None
    if path.is_file() and path.name != _decoder_file(folder):
        return None
    return folder


def genai_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / GENAI_CONFIG).read_text())
        config["model"]["decoder"]  # noqa: B018  (the part every decoder-only model has)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EdgeError(f"not a valid {GENAI_CONFIG}: {folder / GENAI_CONFIG} ({first_line(exc)})") from exc
    return config


def _decoder_file(folder: Path) -> str:
    try:
        return str(json.loads((folder / GENAI_CONFIG).read_text())["model"]["decoder"].get("filename", MODEL_FILE))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return MODEL_FILE


def read_graph(folder: Path) -> tuple[Any, list[Path]]:
    """The decoder graph of ``folder`` (without its weights) and the model files (graph, external data), checked:
    a corrupt graph, a missing or truncated external-data file is a one-line :class:`EdgeError`."""
    onnx = require_onnx()
    genai_config(folder)
    model_path = folder / _decoder_file(folder)
    if not model_path.is_file():
        raise EdgeError(f"no {model_path.name} in {folder}")
    try:
        graph = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends
        raise EdgeError(f"not a valid ONNX model: {model_path} ({first_line(exc)})") from exc
    # onnx.checker knows none of ONNX Runtime's own operators (SimplifiedLayerNormalization, GroupQueryAttention):
    # check what the GenAI runtime reads instead, the decoder's inputs, outputs and opsets
    names = {v.name for v in graph.graph.input} | {v.name for v in graph.graph.output}
    if not graph.opset_import or not graph.graph.node or not {"input_ids", "logits"} <= names:
        raise EdgeError(f"not a valid ONNX Runtime GenAI decoder: {model_path} (no input_ids/logits or no opsets)")
    return graph, [model_path, *_external_files(graph, folder)]


def _external_files(graph: Any, folder: Path) -> list[Path]:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    needed: dict[Path, int] = {}
    for tensor in graph.graph.initializer:
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            file = folder / info.location
            end = (info.offset or 0) + (info.length or 0)
            needed[file] = max(needed.get(file, 0), end)
    for file, end in needed.items():
        if not file.is_file():
            raise EdgeError(f"missing external data file {file.name} of {folder / _decoder_file(folder)}")
        if file.stat().st_size < end:
            raise EdgeError(f"truncated external data file: {file} ({file.stat().st_size} bytes, tensors need {end})")
    return sorted(needed)


def graph_precision(graph: Any) -> str:
    """The precision of a model graph: mlflow-edge's record in its metadata, else read from its operators and
    weights (``int4``, ``int8``, ``int8_dynamic``, ``int8_static``, ``fp32``, ``fp16``, ``bf16``)."""
    recorded = {p.key: p.value for p in graph.metadata_props}
    if _METADATA_PRECISION in recorded:
        return recorded[_METADATA_PRECISION]
    ops = [node for node in graph.graph.node]
    bits = [a.i for node in ops if node.op_type == "MatMulNBits" for a in node.attribute if a.name == "bits"]
    if bits:
        return f"int{max(set(bits), key=bits.count)}"
    types = {node.op_type for node in ops}
    if "MatMulInteger" in types:
        return INT8_DYNAMIC
    if types & {"QLinearMatMul", "DequantizeLinear"}:
        return INT8_STATIC
    sizes: dict[int, int] = {}
    for tensor in graph.graph.initializer:
        sizes[tensor.data_type] = sizes.get(tensor.data_type, 0) + math.prod(tensor.dims)
    names = {1: "fp32", 10: "fp16", 16: "bf16"}
    floats = {k: v for k, v in sizes.items() if k in names}
    return names[max(floats, key=floats.__getitem__)] if floats else "unknown"


def companion_files(folder: Path) -> list[Path]:
    """GenAI config and tokenizer files beside the model in ``folder`` (everything the runtime needs but the model)."""
    found = {p for pattern in _COMPANION_PATTERNS for p in Path(folder).glob(pattern) if p.is_file()}
    return sorted(p for p in found if p.name not in _NOT_COMPANIONS)


@contextlib.contextmanager
def _staging(out_dir: Path, name: str) -> Iterator[Path]:
    """A fresh ``out_dir/name`` to build in; on any failure it goes (with ``out_dir`` when this call created it)."""
    created = not out_dir.exists()
    staging = out_dir / name
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(out_dir if created else staging, ignore_errors=True)
        raise


def _publish(folder: Path, out_dir: Path) -> None:
    """Move the finished files of ``folder`` into ``out_dir`` (the model files last) and remove ``folder``."""
    items = sorted(folder.iterdir(), key=lambda p: p.suffix in (".onnx", ".data"))
    for item in items:
        item.replace(out_dir / item.name)
    folder.rmdir()


# -- convert: the model builder --------------------------------------------------------------------------------------
def _run_model_builder(source_path: Path, out_dir: Path, precision: str, provider: str, source_name: str) -> None:
    """``python -m onnxruntime_genai.models.builder -i source -o out_dir -p precision -e provider``, in this process
    (its output kept from the terminal; the first line of its error becomes the message)."""
    cache_dir = out_dir / ".builder-cache"
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            import onnxruntime_genai.models  # noqa: F401  (puts the builder's own modules on sys.path)
            from onnxruntime_genai.models.builder import create_model, parse_extra_options

            extra = parse_extra_options(None, str(source_path), str(out_dir), precision, provider, str(cache_dir),
                                        ["hf_token=false"])
            create_model(None, str(source_path), str(out_dir), precision, provider, str(cache_dir), **extra)
    except Exception as exc:  # the builder raises ValueError, NotImplementedError, OSError, torch errors ...
        raise EdgeError(f"the ONNX Runtime GenAI model builder cannot export {source_name}: {first_line(exc)}") from exc
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if not (out_dir / MODEL_FILE).is_file() or not (out_dir / GENAI_CONFIG).is_file():
        raise EdgeError(f"the ONNX Runtime GenAI model builder wrote no {MODEL_FILE} for {source_name}")


# -- quantize: what to do --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Request:
    precision: str
    options: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A checked quantization: precision, options, and the graph's names it needs (excluded nodes, the LM head, the
    outputs the GenAI runtime reads)."""

    precision: str
    options: Mapping[str, Any]
    excluded: tuple[str, ...]
    lm_head: str
    output_names: tuple[str, ...]
    hidden_size: int

    @property
    def bits(self) -> int:
        return WEIGHT_ONLY.get(self.precision, ("", 8))[1]

    @property
    def block_size(self) -> int:
        return int(self.options.get("block_size", 32))

    @property
    def accuracy_level(self) -> int:
        return int(self.options.get("accuracy_level", 4))

    def option(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)

    def main_exclusions(self) -> list[str]:
        """Nodes the main method leaves alone: the user's, and the LM head when ``last_matmul`` is set."""
        return [*self.excluded, *([self.lm_head] if self.option("last_matmul") else [])]

    def recorded(self) -> dict[str, Any]:
        """The options as run: the given ones, and the block size and accuracy level of weight-only methods."""
        recorded = {k: v for k, v in self.options.items() if k not in ("calibration_samples", "calibration_tokens")}
        if self.precision in WEIGHT_ONLY:
            recorded.update(block_size=self.block_size, accuracy_level=self.accuracy_level)
        return recorded


def _layers(graph: Any) -> list[tuple[str, int]]:
    """``(name, inputs)`` of every MatMul whose weight is a 2-D initializer, in graph order."""
    weights = {t.name: list(t.dims) for t in graph.graph.initializer}
    layers = []
    for node in graph.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and len(weights.get(node.input[1], [])) == 2:
            layers.append((node.name, weights[node.input[1]][0]))
    return layers


def _plan(request: _Request, graph: Any) -> _Plan:
    """Check the request against the graph (node names, block size) before anything is written."""
    layers = _layers(graph)
    if not layers:
        raise EdgeError("the model has no MatMul with a constant weight to quantize")
    names = {node.name for node in graph.graph.node}
    excluded = tuple(n.strip() for n in str(request.options.get("nodes_to_exclude", "")).split(",") if n.strip())
    if unknown := [n for n in excluded if n not in names]:
        raise EdgeError(f"nodes_to_exclude names no node of the model: {', '.join(unknown)}")
    plan = _Plan(request.precision, dict(request.options), excluded, layers[-1][0],
                 tuple(o.name for o in graph.graph.output), layers[-1][1])
    if request.precision in WEIGHT_ONLY:
        _check_block_size(plan.block_size, [(n, k) for n, k in layers if n not in excluded])
    return plan


def _check_block_size(block: int, layers: Sequence[tuple[str, int]]) -> None:
    if block not in BLOCK_SIZES:
        raise EdgeError(f"block_size must be a power of two from 16 to 256 (MatMulNBits), got {block}")
    for name, inputs in layers:
        if inputs % block:
            fitting = [str(b) for b in BLOCK_SIZES if all(k % b == 0 for _, k in layers)]
            raise EdgeError(f"block_size {block} does not divide the {inputs} inputs of layer {name} "
                            f"(block sizes dividing every layer: {', '.join(fitting) or 'none'})")


# -- quantize: calibration -------------------------------------------------------------------------------------------
def _calibration_windows(request: _Request, calibration: Any, tokenizer_folder: Path) -> np.ndarray:
    """``[samples, tokens]`` token ids of the calibration text (consecutive windows), or a one-line error."""
    if calibration is None:
        raise EdgeError(f"{request.precision} reads calibration text; none was given")
    from transformers import AutoTokenizer

    seq_len = int(request.options.get("calibration_tokens", 128))
    samples = int(request.options.get("calibration_samples", 16))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    ids = tokenizer(calibration.text(), add_special_tokens=False)["input_ids"]
    count = min(samples, len(ids) // seq_len)
    if count < 1:
        raise EdgeError(f"calibration text {calibration.label} has {len(ids)} tokens, fewer than one window of "
                        f"{seq_len} (calibration_tokens)")
    return np.asarray(ids[: count * seq_len], dtype=np.int64).reshape(count, seq_len)


def _calibration_record(calibration: Any, windows: np.ndarray | None) -> dict[str, Any]:
    if windows is None:
        return {}
    return {"calibration_samples": int(windows.shape[0]), "calibration_tokens": int(windows.shape[1]),
            "calib.dataset": calibration.label, "calib.sha256": calibration.sha256}


def _feeds(model: Any, config: Mapping[str, Any], windows: np.ndarray) -> list[dict[str, np.ndarray]]:
    """The decoder's inputs for each window as a fresh sequence: ids, mask, and an empty KV cache."""
    decoder = config["model"]["decoder"]
    feeds = []
    for window in windows:
        feed: dict[str, np.ndarray] = {"input_ids": window[None, :].astype(np.int64),
                                       "attention_mask": np.ones((1, len(window)), dtype=np.int64)}
        for graph_input in model.graph.input:
            name, elem_type = graph_input.name, graph_input.type.tensor_type.elem_type
            if name.startswith("past_key_values"):
                shape = (1, decoder["num_key_value_heads"], 0, decoder["head_size"])
                feed[name] = np.zeros(shape, dtype=np.float16 if elem_type == 10 else np.float32)
            elif name == "position_ids":
                feed[name] = np.arange(len(window), dtype=np.int64)[None, :]
        feeds.append(feed)
    return feeds


_CALIBRATION_DATASET = "mlflow_edge_calibration_windows"


def _calibration_data_config(feeds: Sequence[Mapping[str, np.ndarray]], folder: Path) -> dict[str, Any]:
    """An Olive data config reading ``feeds`` (saved in ``folder``) through a registered dataset.

    The feeds carry the empty KV cache themselves: Olive's ``LLMAugmentedDataLoader`` would build it from the graph's
    input shapes, and fails on the builder's symbolic head dimension (``kv_cache_dim``)."""
    from olive.data.registry import Registry

    def calibration_windows(path: str) -> list[dict[str, Any]]:
        import torch

        with np.load(path) as saved:
            return [{name: torch.from_numpy(saved[f"{i}/{name}"]) for name in feed_names}
                    for i in range(int(saved["count"]))]

    feed_names = list(feeds[0])
    path = folder / "calibration.npz"
    arrays = {f"{i}/{name}": value for i, feed in enumerate(feeds) for name, value in feed.items()}
    np.savez(path, count=np.array(len(feeds)), **arrays)
    Registry.register_dataset(_CALIBRATION_DATASET)(calibration_windows)
    return {"name": "calibration", "load_dataset_config": {"type": _CALIBRATION_DATASET, "params": {"path": str(path)}},
            "dataloader_config": {"type": "no_auto_batch_dataloader"}}


# -- quantize: the passes --------------------------------------------------------------------------------------------
def _run_olive_pass(pass_class: type, config: Mapping[str, Any], model_file: Path, out_dir: Path,
                    record: list[dict[str, Any]]) -> Path:
    """One Olive pass on ``model_file``, written to ``out_dir/model.onnx`` with external data; recorded."""
    from olive.model import ONNXModelHandler
    from olive.passes.olive_pass import create_pass_from_dict

    out_dir.mkdir()
    olive_pass = create_pass_from_dict(pass_class, {**config, "save_as_external_data": True}, disable_search=True)
    result = olive_pass.run(ONNXModelHandler(model_path=str(model_file.parent), onnx_file_name=model_file.name),
                            str(out_dir))
    record.append({"framework": "olive", **json.loads(json.dumps(olive_pass.to_json(), default=str))})
    return Path(result.model_path)


def _quantize_graph(folder: Path, staging: Path, plan: _Plan, windows: np.ndarray | None) -> tuple[Any, list[dict]]:
    """Run the plan's passes on the model of ``folder``: the quantized graph (weights loaded) and the passes' record."""
    passes = require_olive_passes()
    record: list[dict[str, Any]] = []
    try:
        current = _main_pass(passes, folder, staging, plan, windows, record)
        if plan.option("last_matmul") == "int8":
            config = _rtn_config(plan, 8, include=[plan.lm_head])
            current = _run_olive_pass(passes["rtn"], config, current, staging / "last_matmul", record)
        model = _embedding_pass(passes, current, staging, plan, record)
    except EdgeError:
        raise
    except Exception as exc:  # Olive's and ONNX Runtime's many error classes: one line names the cause
        raise EdgeError(f"ONNX Runtime cannot quantize to {plan.precision}: {first_line(exc)}") from exc
    return model, record


def _rtn_config(plan: _Plan, bits: int, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> dict[str, Any]:
    config: dict[str, Any] = {"bits": bits, "block_size": plan.block_size,
                              "is_symmetric": bool(plan.option("is_symmetric", True))}
    if plan.accuracy_level:
        config["accuracy_level"] = plan.accuracy_level
    if include:
        config["nodes_to_include"] = list(include)
    if exclude:
        config["nodes_to_exclude"] = list(exclude)
    return config


def _main_pass(passes: Mapping[str, type], folder: Path, staging: Path, plan: _Plan, windows: np.ndarray | None,
               record: list[dict[str, Any]]) -> Path:
    model_file = folder / _decoder_file(folder)
    out = staging / "main"
    algorithm = WEIGHT_ONLY.get(plan.precision, (plan.precision, 8))[0]
    feeds = None
    if windows is not None:
        feeds = _feeds(require_onnx().load(str(model_file), load_external_data=False), genai_config(folder), windows)
    if algorithm in ("hqq", "gptq"):
        return _ort_weight_only(algorithm, model_file, out, plan, feeds, record)
    if algorithm == "rtn":
        config = _rtn_config(plan, plan.bits, exclude=plan.main_exclusions())
    elif algorithm == "k_quant":
        config = {"bits": plan.bits, "block_size": plan.block_size, "nodes_to_exclude": plan.main_exclusions() or None}
        if plan.accuracy_level:
            config["accuracy_level"] = plan.accuracy_level
    else:
        config = _int8_config(plan)
        if plan.precision == INT8_STATIC:
            config["data_config"] = _calibration_data_config(feeds, staging)
        algorithm = "static" if plan.precision == INT8_STATIC else "dynamic"
    return _run_olive_pass(passes[algorithm], config, model_file, out, record)


def _int8_config(plan: _Plan) -> dict[str, Any]:
    """Olive's ``OnnxDynamicQuantization``/``OnnxStaticQuantization`` config: MatMuls only (the GenAI graph's
    attention, norms and KV cache are contrib ops that stay float), no pre-processing (it cannot shape-infer them)."""
    config: dict[str, Any] = {"op_types_to_quantize": ["MatMul"], "quant_preprocess": False,
                              "nodes_to_exclude": list(plan.excluded) or None}
    for name in ("per_channel", "reduce_range", "calibrate_method", "quant_format"):
        if plan.option(name) is not None:
            config[name] = plan.option(name)
    if plan.option("weight_type"):
        config["precision"] = plan.option("weight_type")[1:].lower()  # QInt8 -> int8 (Olive's precision names)
    if plan.option("activation_type"):
        config["activation_type"] = plan.option("activation_type")[1:].lower()
    return config


def _ort_weight_only(algorithm: str, model_file: Path, out_dir: Path, plan: _Plan,
                     feeds: list[dict[str, np.ndarray]] | None, record: list[dict[str, Any]]) -> Path:
    """HQQ or GPTQ by ONNX Runtime's own weight-only quantizers (Olive 0.13's HQQ pass writes blocks the runtime reads
    as other weights; its GPTQ is a PyTorch pass)."""
    onnx = require_onnx()
    model = onnx.load(str(model_file))
    if algorithm == "hqq":
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=plan.main_exclusions(),
                                         algo_config=HQQWeightOnlyQuantConfig(block_size=plan.block_size, bits=4))
        quantizer.process()
        quantized, config = quantizer.model.model, {"bits": 4, "block_size": plan.block_size}
        if plan.accuracy_level:  # HQQ's quantizer does not set it; it is an operator attribute
            _set_accuracy_level(quantized, plan.accuracy_level)
    else:
        quantized, config = _gptq(model, plan, feeds or [])
    config.update(accuracy_level=plan.accuracy_level, nodes_to_exclude=plan.main_exclusions())
    out_dir.mkdir()
    _save(quantized, out_dir)
    record.append({"framework": "onnxruntime", "type": f"{algorithm.upper()} weight-only", "config": config})
    return out_dir / MODEL_FILE


def _gptq(model: Any, plan: _Plan, feeds: list[dict[str, np.ndarray]]) -> tuple[Any, dict[str, Any]]:
    """ONNX Runtime's GPTQ (``gptq_quantize``, what ``MatMulNBitsQuantizer`` runs for ``GPTQWeightOnlyQuantConfig``),
    given a per-node config so that excluded nodes stay float (the quantizer's own GPTQ path ignores exclusions)."""
    from onnxruntime.quantization.neural_compressor.weight_only import gptq_quantize

    scheme = "sym" if plan.option("is_symmetric", True) else "asym"
    percdamp = float(plan.option("percdamp", 0.01))
    excluded = set(plan.main_exclusions())
    weight_config: dict[str, Any] = {name: "fp32" for name in excluded}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name not in excluded:
            weight_config[node.name] = {"bits": 4, "group_size": plan.block_size, "scheme": scheme}
    quantized = gptq_quantize(model, [(feed, None) for feed in feeds], weight_config=weight_config, num_bits=4,
                              group_size=plan.block_size, scheme=scheme, n_samples=-1, percdamp=percdamp,
                              accuracy_level=plan.accuracy_level)
    return quantized.model, {"bits": 4, "block_size": plan.block_size, "scheme": scheme, "percdamp": percdamp,
                             "calibration_samples": len(feeds)}


def _set_accuracy_level(model: Any, level: int) -> None:
    from onnx import helper

    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])


def _save(model: Any, folder: Path) -> None:
    """``model`` as ``folder/model.onnx`` with its weights in ``model.onnx.data``."""
    require_onnx().save_model(model, str(folder / MODEL_FILE), save_as_external_data=True,
                              all_tensors_to_one_file=True, location=MODEL_FILE + ".data", size_threshold=1024)


# -- quantize: graph surgery after the passes -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Tie:
    """A tied embedding as the builder writes it: ``Gather(Transpose(lm_head weight), input_ids)``."""

    gather: Any
    transpose: Any
    weight: str


def _embedding_pass(passes: Mapping[str, type], model_file: Path, staging: Path, plan: _Plan,
                    record: list[dict[str, Any]]) -> Any:
    """The quantized graph, its outputs named as the GenAI config reads them, its embedding quantized too: a tied one
    shares the LM head's blocks where ``GatherBlockQuantized`` reads them; otherwise the embedding table is
    block-quantized by Olive's RTN pass at the precision's bit width (a tied one untied first). A tied embedding
    stays float with a float LM head."""
    onnx = require_onnx()
    model = onnx.load(str(model_file))
    _restore_output_names(model, plan.output_names)
    gather = None
    tie = _tied_embedding(model)
    if tie is not None:
        lm_head = _quantized_lm_head(model, tie.weight)
        if lm_head is not None and _shareable(model, lm_head):
            _share_embedding(model, tie, lm_head)
        elif not any(tie.weight in node.input for node in model.graph.node if node is not tie.transpose):
            _untie_embedding(model, tie)
            gather = tie.gather
    else:
        gather = _float_embedding(model, plan.excluded)
    block = next((b for b in (plan.block_size, 32, 16) if plan.hidden_size % b == 0), 0)
    if gather is not None and block:  # else the embedding stays float
        (staging / "untied").mkdir()
        _save(model, staging / "untied")
        config = {"bits": 4 if plan.bits == 4 else 8, "block_size": block, "is_symmetric": True,
                  "nodes_to_include": [gather.name]}
        path = _run_olive_pass(passes["rtn"], config, staging / "untied" / MODEL_FILE, staging / "embedding", record)
        model = onnx.load(str(path))
        _restore_output_names(model, plan.output_names)
    _drop_unused_initializers(model)
    return model


def _float_embedding(model: Any, excluded: Sequence[str]) -> Any:
    """The ``Gather`` reading a 2-D float initializer (an untied embedding table), unless excluded, or ``None``."""
    tables = {t.name for t in model.graph.initializer if len(t.dims) == 2 and t.data_type in (1, 10, 16)}
    return next((node for node in model.graph.node if node.op_type == "Gather" and node.input
                 and node.input[0] in tables and node.name not in excluded), None)


def _rename_value(model: Any, old: str, new: str) -> None:
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in [*model.graph.output, *model.graph.value_info]:
        if value.name == old:
            value.name = new


def _restore_output_names(model: Any, names: Sequence[str]) -> None:
    """Undo the ``_Q4``/``_Q8`` suffix Olive's RTN and HQQ passes give the outputs of the nodes they replace (the
    GenAI runtime reads ``logits`` by name)."""
    for output in list(model.graph.output):
        if output.name not in names:
            original = next((n for n in names if output.name.startswith(n + "_Q")), None)
            if original is not None:
                _rename_value(model, output.name, original)


def _tied_embedding(model: Any) -> _Tie | None:
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        source = producers.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if source is not None and source.op_type == "Transpose" and source.input[0] in initializers:
            return _Tie(node, source, source.input[0])
    return None


def _quantized_lm_head(model: Any, weight: str) -> Any:
    """The MatMulNBits that replaced the MatMul of ``weight`` (Olive and ONNX Runtime name its blocks
    ``<weight>_Q<bits>…``), or ``None``."""
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.input[1].startswith(weight + "_Q"):
            return node
    return None


def _shareable(model: Any, node: Any) -> bool:
    """Whether ``GatherBlockQuantized`` reads the node's blocks as they are: uint8 blocks, no or uint8 zero points."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    zero_point = node.input[3] if len(node.input) > 3 else ""
    return types.get(node.input[1]) == 2 and node.input[2] in types and (not zero_point or types.get(zero_point) == 2)


def _share_embedding(model: Any, tie: _Tie, node: Any) -> None:
    """``Gather(Transpose(W))`` → ``GatherBlockQuantized(Reshape(W's MatMulNBits blocks))``, as the builder's int4
    export ties them: the LM head's ``[N, blocks, blob]`` bytes are the embedding's rows, block-quantized along K."""
    from onnx import helper, numpy_helper

    attrs = {a.name: a.i for a in node.attribute}
    rows, blocks, bits, block = attrs["N"], attrs["K"] // attrs["block_size"], attrs["bits"], attrs["block_size"]
    initializers = {t.name: t for t in model.graph.initializer}
    initializers[node.input[2]].dims[:] = [rows, blocks]  # MatMulNBits takes [N * blocks] or [N, blocks]
    inputs = [tie.gather.name + "/blocks", tie.gather.input[1], node.input[2]]
    if len(node.input) > 3 and node.input[3]:
        initializers[node.input[3]].dims[:] = [rows, (blocks * bits + 7) // 8]
        inputs.append(node.input[3])
    row_bytes = np.array([rows, attrs["K"] * bits // 8], dtype=np.int64)
    shape = numpy_helper.from_array(row_bytes, tie.gather.name + "/shape")
    model.graph.initializer.append(shape)
    base = tie.gather.name.rsplit("/", 1)[0]
    reshape = helper.make_node("Reshape", [node.input[1], shape.name], [inputs[0]], name=base + "/Reshape")
    gather = helper.make_node("GatherBlockQuantized", inputs, list(tie.gather.output),
                              name=base + "/GatherBlockQuantized", domain="com.microsoft", bits=bits,
                              block_size=block, gather_axis=0, quantize_axis=1)
    _replace_nodes(model, {id(tie.gather): [reshape, gather], id(tie.transpose): []})


def _untie_embedding(model: Any, tie: _Tie) -> None:
    """``Gather(Transpose(W))`` → ``Gather(Wᵀ)`` with ``Wᵀ`` an initializer of its own (the builder's untied layout)."""
    from onnx import numpy_helper

    weight = next(t for t in model.graph.initializer if t.name == tie.weight)
    table = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weight).T), "model.embed_tokens.weight")
    model.graph.initializer.append(table)
    tie.gather.input[0] = table.name
    _replace_nodes(model, {id(tie.transpose): []})


def _replace_nodes(model: Any, replacements: Mapping[int, Sequence[Any]]) -> None:
    nodes = []
    for node in model.graph.node:
        nodes.extend(replacements.get(id(node), [node]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _drop_unused_initializers(model: Any) -> None:
    """Remove weights no node reads any more (HQQ and the dynamic quantizer leave the float originals behind)."""
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    if len(kept) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)


def _write_quantized(folder: Path, staging: Path, plan: _Plan, model: Any, record: list[dict],
                     options: Mapping[str, Any]) -> Path:
    """The finished artifact in ``staging/final``: the graph stamped with its precision, its weights, the GenAI
    config and tokenizer of the base, and the record of the passes."""
    final = staging / "final"
    final.mkdir()
    del model.metadata_props[:]
    for key, value in ((_METADATA_PRECISION, plan.precision), ("mlflow_edge.options", json.dumps(dict(options)))):
        model.metadata_props.add(key=key, value=value)
    _save(model, final)
    for file in companion_files(folder):
        shutil.copyfile(file, final / file.name)
    (final / QUANTIZATION_RECORD).write_text(json.dumps({"precision": plan.precision, "passes": record}, indent=2))
    return final


# -- runtime ---------------------------------------------------------------------------------------------------------
def genai_model(folder: Path, threads: int, execution_provider: str = "cpu") -> Any:
    """The GenAI model folder loaded by ``onnxruntime_genai`` on ``execution_provider`` (checked), its session on
    ``threads`` intra-op threads (0: ONNX Runtime's default)."""
    og = require_genai()
    provider = check_execution_provider(execution_provider)
    try:
        config = og.Config(str(folder))
        if threads > 0:
            session = {"intra_op_num_threads": int(threads)}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        config.clear_providers()
        if provider != "cpu":
            config.append_provider(provider)
        return og.Model(config)
    except Exception as exc:  # onnxruntime_genai raises RuntimeError with ONNX Runtime's message
        raise EdgeError(f"ONNX Runtime GenAI cannot load {folder}: {first_line(exc)}") from exc


class ONNXRuntimeGenAIRunner:
    """A GenAI model folder on ``onnxruntime_genai``: one sequence, logits per position, greedy generation.

    ``reset()`` starts a fresh sequence and ``forward(tokens)`` appends ``tokens`` to it, returning their logits (the
    model's ``logits`` output, every position); the Runner protocol methods are built on those two.
    """

    def __init__(self, path: Path, threads: int, context_tokens: int, execution_provider: str = "cpu") -> None:
        folder = model_folder(Path(path))
        if folder is None:
            raise EdgeError(f"no ONNX Runtime GenAI model folder ({GENAI_CONFIG} and {MODEL_FILE}) at {path}")
        read_graph(folder)  # a corrupt or truncated model is refused before the runtime maps it
        self.execution_provider = check_execution_provider(execution_provider)
        limit = int(genai_config(folder)["model"].get("context_length") or context_tokens)
        if not 0 < context_tokens <= limit:
            raise EdgeError(f"context of {context_tokens} tokens is outside the model's context length of {limit}")
        self.session_options = {"intra_op_num_threads": int(threads)} if threads > 0 else {}
        self._model = genai_model(folder, threads, self.execution_provider)
        try:
            params = require_genai().GeneratorParams(self._model)
            params.set_search_options(max_length=int(context_tokens))
            self._generator = require_genai().Generator(self._model, params)
        except Exception as exc:  # onnxruntime_genai raises RuntimeError with ONNX Runtime's message
            raise EdgeError(f"ONNX Runtime GenAI cannot run {folder}: {first_line(exc)}") from exc
        self._n_ctx = int(context_tokens)
        self._position = 0

    @property
    def context_tokens(self) -> int:
        return self._n_ctx

    @property
    def genai_model(self) -> Any:
        """The ``onnxruntime_genai.Model`` this runner drives."""
        self._live()
        return self._model

    def _live(self) -> Any:
        if self._generator is None:
            raise EdgeError("this ONNX Runtime GenAI runner is closed")
        return self._generator

    def reset(self) -> None:
        """Start a fresh sequence."""
        generator = self._live()
        if self._position:
            generator.rewind_to(0)
        self._position = 0

    def _append(self, tokens: Sequence[int]) -> Any:
        generator = self._live()
        end = self._position + len(tokens)
        if not tokens:
            raise EdgeError("no tokens to process")
        if end > self._n_ctx:
            raise EdgeError(f"sequence of {end} tokens exceeds the context of {self._n_ctx}")
        try:
            generator.append_tokens(np.asarray(tokens, dtype=np.int32))
        except Exception as exc:
            raise EdgeError(f"ONNX Runtime GenAI failed: {first_line(exc)}") from exc
        self._position = end
        return generator

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Append ``tokens`` to the sequence; their logits ``[len(tokens), vocab]`` (one decoding step reads the last
        position's logits, a quarter of the cost of the model output per token)."""
        generator = self._append(tokens)
        return generator.get_logits()[0] if len(tokens) == 1 else generator.get_output("logits")[0]

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        self.reset()
        return np.asarray(self.forward(tokens), dtype=np.float32)

    def prefill(self, tokens: Sequence[int]) -> float:
        self.reset()
        start = time.perf_counter()
        self._append(tokens)
        return time.perf_counter() - start

    def _next_token(self, tokens: Sequence[int]) -> int:
        """Append ``tokens``; the argmax of the last position's logits."""
        return int(np.argmax(self._append(tokens).get_logits()[0, -1]))

    def generate(self, tokens: Sequence[int], max_new_tokens: int) -> Generation:
        if len(tokens) + max_new_tokens - 1 > self._n_ctx:
            length = len(tokens) + max_new_tokens - 1
            raise EdgeError(f"sequence of {length} tokens exceeds the context of {self._n_ctx}")
        self.reset()
        start = time.perf_counter()
        token = self._next_token(tokens)
        ttft = time.perf_counter() - start
        for _ in range(max_new_tokens - 1):
            token = self._next_token([token])
        total = time.perf_counter() - start
        return Generation(len(tokens), max_new_tokens, ttft, total)

    def close(self) -> None:
        self._generator = None
        self._model = None
