"""The ONNX Runtime backend's class: what it declares (precisions, options, targets), what the search samples and
knows before quantizing (bits per weight, resource needs), and the Protocol's steps on top of its modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from mlflow_edge.backends.base import Artifact, BaseBackend, Bits, OptionSpec, StageNeed
from mlflow_edge.backends.onnxruntime.calibration import calibration_record, calibration_windows
from mlflow_edge.backends.onnxruntime.convert import builder_architectures, export_folder
from mlflow_edge.backends.onnxruntime.folder import (
    GENAI_CONFIG,
    MODEL_FILE,
    graph_precision,
    model_folder,
    read_graph,
)
from mlflow_edge.backends.onnxruntime.framework import (
    EXECUTION_PROVIDERS,
    EXTRA,
    NAME,
    require_genai,
    require_olive_passes,
    runtime_from_env,
    searched_providers,
)
from mlflow_edge.backends.onnxruntime.plan import Request, check_request, make_plan
from mlflow_edge.backends.onnxruntime.precision import (
    BUILDER_PROVIDER,
    CONVERT_PRECISIONS,
    DATA_AWARE,
    FROM_FP16,
    INT8_DYNAMIC,
    INT8_STATIC,
    QUANTIZE_PRECISIONS,
    WEIGHT_ONLY,
    convert_precision,
    quantize_precision,
)
from mlflow_edge.backends.onnxruntime.quantize import quantize_folder
from mlflow_edge.backends.onnxruntime.runtime import ONNXRuntimeGenAIRunner
from mlflow_edge.errors import EdgeError


class ONNXRuntimeBackend(BaseBackend):
    """ONNX model folders for ONNX Runtime GenAI: model-builder export, Olive quantization, the GenAI runtime."""

    name: ClassVar[str] = NAME
    format: ClassVar[str] = "onnx"
    flavor: ClassVar[str] = "mlflow_edge.flavors.onnx"
    # the runtime, and onnx, which checks a model's files before the runtime maps them
    requirements: ClassVar[tuple[str, ...]] = ("onnxruntime-genai", "onnxruntime", "onnx")
    targets: ClassVar[Mapping[str, str]] = {"cpu": "primary", "nvidia-gpu": "primary", "intel-cpu": "secondary"}
    base_precision: ClassVar[str] = "fp32"  # the builder's CPU graph; fp16 is its GPU precision
    sweep_types: ClassVar[tuple[str, ...]] = ("int4_rtn", "int4_k_quant", "int4_hqq", "int8_rtn", INT8_DYNAMIC,
                                              INT8_STATIC)

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
            raise EdgeError(f"{exc.name} is not installed: {EXTRA}") from exc

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
        return self.artifact(folder, graph_precision(graph), source, {}, files)

    def starting_points(self) -> Sequence[Mapping[str, Any]]:
        # the builder's and `olive auto-opt --precision int4`'s int4 (RTN, symmetric, block 32, int8 compute on CPU),
        # and `--precision int8`'s dynamic quantization
        provider = searched_providers()
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
        providers = searched_providers()
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
        precision = convert_precision(precision)
        if reason := self.unsupported_reason(source):
            raise EdgeError(f"unsupported architecture: {reason}")
        require_genai()
        files = export_folder(Path(source.path), out_dir, precision, source.name)
        return self.artifact(out_dir, precision, source, {"builder_execution_provider": BUILDER_PROVIDER[precision]},
                             files)

    # -- quantize ------------------------------------------------------------------------------------------------
    def quantize(self, base: Artifact, out_dir: Path, precision: str, options: Mapping[str, Any] | None = None,
                 calibration: Any = None, source: Any = None) -> Artifact:
        request = self._request(precision, options)
        self.refuse_quantized(base, f"quantize an {' or '.join(CONVERT_PRECISIONS)} conversion")
        if base.precision.lower() == "fp16" and request.precision not in FROM_FP16:
            raise EdgeError(f"{request.precision} quantizes the fp32 conversion (its quantizer takes float32 "
                            f"weights and activations); from fp16 only {', '.join(FROM_FP16)}")
        folder = model_folder(Path(base.path))
        if folder is None:
            raise EdgeError(f"no ONNX Runtime GenAI model folder ({GENAI_CONFIG} and {MODEL_FILE}) at {base.path}")
        graph, _ = read_graph(folder)
        plan = make_plan(request, graph)
        windows = None
        if request.precision in DATA_AWARE:
            windows = calibration_windows(request, calibration, Path(source.path) if source is not None else folder)
        recorded = {**plan.recorded(), **calibration_record(calibration, windows), "base_precision": base.precision}
        require_olive_passes()
        files = quantize_folder(folder, out_dir, plan, windows, recorded)
        return self.artifact(out_dir, request.precision, base, recorded, files)

    def _request(self, precision: str, options: Mapping[str, Any] | None) -> Request:
        options = self.typed(options)
        return check_request(quantize_precision(precision), options)

    # -- load ----------------------------------------------------------------------------------------------------
    def load(self, artifact: Artifact, threads: int, context_tokens: int) -> "ONNXRuntimeGenAIRunner":
        settings = {**{k: v for k, v in artifact.options.items() if k == "execution_provider"}, **runtime_from_env()}
        return ONNXRuntimeGenAIRunner(artifact.path, threads=threads, context_tokens=context_tokens, **settings)

