"""OpenVINO + NNCF backend.

- ``convert``: optimum-intel's exporter (``optimum.exporters.openvino.main_export``, what ``optimum-cli export
  openvino`` runs) writes a stateful ``text-generation-with-past`` IR (``openvino_model.xml``/``.bin``, KV cache kept
  in the model's state) in ``f32``, ``f16`` or ``bf16`` (OpenVINO element types; optimum's ``fp32``/``fp16`` are
  accepted too), without weight compression, and the tokenizer beside it (HF files, plus the OpenVINO tokenizer
  models when ``openvino-tokenizers`` is installed).
- ``quantize``: NNCF on the IR.

  * weight compression (``nncf.compress_weights``), precision = a :class:`nncf.CompressWeightsMode` name
    (``INT8_SYM``, ``INT8_ASYM``, ``INT4_SYM``, ``INT4_ASYM``, ``INT3_SYM``, ``INT2_SYM``, ``NF4``, ``CB4``, ``MXFP4``,
    ``MXFP8_E4M3``, ``FP8_E4M3``, ``FP4``, ``NVFP4``), with NNCF's own options ``ratio``, ``group_size``,
    ``all_layers``, ``backup_mode``, ``sensitivity_metric``, ``awq``, ``scale_estimation``, ``gptq``,
    ``lora_correction``, ``subset_size`` and ``group_size_fallback_mode``;
  * ``INT8_PTQ``: full INT8 post-training quantization of weights and activations (``nncf.quantize``, transformer
    model type, options ``preset``, ``fast_bias_correction``, ``subset_size``). With ``max_drop`` set it runs
    ``nncf.quantize_with_accuracy_control`` instead: the metric is ``1 / perplexity`` on held-out calibration
    windows and the drop is relative by default (``drop_type``), so ``max_drop=0.05`` keeps the quantized IR's
    ``reference perplexity / perplexity`` at or above 0.95 on that text, the project's ``accuracy_retention`` gate
    (measured against the IR before quantization); NNCF reverts the most harmful quantizers until it holds.
  * ``MIXED`` with option ``recipe`` (a recipe file, :mod:`mlflow_edge.recipes`): every weight at its rule's type,
    the others at ``default_type``. Recipe patterns match the names of the IR's weight constants, which NNCF keeps
    through compression, as the PyTorch parameters they came from (``self.model.layers.0.mlp.down_proj.weight``,
    ``self.model.embed_tokens.weight``: one name per weight, so a tied embedding and output layer are one entry; the
    same in an f32, f16 or bf16 IR, :func:`layer_name`); types are ``INT8_SYM``, ``INT8_ASYM``,
    ``INT4_SYM``, ``INT4_ASYM``, ``NF4`` and ``NONE`` (left uncompressed, at the IR's float type); the architecture is
    the ``model_type`` of the ``config.json`` beside the IR. The recipe is checked against the base before anything is
    written. It is applied through NNCF's public API: one ``compress_weights`` per mode, with every weight of another
    type in ``ignored_scope`` (NNCF matches weight constant names there; a weight compressed by an earlier call is no
    float weight any more and is left alone), 4-bit modes at ``ratio=1``, ``all_layers`` and ``group_size`` /
    ``group_size_fallback_mode`` (the only other options ``MIXED`` takes), 8-bit modes per output channel.
    NNCF then records only the last call's arguments in the IR's ``rt_info``.
  * Every weight-compression artifact whose weights end at more than one of those types (a 4-bit mode keeps
    ``ratio``'s remainder, and the embeddings unless ``all_layers``, in ``backup_mode`` by its ``sensitivity_metric``)
    and every ``MIXED`` one carries ``recipe.json`` beside ``openvino_model.xml``: the types read back from the
    compressed IR (element type of each weight constant, zero point or not), one exact rule per weight off the most
    common type, ``recipe_sha256`` in its options; not one of the artifact's files, and logged under the run's
    ``recipe/``, not in the model. Applied to the same base with the same group size options it gives the same
    ``openvino_model.bin``, byte for byte (an activation-based ``sensitivity_metric`` only ranks the layers). AWQ,
    scale estimation, GPTQ and LoRA correction change weights and scales beyond their types, so their artifacts carry
    no recipe (a recipe of their types would not reproduce them).

  Data-aware methods (AWQ, scale estimation, GPTQ, LoRA correction, an activation-based ``sensitivity_metric``,
  ``INT8_PTQ``) read the calibration text, tokenized with the source tokenizer into ``subset_size`` windows of
  ``calibration_tokens`` tokens, fed with the inputs of the stateful model (``input_ids``, ``attention_mask``,
  ``position_ids``, ``beam_idx``).
- ``load``: an :class:`OpenVINORunner` on the OpenVINO runtime (per-position logits of a fresh sequence, timed greedy
  generation that reuses the KV state).

Runtime options, read at load time (the environment wins over the artifact's options, which ``quantize`` records when
given; ``convert`` records none):

``device`` / ``MLFLOW_EDGE_OPENVINO_DEVICE``
    ``CPU`` (default), ``GPU``, ``NPU``, ``AUTO`` or an indexed device (``GPU.1``); a device that
    ``openvino.Core().available_devices`` lacks is refused.
``performance_hint`` / ``MLFLOW_EDGE_OPENVINO_PERFORMANCE_HINT``
    ``LATENCY`` (default) or ``THROUGHPUT``.
``inference_precision`` / ``MLFLOW_EDGE_OPENVINO_INFERENCE_PRECISION``
    ``INFERENCE_PRECISION_HINT`` (``f32``, ``f16``, ``bf16``); default: the device's own (``bf16`` on CPUs with
    native bf16, else ``f32``).

``threads`` sets ``INFERENCE_NUM_THREADS`` on CPU.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from mlflow_edge import recipes
from mlflow_edge.backends.base import (
    Artifact,
    Bits,
    Generation,
    OptionSpec,
    StageNeed,
    option_bool,
    typed_options,
)
from mlflow_edge.errors import EdgeError

MODEL_XML = "openvino_model.xml"
MODEL_BIN = "openvino_model.bin"
CONVERT_PRECISIONS = ("f32", "f16", "bf16")
_CONVERT_ALIASES = {"fp32": "f32", "fp16": "f16"}
_OPTIMUM_DTYPE = {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}
_FLOAT_PRECISIONS = frozenset(CONVERT_PRECISIONS)
EXPORT_TASK = "text-generation-with-past"

PTQ_PRECISION = "INT8_PTQ"
# CODEBOOK and ADAPTIVE_CODEBOOK need a user codebook (advanced parameters): not offered
_UNOFFERED_MODES = frozenset({"CODEBOOK", "ADAPTIVE_CODEBOOK"})
FOUR_BIT_MODES = ("INT4_SYM", "INT4_ASYM", "NF4")
DEVICES = ("CPU", "GPU", "NPU", "AUTO")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
RUNTIME_OPTIONS = ("device", "performance_hint", "inference_precision")
ENV_PREFIX = "MLFLOW_EDGE_OPENVINO_"
# files of the artifact folder that are not the model but travel with it (tokenizer, configs)
_COMPANION_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "openvino_tokenizer.*", "openvino_detokenizer.*")
# the cache's own records, and optimum's quantization config (stale once NNCF has run)
_NOT_COMPANIONS = frozenset({"artifact.json", "key.json", "openvino_config.json"})

_WEIGHT_OPTIONS = ("ratio", "group_size", "all_layers", "backup_mode", "sensitivity_metric", "awq", "scale_estimation",
                   "gptq", "lora_correction")
_DATA_AWARE = ("awq", "scale_estimation", "gptq", "lora_correction")
_PTQ_OPTIONS = ("preset", "fast_bias_correction", "max_drop", "drop_type")
_GROUP_OPTIONS = ("group_size", "group_size_fallback_mode")

MIXED = "MIXED"
"""The precision whose per-layer types a recipe file decides (option ``recipe``)."""
RECIPE_FILE = "recipe.json"
UNCOMPRESSED = "NONE"
"""The recipe type of a layer left uncompressed, at the IR's float type (NNCF's ``BackupMode.NONE``)."""
RECIPE_MODES = ("INT8_SYM", "INT8_ASYM", "INT4_SYM", "INT4_ASYM", "NF4")
"""The NNCF modes a recipe may give a layer: those the compressed IR tells apart by its weight constant alone."""
RECIPE_TYPES = (*RECIPE_MODES, UNCOMPRESSED)
# a compressed weight constant's element type, and whether a zero point is subtracted from it -> its NNCF mode
_ELEMENT_MODES = {("i8", False): "INT8_SYM", ("u8", True): "INT8_ASYM", ("i4", False): "INT4_SYM",
                  ("u4", True): "INT4_ASYM", ("nf4", False): "NF4"}
_FLOAT_ELEMENTS = frozenset({"f64", "f32", "f16", "bf16"})
_WEIGHT_PORTS = {"MatMul": (0, 1), "Gather": (0,)}  # the ops NNCF compresses in an LLM, and their constant inputs
_DECOMPRESSION_OPS = frozenset({"Convert", "Reshape", "Subtract", "Multiply"})  # data on input 0
_F16_SUFFIX = "_compressed"
_PATCHED_PREFIX = "_openvino_orig_"


def require_openvino():
    """The ``openvino`` module, or a one-line error naming the extra to install."""
    try:
        import openvino
    except ImportError as exc:
        raise EdgeError("openvino is not installed: pip install 'mlflow-edge[openvino]'") from exc
    return openvino


def require_nncf():
    try:
        import nncf
    except ImportError as exc:
        raise EdgeError("nncf is not installed: pip install 'mlflow-edge[openvino]'") from exc
    return nncf


def compress_modes() -> tuple[str, ...]:
    """The :class:`nncf.CompressWeightsMode` names this backend offers."""
    return tuple(m.name for m in require_nncf().CompressWeightsMode if m.name not in _UNOFFERED_MODES)


def model_xml(path: Path) -> Path:
    """The IR file of an artifact path (its folder, or the ``.xml`` itself)."""
    path = Path(path)
    return path / MODEL_XML if path.is_dir() else path


def companion_files(folder: Path) -> list[Path]:
    """Tokenizer and config files beside the IR in ``folder`` (everything a runtime needs but the model files)."""
    found = {p for pattern in _COMPANION_PATTERNS for p in Path(folder).glob(pattern) if p.is_file()}
    return sorted(p for p in found if p.name not in _NOT_COMPANIONS | {MODEL_XML, MODEL_BIN, *recipes.SIDE_FILES})


def _first_line(exc: BaseException) -> str:
    """The reason in an exception: OpenVINO's messages open with location lines (``Exception from src/…``,
    ``Check '…' failed at …``) before it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    return (reasons or lines or [type(exc).__name__])[0][:300]


def _enum_name(enum: Any, option: str, value: Any) -> Any:
    """``enum[value]`` by member name (case-insensitive) or value, or a one-line error listing the choices."""
    text = str(getattr(value, "name", value)).strip()
    for member in enum:
        if text.upper() == member.name or text.lower() == str(member.value).lower():
            return member
    raise EdgeError(f"unknown {option} '{value}' (choose from {', '.join(m.name for m in enum)})")


class OpenVINOBackend:
    """OpenVINO IR artifacts: optimum-intel export, NNCF compression, the OpenVINO runtime."""

    name: ClassVar[str] = "openvino"
    format: ClassVar[str] = "openvino_ir"
    flavor: ClassVar[str] = "mlflow_edge.flavors.openvino"
    requirements: ClassVar[tuple[str, ...]] = ("openvino", "transformers")  # the runtime, and the HF tokenizer
    targets: ClassVar[Mapping[str, str]] = {
        "cpu": "primary", "intel-cpu": "primary", "intel-gpu": "primary", "intel-npu": "primary",
        "arm-cpu": "secondary", "arm-mobile": "secondary",
    }
    base_precision: ClassVar[str] = "f16"
    sweep_types: ClassVar[tuple[str, ...]] = ("INT8_SYM", "INT8_ASYM", "INT4_SYM", "INT4_ASYM", "NF4")
    # OpenVINO Model Server (2026.2+ builds the LLM graph of a local IR folder in memory; the folder needs the
    # openvino_tokenizer/detokenizer models); OpenAI-compatible API under /v3
    native_serve_commands: ClassVar[tuple[str, ...]] = (
        "ovms --model_path {model} --model_name {name} --task text_generation --rest_bind_address 127.0.0.1 "
        "--rest_port {port}",
    )

    def convert_precisions(self) -> Sequence[str]:
        return CONVERT_PRECISIONS

    def quantize_precisions(self) -> Sequence[str]:
        return (*compress_modes(), PTQ_PRECISION, MIXED)

    def option_specs(self) -> Sequence[OptionSpec]:
        return (
            OptionSpec("ratio", float, None, label="r{value}",
                       help="share of layers in the 4-bit mode, the rest in backup_mode (NNCF)"),
            OptionSpec("group_size", int, None, label="g{value}",
                       help="weights sharing one scale; -1 per output channel (NNCF)"),
            OptionSpec("group_size_fallback_mode", str, None, choices=("ERROR", "IGNORE", "ADJUST"),
                       help="what NNCF does with layers the group size does not divide"),
            OptionSpec("all_layers", bool, None, help="embeddings and the last MatMul in the primary mode too (NNCF)"),
            OptionSpec("backup_mode", str, None, choices=("NONE", "INT8_SYM", "INT8_ASYM", "MXFP8_E4M3", "FP8_E4M3"),
                       help="precision of the layers left out by ratio (NNCF)"),
            OptionSpec("sensitivity_metric", str, None, choices=(
                "WEIGHT_QUANTIZATION_ERROR", "HESSIAN_INPUT_ACTIVATION", "MEAN_ACTIVATION_VARIANCE",
                "MAX_ACTIVATION_VARIANCE", "MEAN_ACTIVATION_MAGNITUDE"),
                help="how NNCF ranks layers for ratio; all but WEIGHT_QUANTIZATION_ERROR read calibration text"),
            OptionSpec("awq", bool, None, help="activation-aware weight quantization (calibration text)"),
            OptionSpec("scale_estimation", bool, None, help="scales minimizing the layer output error (calibration)"),
            OptionSpec("gptq", bool, None, help="GPTQ weight correction (calibration text)"),
            OptionSpec("lora_correction", bool, None, help="low-rank correction of the error (calibration)"),
            OptionSpec("subset_size", int, None, help="calibration samples NNCF reads (default: 128 / 300 for PTQ)"),
            OptionSpec("calibration_tokens", int, 128, help="tokens per calibration sample"),
            OptionSpec("preset", str, None, choices=("PERFORMANCE", "MIXED"), help="INT8_PTQ: symmetric or mixed"),
            OptionSpec("fast_bias_correction", bool, None, help="INT8_PTQ: NNCF's fast bias correction"),
            OptionSpec("max_drop", float, None,
                       help="INT8_PTQ with accuracy control: largest drop of 1/perplexity on held-out calibration "
                            "text (relative by default: 0.05 keeps accuracy_retention >= 0.95)"),
            OptionSpec("drop_type", str, None, choices=("RELATIVE", "ABSOLUTE"), help="how max_drop is measured"),
            OptionSpec("recipe", str, None, help=f"{MIXED}: a recipe JSON file (weight constant pattern -> "
                       f"{', '.join(RECIPE_TYPES)}; see mlflow_edge.recipes)"),
            OptionSpec("device", str, None, help="runtime: CPU, GPU, NPU or AUTO (also NNCF's target device)"),
            OptionSpec("performance_hint", str, None, choices=PERFORMANCE_HINTS, help="runtime: PERFORMANCE_HINT"),
            OptionSpec("inference_precision", str, None, choices=("f32", "f16", "bf16"),
                       help="runtime: INFERENCE_PRECISION_HINT (default: the device's own)"),
        )

    def versions(self) -> Mapping[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        require_openvino()
        require_nncf()
        try:
            return {"openvino": version("openvino"), "nncf": version("nncf"), "optimum_intel": version("optimum-intel")}
        except PackageNotFoundError as exc:
            raise EdgeError(f"{exc.name} is not installed: pip install 'mlflow-edge[openvino]'") from exc

    def unsupported_reason(self, source: Any) -> str | None:
        return exportable_reason(source)

    def open_artifact(self, path: Path, source: Any) -> Artifact | None:
        xml = model_xml(path)
        if xml.name != MODEL_XML or not xml.is_file():
            return None
        model = _read_model(xml)  # a corrupt IR is refused here, in one line
        return self._artifact(xml.parent, _dominant_weight_type(model), source.name, source.sha256,
                              source.num_parameters, {})

    def starting_points(self) -> Sequence[Mapping[str, Any]]:
        # optimum-intel's own defaults: int8 weights (load_in_8bit), and int4 asym, group 64, ratio 0.8 with AWQ
        return ({"openvino.mode": "INT8_ASYM"},
                {"openvino.mode": "INT4_ASYM", "openvino.group_size": 64, "openvino.ratio": 0.8, "openvino.awq": True,
                 "openvino.scale_estimation": False})

    def search_space(self, trial: Any) -> tuple[str, dict[str, Any]]:
        mode = trial.suggest_categorical("openvino.mode", ["INT8_SYM", "INT8_ASYM", *FOUR_BIT_MODES])
        options: dict[str, Any] = {}
        if mode in FOUR_BIT_MODES:
            # 32 and 64 divide every layer of SmolLM2 (576 wide) and of the tiny test model (256)
            options["group_size"] = trial.suggest_categorical("openvino.group_size", [32, 64])
            options["ratio"] = trial.suggest_categorical("openvino.ratio", [0.8, 1.0])
            options["awq"] = trial.suggest_categorical("openvino.awq", [False, True])
            options["scale_estimation"] = trial.suggest_categorical("openvino.scale_estimation", [False, True])
            if options["awq"] or options["scale_estimation"]:
                options["subset_size"] = 32
        return mode, options

    def resource_needs(self, facts: Any) -> Sequence[StageNeed]:
        # optimum-intel's export loads the model in torch fp32 and traces it into an f16 IR; NNCF reads the IR and
        # holds the compressed copy beside it
        runtime, f16 = 1 << 30, facts.bytes_at("float16")
        return (StageNeed("openvino conversion (f16 IR)", runtime + facts.bytes_at("float32") + f16, f16,
                          "leave openvino out (--backends)"),
                StageNeed("openvino quantization (NNCF)", runtime + f16 + facts.parameters, facts.parameters,
                          "leave openvino out (--backends)"))

    def precision_bits(self, precision: str, options: Mapping[str, Any], source: Any) -> Bits | None:
        # NNCF: 8-bit modes per channel; 4-bit modes with an fp16 scale (and a 4-bit zero point when asymmetric) per
        # group on `ratio` of the layers, the rest in INT8_ASYM; AWQ and scale estimation are methods of their own
        mode = precision.upper()
        family = "nf4" if mode == "NF4" else "asym" if mode.endswith("_ASYM") else "sym"
        if mode in ("INT8_SYM", "INT8_ASYM"):
            return Bits(family, 8.0)
        if mode not in FOUR_BIT_MODES:
            return None
        group = int(options.get("group_size") or 128)
        ratio = float(options.get("ratio") if options.get("ratio") is not None else 1.0)
        four = 4 + (16 + (4 if family == "asym" else 0)) / group
        aware = "".join(f"+{name}" for name in ("awq", "scale_estimation", "gptq")
                        if option_bool(options.get(name, False)))
        return Bits(family + aware, ratio * four + (1 - ratio) * 8.0)

    # -- convert -------------------------------------------------------------------------------------------------
    def convert(self, source: Any, out_dir: Path, precision: str) -> Artifact:
        precision = _CONVERT_ALIASES.get(precision.lower(), precision.lower())
        if precision not in CONVERT_PRECISIONS:
            raise EdgeError(f"unknown OpenVINO conversion type '{precision}' "
                            f"(choose from {', '.join(CONVERT_PRECISIONS)})")
        if reason := exportable_reason(source):
            raise EdgeError(f"unsupported architecture: {reason}")
        import torch
        from optimum.exporters.openvino import main_export
        from optimum.intel import OVConfig

        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        created = not out_dir.exists()
        staging = out_dir / ".export.partial"
        shutil.rmtree(staging, ignore_errors=True)

        def fail(message: str) -> EdgeError:  # leave nothing behind
            shutil.rmtree(out_dir if created else staging, ignore_errors=True)
            return EdgeError(message)

        try:
            # an explicit OVConfig: no weight compression here (optimum would int8-compress models over 1B)
            main_export(str(source.path), output=staging, task=EXPORT_TASK,
                        ov_config=OVConfig(dtype=_OPTIMUM_DTYPE[precision]), stateful=True,
                        convert_tokenizer=_has_openvino_tokenizers(), local_files_only=True, trust_remote_code=False,
                        model_loading_kwargs={"torch_dtype": dtype})
        except Exception as exc:  # optimum and the converter raise many classes; one line names the cause
            raise fail(f"optimum-intel cannot export {source.name} to OpenVINO: {_first_line(exc)}") from exc
        if not (staging / MODEL_XML).is_file():
            raise fail(f"optimum-intel wrote no {MODEL_XML} for {source.name}")
        for item in staging.iterdir():
            item.replace(out_dir / item.name)
        staging.rmdir()
        return self._artifact(out_dir, precision, source.name, source.sha256, source.num_parameters,
                              {"weight_format": _OPTIMUM_DTYPE[precision]})

    def _artifact(self, folder: Path, precision: str, source_name: str, source_sha256: str, num_parameters: int,
                  options: Mapping[str, Any]) -> Artifact:
        return Artifact(path=folder, backend=self.name, format=self.format, precision=precision,
                        source_name=source_name, source_sha256=source_sha256, num_parameters=num_parameters,
                        options=dict(options), files=(folder / MODEL_XML, folder / MODEL_BIN))

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
        options = typed_options(self.name, self.option_specs(), options)
        precision = precision.upper()
        if precision not in self.quantize_precisions():
            raise EdgeError(f"unknown NNCF precision '{precision}' "
                            f"(choose from {', '.join(self.quantize_precisions())})")
        if base.precision.lower() not in _FLOAT_PRECISIONS:
            raise EdgeError(f"{base.path.name} is already quantized ({base.precision}); "
                            "quantize an f32/f16/bf16 conversion")
        _check_method_options(precision, options)
        runtime = _runtime_options(options)
        nncf = require_nncf()
        ov = require_openvino()
        model = _read_model(base.path)
        base_folder = model_xml(base.path).parent
        recipe = _checked_recipe(options["recipe"], model, base_folder) if precision == MIXED else None
        if recipe is not None:  # its recorded group size where the options leave it unset
            options = typed_options(self.name, self.option_specs(), recipes.with_settings(options, recipe))
            _check_method_options(precision, options)
        recorded: dict[str, Any] = {}
        samples: list[dict[str, np.ndarray]] = []
        if precision == PTQ_PRECISION or _needs_data(options):
            if calibration is None:
                raise EdgeError(f"{precision} with these options reads calibration text; none was given")
            seq_len = int(options.get("calibration_tokens", 128))
            if seq_len < 8:
                raise EdgeError(f"calibration_tokens must be at least 8, got {seq_len}")
            tokenizer_folder = Path(source.path) if source is not None else base_folder
            samples = _calibration_samples(model, _token_ids(calibration, tokenizer_folder), seq_len)
            recorded.update({"calibration_tokens": seq_len, "calib.dataset": calibration.label,
                             "calib.sha256": calibration.sha256})
        compressed, method_recorded = _run_nncf(nncf, model, precision, options, samples, runtime, recipe,
                                                base.source_name)
        recorded.update(method_recorded)
        recorded.update(runtime)
        written = _written_recipe(compressed, precision, options, base_folder, base.source_sha256)
        out_dir.mkdir(parents=True, exist_ok=True)
        ov.save_model(compressed, str(out_dir / MODEL_XML), compress_to_fp16=False)  # weights as NNCF left them
        for file in companion_files(base_folder):
            shutil.copyfile(file, out_dir / file.name)
        if written is not None:  # beside the IR, not one of the model's files (their sizes and hashes are the IR's)
            written.save(out_dir / RECIPE_FILE)
            recorded["recipe_sha256"] = written.digest()
        return self._artifact(out_dir, precision, base.source_name, base.source_sha256, base.num_parameters,
                              {**recorded, "base_precision": base.precision})

    # -- load ----------------------------------------------------------------------------------------------------
    def load(self, artifact: Artifact, threads: int, context_tokens: int) -> "OpenVINORunner":
        settings = {**{k: v for k, v in artifact.options.items() if k in RUNTIME_OPTIONS}, **runtime_from_env()}
        return OpenVINORunner(artifact.path, threads=threads, context_tokens=context_tokens, **settings)


# -- helpers: export -------------------------------------------------------------------------------------------------
def exportable_reason(source: Any) -> str | None:
    """``None`` when optimum-intel exports the source's ``model_type`` as a stateful causal LM, else why not.

    optimum-intel picks its export config by ``model_type`` (not by the architecture class), so that is what counts.
    """
    import json

    try:
        import optimum.exporters.openvino  # noqa: F401  (registers the OpenVINO export configs)
        from optimum.exporters.tasks import TasksManager
    except ImportError:
        return "optimum-intel is not installed: pip install 'mlflow-edge[openvino]'"
    try:
        model_type = str(json.loads((Path(source.path) / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError) as exc:
        return f"cannot read the config of {source.name}: {_first_line(exc)}"
    supported = TasksManager.get_supported_model_type_for_task(EXPORT_TASK, exporter="openvino")
    if model_type.replace("_", "-") in supported or model_type in supported:
        return None
    return (f"optimum-intel has no OpenVINO {EXPORT_TASK} export for {source.architecture} "
            f"(model_type '{model_type}', {len(supported)} model types supported)")


def _has_openvino_tokenizers() -> bool:
    try:
        import openvino_tokenizers  # noqa: F401
    except Exception:  # not installed, or built for another OpenVINO
        return False
    return True


# -- helpers: quantize -----------------------------------------------------------------------------------------------
def _read_model(path: Path) -> Any:
    ov = require_openvino()
    xml = model_xml(path)
    if not xml.is_file():
        raise EdgeError(f"no OpenVINO IR at {xml}")
    try:
        return ov.Core().read_model(str(xml))
    except Exception as exc:
        raise EdgeError(f"OpenVINO cannot read {xml}: {_first_line(exc)}") from exc


def _dominant_weight_type(model: Any) -> str:
    """The element type holding most constant bytes of ``model`` (``f16``, ``u8``, ``u4`` …): a local IR's precision."""
    totals: dict[str, int] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant":
            element = op.get_output_element_type(0)
            totals[element.get_type_name()] = totals.get(element.get_type_name(), 0) + op.get_byte_size()
    return max(totals, key=totals.__getitem__) if totals else "unknown"


def _needs_data(options: Mapping[str, Any]) -> bool:
    metric = str(options.get("sensitivity_metric", "WEIGHT_QUANTIZATION_ERROR")).upper()
    return any(option_bool(options.get(name, False)) for name in _DATA_AWARE) or metric != "WEIGHT_QUANTIZATION_ERROR"


def _runtime_options(options: Mapping[str, Any]) -> dict[str, str]:
    """The runtime options among ``options``, normalized (device upper case, hint checked)."""
    runtime = {k: str(options[k]) for k in RUNTIME_OPTIONS if k in options}
    if "device" in runtime:
        runtime["device"] = runtime["device"].upper()
        if runtime["device"].split(".")[0] not in DEVICES:
            raise EdgeError(f"unknown device '{options['device']}' (choose from {', '.join(DEVICES)})")
    if "performance_hint" in runtime:
        runtime["performance_hint"] = runtime["performance_hint"].upper()  # the choices are checked already
    if "inference_precision" in runtime:
        runtime["inference_precision"] = runtime["inference_precision"].lower()
    return runtime


def runtime_from_env() -> dict[str, str]:
    """Runtime options from ``MLFLOW_EDGE_OPENVINO_DEVICE`` / ``_PERFORMANCE_HINT`` / ``_INFERENCE_PRECISION``."""
    return {k: os.environ[ENV_PREFIX + k.upper()] for k in RUNTIME_OPTIONS if os.environ.get(ENV_PREFIX + k.upper())}


def _token_ids(calibration: Any, tokenizer_folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    return tokenizer(calibration.text(), add_special_tokens=False)["input_ids"]


def _calibration_samples(model: Any, token_ids: Sequence[int], seq_len: int) -> list[dict[str, np.ndarray]]:
    """Consecutive windows of ``seq_len`` tokens, each a fresh sequence for the stateful IR's inputs."""
    names = {name for port in model.inputs for name in port.get_names()}
    count = len(token_ids) // seq_len
    if count < 1:
        raise EdgeError(f"calibration text has {len(token_ids)} tokens, fewer than one sample of {seq_len}")
    samples = []
    for window in range(count):
        ids = np.asarray(token_ids[window * seq_len : (window + 1) * seq_len], dtype=np.int64)[None, :]
        sample = {"input_ids": ids}
        if "attention_mask" in names:
            sample["attention_mask"] = np.ones_like(ids)
        if "position_ids" in names:
            sample["position_ids"] = np.arange(seq_len, dtype=np.int64)[None, :]
        if "beam_idx" in names:
            sample["beam_idx"] = np.zeros(1, dtype=np.int32)
        samples.append(sample)
    return samples


def _run_nncf(nncf: Any, model: Any, precision: str, options: Mapping[str, Any],
              samples: list[dict[str, np.ndarray]], runtime: Mapping[str, str], recipe: recipes.Recipe | None,
              source_name: str) -> tuple[Any, dict[str, Any]]:
    """``model`` quantized by NNCF the way ``precision`` says, and the options that decided it; one line on failure."""
    try:
        if precision == PTQ_PRECISION:
            return _post_training_quantize(nncf, model, options, samples, runtime)
        if precision == MIXED:
            return _apply_recipe(nncf, model, recipe, options)
        return _compress_weights(nncf, model, precision, options, samples)
    except EdgeError:
        raise
    except Exception as exc:  # nncf.ValidationError, InvalidGroupSizeError, ParameterNotSupportedError, ...
        raise EdgeError(f"NNCF cannot quantize {source_name} to {precision}: {_first_line(exc)}") from exc


def _check_method_options(precision: str, options: Mapping[str, Any]) -> None:
    """Refuse options of another method: weight compression's with ``INT8_PTQ``, PTQ's with weight compression,
    ``recipe`` without :data:`MIXED`, and with it anything but the group size and runtime options."""
    if "recipe" in options and precision != MIXED:
        raise EdgeError(f"recipe applies with precision {MIXED}, not {precision}")
    if precision == MIXED:
        if not options.get("recipe"):
            raise EdgeError(f"precision {MIXED} needs recipe=<a recipe JSON file>")
        if misplaced := sorted(set(options) - {"recipe", *_GROUP_OPTIONS, *RUNTIME_OPTIONS}):
            raise EdgeError(f"{', '.join(misplaced)} do(es) not apply to {MIXED}: the recipe decides every layer's "
                            "type, data-free")
    elif precision == PTQ_PRECISION:
        if misplaced := sorted(set(options) & set(_WEIGHT_OPTIONS)):
            raise EdgeError(f"{', '.join(misplaced)} apply to weight compression, not {PTQ_PRECISION}")
    elif misplaced := sorted(set(options) & set(_PTQ_OPTIONS)):
        raise EdgeError(f"{', '.join(misplaced)} apply to {PTQ_PRECISION} only, not {precision}")


def _group_arguments(nncf: Any, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``compress_weights`` arguments of the group size options, and their recorded values."""
    kwargs: dict[str, Any] = {}
    recorded: dict[str, Any] = {}
    if "group_size" in options:
        kwargs["group_size"] = recorded["group_size"] = int(options["group_size"])
    if "group_size_fallback_mode" in options:
        from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

        fallback = _enum_name(GroupSizeFallbackMode, "group_size_fallback_mode", options["group_size_fallback_mode"])
        kwargs["advanced_parameters"] = AdvancedCompressionParameters(group_size_fallback_mode=fallback)
        recorded["group_size_fallback_mode"] = fallback.name
    return kwargs, recorded


def _compress_weights(nncf: Any, model: Any, mode: str, options: Mapping[str, Any],
                      samples: list[dict[str, np.ndarray]]) -> tuple[Any, dict[str, Any]]:
    kwargs, recorded = _group_arguments(nncf, options)
    kwargs["mode"] = nncf.CompressWeightsMode[mode]
    if "ratio" in options:
        kwargs["ratio"] = recorded["ratio"] = float(options["ratio"])
    for name in ("all_layers", *_DATA_AWARE):
        if name in options:
            kwargs[name] = recorded[name] = option_bool(options[name])
    if "backup_mode" in options:
        kwargs["backup_mode"] = _enum_name(nncf.BackupMode, "backup_mode", options["backup_mode"])
        recorded["backup_mode"] = kwargs["backup_mode"].name
    if "sensitivity_metric" in options:
        metric = options["sensitivity_metric"]
        kwargs["sensitivity_metric"] = _enum_name(nncf.SensitivityMetric, "sensitivity_metric", metric)
        recorded["sensitivity_metric"] = kwargs["sensitivity_metric"].name
    if samples:
        subset = int(options.get("subset_size", 128))
        kwargs["dataset"] = nncf.Dataset(samples[:subset])
        kwargs["subset_size"] = recorded["subset_size"] = subset
    return nncf.compress_weights(model, **kwargs), recorded


def _post_training_quantize(nncf: Any, model: Any, options: Mapping[str, Any], samples: list[dict[str, np.ndarray]],
                            runtime: Mapping[str, str]) -> tuple[Any, dict[str, Any]]:
    subset = int(options.get("subset_size", 300))
    kwargs: dict[str, Any] = {"model_type": nncf.ModelType.TRANSFORMER, "subset_size": subset}
    recorded: dict[str, Any] = {"subset_size": subset}
    if "preset" in options:
        kwargs["preset"] = _enum_name(nncf.QuantizationPreset, "preset", options["preset"])
        recorded["preset"] = kwargs["preset"].name
    if "fast_bias_correction" in options:
        kwargs["fast_bias_correction"] = recorded["fast_bias_correction"] = option_bool(options["fast_bias_correction"])
    if runtime.get("device", "").split(".")[0] in {"CPU", "GPU", "NPU"}:
        kwargs["target_device"] = nncf.TargetDevice[runtime["device"].split(".")[0]]
    if "max_drop" not in options:
        if "drop_type" in options:
            raise EdgeError("drop_type applies only with max_drop (accuracy control)")
        return nncf.quantize(model, nncf.Dataset(samples[:subset]), **kwargs), recorded
    max_drop = float(options["max_drop"])
    if not 0 <= max_drop < 1:
        raise EdgeError(f"max_drop must be in [0, 1), got {max_drop}")
    drop_type = _enum_name(nncf.DropType, "drop_type", options.get("drop_type", "RELATIVE"))
    if len(samples) < 2:
        raise EdgeError("accuracy control needs at least 2 calibration samples (one to calibrate, one to validate)")
    # the last windows (a quarter, at most 16) validate, the rest calibrate: the check never scores a calibration sample
    held_out = max(1, min(len(samples) // 4, 16))
    calibration, validation = samples[: len(samples) - held_out][:subset], samples[len(samples) - held_out :]
    recorded.update({"max_drop": max_drop, "drop_type": drop_type.name, "validation_samples": len(validation)})
    quantized = nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(calibration), nncf.Dataset(validation), validation_fn=_inverse_perplexity,
        max_drop=max_drop, drop_type=drop_type, **kwargs)
    return quantized, recorded


def _inverse_perplexity(compiled_model: Any, validation_data: Any) -> tuple[float, list[float]]:
    """``1 / perplexity`` of the next tokens over all validation windows, and per window (higher is better)."""
    request = compiled_model.create_infer_request()
    sums, counts = [], []
    for item in validation_data:
        request.reset_state()
        logits = np.asarray(request.infer(item)[compiled_model.output(0)], dtype=np.float64)[0, :-1]
        targets = item["input_ids"][0, 1:]
        peak = logits.max(axis=-1, keepdims=True)
        log_z = (peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=-1)))
        logprobs = logits[np.arange(len(targets)), targets] - log_z
        sums.append(float(logprobs.sum()))
        counts.append(len(targets))
    per_window = [float(np.exp(s / c)) for s, c in zip(sums, counts)]
    return float(np.exp(sum(sums) / sum(counts))), per_window


# -- per-layer recipes -----------------------------------------------------------------------------------------------
def layer_types(model: Any) -> dict[str, str]:
    """The recipe type of every weight NNCF compresses in ``model`` (a matrix constant on a MatMul input or the data of
    an embedding Gather), by layer name (:func:`_weights`), in graph order: :data:`UNCOMPRESSED` while float, else the
    mode its compressed constant says (element type, and a zero point or not); a tied weight is one entry."""
    return {layer: kind for layer, (_, kind) in _weights(model).items()}


def _weights(model: Any) -> dict[str, tuple[str, str]]:
    """Layer name (:func:`layer_name`) -> (weight constant name, recipe type); NNCF's ``ignored_scope`` takes the
    constant's own name."""
    weights: dict[str, tuple[str, str]] = {}
    for op in model.get_ordered_ops():
        for port in _WEIGHT_PORTS.get(op.get_type_name(), ()):
            if found := _weight_type(op.input_value(port)):
                weights.setdefault(layer_name(found[0]), found)
    return weights


def layer_name(constant: str) -> str:
    """The PyTorch parameter a weight constant was exported from (``self.model.layers.0.mlp.down_proj.weight``), so a
    recipe names the weights of an f32, f16 or bf16 IR alike: the constant's name without the ``_compressed`` that
    OpenVINO appends to the constants it stores in f16, nor the ``_openvino_orig_`` prefix under which the PyTorch
    frontend keeps 16-bit weights (``down_proj._openvino_orig_weight``)."""
    module, dot, attribute = constant.removesuffix(_F16_SUFFIX).rpartition(".")
    return module + dot + attribute.removeprefix(_PATCHED_PREFIX)


def _weight_type(value: Any) -> tuple[str, str] | None:
    """(constant name, recipe type) of the weight behind an op input, through NNCF's decompression subgraph
    (``Convert``, ``Subtract`` of the zero point, ``Multiply`` by the scale, ``Reshape`` of the groups); ``None`` when
    no weight is behind it."""
    node, zero_point, scaled = value.get_node(), False, False
    while node.get_type_name() in _DECOMPRESSION_OPS:
        zero_point |= node.get_type_name() == "Subtract"
        scaled |= node.get_type_name() == "Multiply"
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        return None
    element, shape = node.get_output_element_type(0).get_type_name(), list(node.get_output_shape(0))
    if scaled and element not in _FLOAT_ELEMENTS:
        return node.get_friendly_name(), _ELEMENT_MODES.get((element, zero_point), element.upper())
    if not scaled and element in _FLOAT_ELEMENTS and len(shape) >= 2 and min(shape[-2:]) > 1:
        return node.get_friendly_name(), UNCOMPRESSED
    return None


def ir_architecture(folder: Path) -> str | None:
    """The ``model_type`` of the ``config.json`` that optimum-intel writes beside the IR (``None`` without one)."""
    try:
        return str(json.loads((Path(folder) / "config.json").read_text())["model_type"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def extract_recipe(kinds: Mapping[str, str], architecture: str, source_sha256: str | None = None,
                   settings: Mapping[str, Any] | None = None) -> recipes.Recipe:
    """The per-layer types of a compressed model (``kinds``, :func:`layer_types`) as a recipe: one exact rule per
    layer whose type differs from the most common one, the default; ``settings``: the group size options it was made
    with."""
    default = collections.Counter(kinds.values()).most_common(1)[0][0]
    return recipes.recipe_from_allocation({name: kind for name, kind in kinds.items() if kind != default},
                                          backend=OpenVINOBackend.name, architecture=architecture,
                                          default_type=default, source_sha256=source_sha256, settings=settings)


def _checked_recipe(path: str, model: Any, folder: Path) -> recipes.Recipe:
    """The recipe file ``path``, validated against the float IR ``model`` before anything is written."""
    recipe = recipes.load_recipe(path)
    architecture = ir_architecture(folder)
    if architecture is None:
        raise EdgeError(f"no config.json with a model_type beside {model_xml(folder)}: a recipe needs the architecture")
    layers = list(layer_types(model))
    recipes.validate_against(recipe, layers, architecture, RECIPE_TYPES, OpenVINOBackend.name)
    if all(recipe.type_of(name) == UNCOMPRESSED for name in layers):
        raise EdgeError(f"the recipe leaves every layer uncompressed ({UNCOMPRESSED})")
    return recipe


def _apply_recipe(nncf: Any, model: Any, recipe: recipes.Recipe,
                  options: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Every layer at its recipe type: one ``compress_weights`` per mode, with every other layer in its
    ``ignored_scope`` (a layer compressed by an earlier call is no float weight any more: NNCF leaves it alone);
    4-bit modes at ``ratio=1``, ``all_layers`` and the group size options, 8-bit ones per channel."""
    weights = _weights(model)
    wanted = {layer: recipe.type_of(layer) for layer in weights}
    group_kwargs, recorded = _group_arguments(nncf, options)
    for mode in (m for m in RECIPE_MODES if m in wanted.values()):
        others = [weights[layer][0] for layer, kind in wanted.items() if kind != mode]
        kwargs: dict[str, Any] = {"mode": nncf.CompressWeightsMode[mode],
                                  "ignored_scope": nncf.IgnoredScope(names=others)}
        if not mode.startswith("INT8"):
            kwargs.update(ratio=1.0, all_layers=True, **group_kwargs)
        model = nncf.compress_weights(model, **kwargs)
    for name, kind in layer_types(model).items():
        if kind != wanted.get(name, kind):
            raise EdgeError(f"NNCF left layer {name} at {kind}, not the recipe's {wanted[name]}")
    return model, {"recipe": str(options["recipe"]), **recorded}


def _written_recipe(model: Any, precision: str, options: Mapping[str, Any], folder: Path,
                    source_sha256: str) -> recipes.Recipe | None:
    """The recipe an artifact carries: its layers' types when they are more than one (a 4-bit mode keeps some in
    ``backup_mode``) or came from a recipe, all of them :data:`RECIPE_TYPES`, and the architecture known. None after
    a method that changes the weights beyond their types (AWQ, scale estimation, GPTQ, LoRA correction): a recipe
    of its types would not reproduce it."""
    if precision == PTQ_PRECISION or any(option_bool(options.get(name, False)) for name in _DATA_AWARE):
        return None
    kinds = layer_types(model)
    found = set(kinds.values())
    architecture = ir_architecture(folder)
    if not found <= set(RECIPE_TYPES) or architecture is None or (len(found) < 2 and precision != MIXED):
        return None
    return extract_recipe(kinds, architecture, source_sha256, {k: options[k] for k in _GROUP_OPTIONS if k in options})


# -- runtime -------------------------------------------------------------------------------------------------------
def check_device(core: Any, device: str) -> str:
    """``device`` upper-cased when OpenVINO has it here (``AUTO`` always), else a one-line error."""
    device = device.upper()
    available = list(core.available_devices)
    family = device.split(".")[0]
    if family == "AUTO" or device in available or (device == family and family in {d.split(".")[0] for d in available}):
        return device
    raise EdgeError(f"OpenVINO device '{device}' is not present on this machine "
                    f"(available: {', '.join(available) or 'none'})")


class OpenVINORunner:
    """A stateful causal-LM IR on the OpenVINO runtime: one sequence, logits per position, greedy generation.

    ``reset()`` starts a fresh sequence (clears the KV state) and ``forward(tokens)`` appends ``tokens`` to it,
    returning their logits; the Runner protocol methods are built on those two.
    """

    def __init__(self, path: Path, threads: int, context_tokens: int, device: str = "CPU",
                 performance_hint: str = "LATENCY", inference_precision: str | None = None) -> None:
        ov = require_openvino()
        core = ov.Core()
        self.device = check_device(core, device)
        hint = str(performance_hint).upper()
        if hint not in PERFORMANCE_HINTS:
            raise EdgeError(f"unknown performance_hint '{performance_hint}' "
                            f"(choose from {', '.join(PERFORMANCE_HINTS)})")
        model = _read_model(Path(path))
        names = {name for port in model.inputs for name in port.get_names()}
        if "input_ids" not in names or not model.get_sinks():
            raise EdgeError(f"{model_xml(Path(path))} is not a stateful causal-LM IR "
                            f"(optimum-intel {EXPORT_TASK})")
        self._has_mask, self._has_positions, self._has_beam = (
            "attention_mask" in names, "position_ids" in names, "beam_idx" in names)
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint}
        if self.device.startswith("CPU") and threads > 0:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if inference_precision:
            config["INFERENCE_PRECISION_HINT"] = str(inference_precision).lower()
        try:
            compiled = core.compile_model(model, self.device, config)
        except Exception as exc:
            raise EdgeError(f"OpenVINO cannot compile {model_xml(Path(path))} for {self.device}: "
                            f"{_first_line(exc)}") from exc
        self.config = config
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._output = compiled.output(0)
        self._n_ctx = int(context_tokens)
        self._position = 0
        self._mask = np.ones((1, self._n_ctx), dtype=np.int64)
        self._positions = np.arange(self._n_ctx, dtype=np.int64)[None, :]
        self._beam = np.zeros(1, dtype=np.int32)

    @property
    def context_tokens(self) -> int:
        return self._n_ctx

    def reset(self) -> None:
        """Start a fresh sequence."""
        if self._request is None:
            raise EdgeError("this OpenVINO runner is closed")
        self._request.reset_state()
        self._position = 0

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Append ``tokens`` to the sequence; their logits ``[len(tokens), vocab]``, valid until the next call."""
        if self._request is None:
            raise EdgeError("this OpenVINO runner is closed")
        start, end = self._position, self._position + len(tokens)
        if end > self._n_ctx:
            raise EdgeError(f"sequence of {end} tokens exceeds the context of {self._n_ctx}")
        inputs: dict[str, np.ndarray] = {"input_ids": np.asarray(tokens, dtype=np.int64).reshape(1, -1)}
        if self._has_mask:
            inputs["attention_mask"] = self._mask[:, :end]
        if self._has_positions:
            inputs["position_ids"] = self._positions[:, start:end]
        if self._has_beam:
            inputs["beam_idx"] = self._beam
        self._request.infer(inputs, share_inputs=True)
        self._position = end
        return self._request.get_tensor(self._output).data[0]

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        self.reset()
        return np.array(self.forward(tokens), dtype=np.float32)

    def prefill(self, tokens: Sequence[int]) -> float:
        self.reset()
        start = time.perf_counter()
        self.forward(tokens)
        return time.perf_counter() - start

    def generate(self, tokens: Sequence[int], max_new_tokens: int) -> Generation:
        if len(tokens) + max_new_tokens - 1 > self._n_ctx:
            length = len(tokens) + max_new_tokens - 1
            raise EdgeError(f"sequence of {length} tokens exceeds the context of {self._n_ctx}")
        self.reset()
        start = time.perf_counter()
        token = int(self.forward(tokens)[-1].argmax())
        ttft = time.perf_counter() - start
        for _ in range(max_new_tokens - 1):
            token = int(self.forward([token])[-1].argmax())
        total = time.perf_counter() - start
        return Generation(len(tokens), max_new_tokens, ttft, total)

    def close(self) -> None:
        self._request = None
        self._compiled = None
