"""Apple MLX backend (``mlx`` + ``mlx-lm``): MLX safetensors folders, mlx-lm's conversion and quantizers.

- ``convert``: ``mlx_lm.convert`` (HF checkpoint → MLX folder: ``model.safetensors``, ``config.json`` and the source
  tokenizer) at a float dtype, ``float32``, ``float16`` or ``bfloat16`` (mlx-lm's ``MODEL_CONVERSION_DTYPES``;
  ``f32``/``fp32``, ``f16``/``fp16`` and ``bf16`` are accepted too). mlx-lm 0.31's model classes read the rotary base
  from the legacy key ``rope_theta`` while transformers 5 writes it only inside ``rope_parameters``; the conversion
  writes the legacy keys into ``config.json`` so the MLX model is the source model.
- ``quantize``: from a float conversion, through mlx-lm's own functions (``load`` → optional LoRA fuse → dtype cast →
  quantization → ``save``, what ``mlx_lm.convert -q``, ``mlx_lm.fuse``, ``mlx_lm.dynamic_quant`` and ``mlx_lm.awq``
  do). Precision names:

  * ``q<bits>_g<group>``: affine (``mlx_lm.convert -q --q-bits --q-group-size``), bits 2, 3, 4, 5, 6, 8 and group
    sizes 32, 64, 128 (those this mlx supports); ``q4_g64`` is mlx-lm's default.
  * ``mxfp4``, ``nvfp4``, ``mxfp8``: the microscaling modes (``--q-mode``; their bits and group size are fixed).
  * ``mixed_2_6``, ``mixed_3_4``, ``mixed_3_6``, ``mixed_4_6``: mlx-lm's mixed recipes (``--quant-predicate``), low
    bits everywhere and high bits for ``v_proj``/``down_proj`` of some layers and ``lm_head``; option
    ``q_group_size``.
  * ``dynamic_<bpw>bpw`` (e.g. ``dynamic_4.5bpw``): ``mlx_lm.dynamic_quant``. Layer sensitivities (the gradient of the
    KL divergence to the float model on calibration text), then mlx-lm's threshold for the target bits per weight
    as mlx-lm computes it (``compute_bits_per_weight``, scales included), raised where mlx-lm's search overshoots so
    the target is a ceiling: layers more sensitive than the threshold get ``high_bits``, the rest ``low_bits``.
    Options ``low_bits``/``low_group_size``/``high_bits``/``high_group_size`` (mlx-lm's defaults 4/64/5/64),
    ``num_samples``, ``sequence_length``. A target outside what those bits reach is refused.
  * ``awq_q<bits>_g<group>``: ``mlx_lm.awq`` (activation-aware scaling and clipping per block on calibration text;
    embeddings at ``embed_bits``/``embed_group_size``), for the model types mlx-lm has an AWQ config for; options
    ``n_grid``, ``num_samples``, ``sequence_length``. CPU cost grows with layers × ``n_grid``: minutes for small models.
  * ``mixed`` with option ``recipe`` (a recipe file, :mod:`mlflow_edge.recipes`): every layer at its rule's type,
    the others at ``default_type``. Layers are the module paths mlx-lm's quantization predicate sees
    (``model.layers.0.self_attn.q_proj``, ``model.embed_tokens``, ``lm_head``); types are the uniform precisions
    above (``q4_g64``, ``mxfp4`` …) and the quantization's ``dtype`` (``float32`` …) for a layer left unquantized;
    the architecture is ``config.json``'s ``model_type``. The recipe is checked against the base before anything is
    written. Every ``mixed_*``, ``dynamic_*`` and ``mixed`` artifact carries ``recipe.json``: its per-layer types as
    mlx-lm reads them back, one exact rule per layer off the most common type (``recipe_sha256`` in its options);
    applying that file to the same base with the same ``dtype`` and adapter gives the same weight files, byte for byte.

  Data-aware methods read ``num_samples`` consecutive windows of ``sequence_length`` tokens of the calibration text
  (tokenized with the source tokenizer) and record ``calib.dataset``/``calib.sha256``. Every quantization takes
  ``dtype`` (the float type of the unquantized parameters and of the scales; default: the base's) and
  ``adapter_path`` (an mlx-lm LoRA/DoRA adapter folder: ``adapters.safetensors`` + ``adapter_config.json``) with
  ``fuse_adapter`` (fuse it before quantizing, as ``mlx_lm.fuse`` does; otherwise it travels in the artifact's
  ``adapters/`` folder and is applied at load). An adapter whose weights do not match the model is refused.
  Group sizes must divide every quantized layer (mlx-lm would leave such layers silently unquantized).
- ``load``: an :class:`MLXRunner` (per-position logits, mlx-lm's ``generate_step`` with its KV cache
  ``make_prompt_cache``).

On this kind of Linux CPU (the ``mlx[cpu]`` wheel) MLX runs each stream on one thread and has no thread setting, so
``threads`` is accepted and not applied; its quantized kernels are fast with ``float32`` scales and far slower with
``float16``/``bfloat16`` ones, hence ``base_precision = "float32"`` (4-bit, group 64 is then 5.0 bits per weight; on
Apple silicon quantize a ``float16`` conversion, or pass ``dtype=float16``, for mlx-lm's 4.5).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import re
import shutil
import struct
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np

from mlflow_edge import recipes
from mlflow_edge.backends.base import Artifact, Bits, Generation, OptionSpec, StageNeed, typed_options
from mlflow_edge.errors import EdgeError, first_line

CONVERT_PRECISIONS = ("float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"f32": "float32", "fp32": "float32", "f16": "float16", "fp16": "float16", "bf16": "bfloat16"}
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}  # mode → (bits, group size), fixed by the format
RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
MIXED = "mixed"
"""The precision whose layer types a recipe file decides (option ``recipe``)."""
RECIPE_FILE = "recipe.json"
DYNAMIC_TARGETS = tuple(f"dynamic_{bpw:g}bpw" for bpw in np.arange(3.0, 8.5, 0.5))  # listed; any target is accepted
ADAPTER_DIR = "adapters"
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_STAGING = ".mlx.partial"
_RUNTIME_DISTRIBUTIONS = ("mlx-cpu", "mlx-cuda-13", "mlx-cuda-12", "mlx-metal")  # where libmlx comes from

_DYNAMIC_OPTIONS = ("low_bits", "low_group_size", "high_bits", "high_group_size")
_AWQ_OPTIONS = ("embed_bits", "embed_group_size", "n_grid")
_DATA_OPTIONS = ("num_samples", "sequence_length")


def require_mlx_lm():
    """The ``mlx_lm`` module (and MLX under it), or a one-line error naming the extra to install."""
    try:
        import mlx.core  # noqa: F401
        import mlx_lm
    except ImportError as exc:
        raise EdgeError("mlx-lm is not installed: pip install 'mlflow-edge[mlx]'") from exc
    return mlx_lm


def runtime_distributions() -> tuple[str, ...]:
    """pip distributions an MLX artifact needs at run time: ``mlx``, ``mlx-lm`` and the installed MLX backend
    library (``mlx-cpu`` on Linux CPUs, ``mlx-metal`` on macOS), which ``mlx`` alone does not pull in on Linux."""
    found = []
    for name in _RUNTIME_DISTRIBUTIONS:
        try:
            version(name)
        except PackageNotFoundError:
            continue
        found.append(name)
        break
    return ("mlx", "mlx-lm", *found)


# -- what this mlx supports ------------------------------------------------------------------------------------------
@functools.cache
def _quantizes(mode: str, bits: int, group_size: int) -> bool:
    import mlx.core as mx

    try:
        mx.eval(mx.quantize(mx.zeros((8, 256)), group_size=group_size, bits=bits, mode=mode))
    except (ValueError, RuntimeError):
        return False
    return True


def affine_bits() -> tuple[int, ...]:
    require_mlx_lm()
    return tuple(b for b in AFFINE_BITS if _quantizes("affine", b, 64))


def group_sizes() -> tuple[int, ...]:
    require_mlx_lm()
    return tuple(g for g in GROUP_SIZES if _quantizes("affine", 4, g))


def quant_modes() -> tuple[str, ...]:
    """The microscaling modes this mlx quantizes (``mx.quantize(mode=...)``)."""
    require_mlx_lm()
    return tuple(mode for mode, (bits, group) in MODES.items() if _quantizes(mode, bits, group))


# -- precisions ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """What one precision name asks of mlx-lm."""

    precision: str
    method: str  # "uniform", "recipe" (mlx-lm's mixed_*), "dynamic", "awq" or "per_layer" (a recipe file)
    bits: int | None = None
    group_size: int | None = None
    mode: str = "affine"
    target_bpw: float | None = None


def parse_precision(name: str) -> Plan:
    """The :class:`Plan` of a quantization precision name, or a one-line error naming what this mlx supports."""
    text = str(name).strip().lower()
    if text in MODES:
        if text not in quant_modes():
            raise EdgeError(f"this mlx does not quantize in mode '{text}' (supported: {', '.join(quant_modes())})")
        bits, group = MODES[text]
        return Plan(text, "uniform", bits, group, text)
    if text in RECIPES:
        return Plan(text, "recipe")
    if text == MIXED:
        return Plan(MIXED, "per_layer")
    if match := re.fullmatch(r"dynamic_(\d+(?:\.\d+)?)bpw", text):
        target = float(match.group(1))
        return Plan(f"dynamic_{target:g}bpw", "dynamic", target_bpw=target)
    if match := re.fullmatch(r"(awq_)?q(\d+)_g(\d+)", text):
        bits, group = int(match.group(2)), int(match.group(3))
        _check_bits_and_group(bits, group)
        return Plan(f"{match.group(1) or ''}q{bits}_g{group}", "awq" if match.group(1) else "uniform", bits, group)
    raise EdgeError(f"unknown MLX precision '{name}' (choose from q<bits>_g<group>, {', '.join(quant_modes())}, "
                    f"{', '.join(RECIPES)}, dynamic_<bpw>bpw, awq_q<bits>_g<group>, {MIXED} with a recipe)")


def _check_bits_and_group(bits: int, group: int) -> None:
    if bits not in affine_bits():
        raise EdgeError(f"this mlx does not quantize to {bits} bits (supported: {', '.join(map(str, affine_bits()))})")
    if group not in group_sizes():
        raise EdgeError(f"this mlx does not quantize in groups of {group} "
                        f"(supported: {', '.join(map(str, group_sizes()))})")


def _convert_dtype(precision: str) -> str:
    dtype = _DTYPE_ALIASES.get(str(precision).strip().lower(), str(precision).strip().lower())
    if dtype not in CONVERT_PRECISIONS:
        raise EdgeError(f"unknown MLX conversion type '{precision}' (choose from {', '.join(CONVERT_PRECISIONS)})")
    return dtype


# -- folders ---------------------------------------------------------------------------------------------------------
def _safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file; :class:`EdgeError` when it is unreadable or the data is truncated."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as stream:
            length = struct.unpack("<Q", stream.read(8))[0]
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(stream.read(length))
        end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"), default=0)
    except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise EdgeError(f"not a valid safetensors file: {file} ({first_line(exc)})") from exc
    if 8 + length + end != size:
        raise EdgeError(f"truncated or corrupt safetensors file: {file} ({size} bytes, its header needs "
                        f"{8 + length + end})")
    return header


def weight_files(folder: Path) -> list[Path]:
    """The model weight files of an MLX folder (mlx-lm loads ``model*.safetensors``)."""
    return sorted(p for p in Path(folder).glob("model*.safetensors") if p.is_file())


def model_files(folder: Path) -> tuple[Path, ...]:
    """Files whose bytes count as an MLX artifact's size: the weights and an adapter that travels with them."""
    adapter = Path(folder) / ADAPTER_DIR / ADAPTER_WEIGHTS
    return (*weight_files(folder), *([adapter] if adapter.is_file() else []))


def is_mlx_folder(path: Path) -> bool:
    """A folder with ``config.json`` and weights that mlx-lm saved (safetensors metadata ``format: mlx``)."""
    path = Path(path)
    if not (path.is_dir() and (path / "config.json").is_file() and weight_files(path)):
        return False
    try:
        with open(weight_files(path)[0], "rb") as stream:
            length = struct.unpack("<Q", stream.read(8))[0]
            metadata = json.loads(stream.read(min(length, 1 << 24))).get("__metadata__") or {}
    except (OSError, struct.error, ValueError, UnicodeDecodeError, AttributeError):
        return True  # an unreadable header: this format's folder, corrupt (check_folder says how)
    return metadata.get("format") == "mlx"


def check_folder(path: Path) -> dict[str, Any]:
    """``config.json`` of the MLX folder ``path`` after checking every weight file; :class:`EdgeError` otherwise."""
    folder = Path(path)
    if not (folder / "config.json").is_file() or not weight_files(folder):
        raise EdgeError(f"no MLX model (config.json and model*.safetensors) at {folder}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise EdgeError(f"cannot read {folder / 'config.json'}: {first_line(exc)}") from exc
    if config.get("model_file"):  # mlx-lm would execute that file from the folder
        raise EdgeError(f"{folder} needs custom model code ({config['model_file']}); it is not loaded")
    for file in model_files(folder):
        _safetensors_header(file)
    return config


def folder_precision(folder: Path, config: Mapping[str, Any]) -> str:
    """A precision name for an MLX folder made elsewhere: its float dtype, ``q<bits>_g<group>``, a mode, or
    ``mixed_<low>_<high>`` when layers differ (the method that chose them is not recorded in the folder)."""
    quantization = config.get("quantization")
    if not quantization:
        return _float_dtype(folder)
    layers = [v for v in quantization.values() if isinstance(v, dict)]
    bits = sorted({int(v.get("bits", quantization.get("bits", 4))) for v in layers} | {int(quantization["bits"])})
    if len(bits) > 1:
        return f"mixed_{bits[0]}_{bits[-1]}"
    mode = quantization.get("mode", "affine")
    return mode if mode != "affine" else f"q{bits[0]}_g{quantization['group_size']}"


def _float_dtype(folder: Path) -> str:
    """The float type holding most weight bytes of an MLX folder (``float32``, ``float16``, ``bfloat16``)."""
    totals: dict[str, int] = {}
    for file in weight_files(folder):
        for key, entry in _safetensors_header(file).items():
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"]) if key != "__metadata__" else None
            if dtype:
                totals[dtype] = totals.get(dtype, 0) + entry["data_offsets"][1] - entry["data_offsets"][0]
    return max(totals, key=totals.__getitem__) if totals else "unknown"


def legacy_rope_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """``rope_theta`` (and ``rope_scaling`` for scaled RoPE) from transformers 5's ``rope_parameters``, when the
    config lacks them: mlx-lm 0.31's model classes read only the legacy keys (default theta 10000)."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_theta" in config:
        return {}
    keys: dict[str, Any] = {"rope_theta": rope["rope_theta"]}
    if rope.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        keys["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return keys


@contextlib.contextmanager
def _writing_into(out_dir: Path) -> Iterator[Path]:
    """A staging folder inside ``out_dir`` that mlx-lm writes (it must not exist yet); its files move into
    ``out_dir`` on success, and nothing written stays behind on failure."""
    created = not out_dir.exists()
    staging = out_dir / _STAGING
    moved: list[Path] = []
    shutil.rmtree(staging, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
        if not (staging / "config.json").is_file():
            raise EdgeError(f"mlx-lm wrote no config.json into {out_dir}")
        for item in sorted(staging.iterdir()):
            moved.append(item.replace(out_dir / item.name))
        staging.rmdir()
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:
            shutil.rmtree(staging, ignore_errors=True)
            for item in moved:
                shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """mlx-lm prints progress to stdout; keep stdout for the CLI's own output."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _mlx_call(what: str, call: Callable[[], Any]) -> Any:
    """``call()``, any framework exception as a one-line :class:`EdgeError` saying ``what`` failed."""
    try:
        with _quiet():
            return call()
    except EdgeError:
        raise
    except Exception as exc:  # mlx-lm and mlx raise ValueError, RuntimeError, KeyError, FileNotFoundError, ...
        raise EdgeError(f"mlx-lm cannot {what}: {first_line(exc)}") from exc


# -- adapters --------------------------------------------------------------------------------------------------------
def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file() or not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise EdgeError(f"no mlx-lm adapter ({ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}) at {adapter_dir}")
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise EdgeError(f"cannot read {adapter_dir / ADAPTER_CONFIG}: {first_line(exc)}") from exc
    if config.get("fine_tune_type", "lora") != "full" and not {"num_layers", "lora_parameters"} <= set(config):
        raise EdgeError(f"{adapter_dir / ADAPTER_CONFIG} lacks num_layers or lora_parameters")
    _safetensors_header(adapter_dir / ADAPTER_WEIGHTS)
    return config


def check_adapter(adapter_dir: Path, model_folder: Path) -> None:
    """Refuse, in one line, an adapter whose weights are not parameters of the model in ``model_folder`` with the
    same shapes (mlx-lm loads adapters with ``strict=False`` and would not notice)."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    adapter_dir = Path(adapter_dir)
    config = _read_adapter_config(adapter_dir)
    model, _ = _mlx_call(f"load {model_folder}", lambda: load_model(Path(model_folder), lazy=True))
    if config.get("fine_tune_type", "lora") != "full":
        if int(config["num_layers"]) > len(model.layers):
            raise EdgeError(f"adapter {adapter_dir.name} does not match the base model: it adapts "
                            f"{config['num_layers']} layers, the model has {len(model.layers)}")
        _mlx_call(f"apply adapter {adapter_dir.name}", lambda: linear_to_lora_layers(
            model, int(config["num_layers"]), config["lora_parameters"],
            use_dora=config.get("fine_tune_type") == "dora"))
    expected = {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}
    header = _safetensors_header(adapter_dir / ADAPTER_WEIGHTS)
    for name, entry in sorted(header.items()):
        if name == "__metadata__":
            continue
        if name not in expected:
            raise EdgeError(f"adapter {adapter_dir.name} does not match the base model: it has no parameter {name}")
        if tuple(entry["shape"]) != expected[name]:
            raise EdgeError(f"adapter {adapter_dir.name} does not match the base model: {name} is "
                            f"{tuple(entry['shape'])}, the model's {expected[name]}")


def _fuse_adapter(model: Any) -> Any:
    """Fold the loaded LoRA layers into their base layers (``mlx_lm.fuse``)."""
    from mlx.utils import tree_unflatten

    fused = [(name, module.fuse(dequantize=False)) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


def _copy_adapter(adapter_dir: Path, folder: Path) -> None:
    target = folder / ADAPTER_DIR
    target.mkdir()
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        shutil.copyfile(adapter_dir / name, target / name)


def adapter_sha256(adapter_dir: Path) -> str:
    from mlflow_edge import cache

    return cache.sha256_file(Path(adapter_dir) / ADAPTER_WEIGHTS)


# -- per-layer recipes -----------------------------------------------------------------------------------------------
def layer_types(dtype: str) -> dict[str, dict[str, Any] | bool]:
    """The types a recipe may name, as mlx-lm's per-layer quantization entries: every uniform precision this mlx
    quantizes (``q<bits>_g<group>`` and the microscaling modes) and ``dtype``, a layer left unquantized (``False``)."""
    types: dict[str, dict[str, Any] | bool] = {
        f"q{bits}_g{group}": {"group_size": group, "bits": bits, "mode": "affine"}
        for bits in affine_bits() for group in group_sizes()}
    types.update({mode: {"group_size": MODES[mode][1], "bits": MODES[mode][0], "mode": mode} for mode in quant_modes()})
    return {**types, dtype: False}


def _type_name(entry: Mapping[str, Any]) -> str:
    """The type of one mlx-lm quantization entry (``{"group_size", "bits", "mode"}``)."""
    mode = entry.get("mode", "affine")
    return f"q{int(entry['bits'])}_g{int(entry['group_size'])}" if mode == "affine" else mode


def read_recipe(path: str | Path) -> recipes.Recipe:
    """The recipe file ``path`` with its types in this backend's lower-case names (``load_recipe`` upper-cases them,
    as ggml names are): the canonical form whose digest an artifact records."""
    recipe = recipes.load_recipe(path)
    rules = tuple(recipes.Rule(rule.pattern, rule.type.lower()) for rule in recipe.rules)
    return dataclasses.replace(recipe, default_type=recipe.default_type.lower(), rules=rules)


def quantizable_layers(model: Any) -> dict[str, int]:
    """Input width of every layer mlx-lm's quantization visits (leaf modules with ``to_quantized``), by the module
    path its predicate sees, in the order it visits them."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    return {path: module.weight.shape[-1] for path, module in leaves
            if hasattr(module, "to_quantized") and "weight" in module}


def check_recipe(recipe: recipes.Recipe, widths: Mapping[str, int], architecture: str, dtype: str) -> None:
    """Refuse, in one line, a recipe that does not fit the model whose quantizable layers have ``widths``: another
    backend or architecture, a pattern matching no layer, a type this mlx lacks, a float type other than ``dtype``,
    a group size that does not divide a layer it is given to, or no layer quantized."""
    types = layer_types(dtype)
    recipes.validate_against(recipe, list(widths), architecture, tuple(dict.fromkeys((*types, *CONVERT_PRECISIONS))),
                             MLXBackend.name)
    for kind in (recipe.default_type, *(rule.type for rule in recipe.rules)):
        if kind not in types:
            raise EdgeError(f"the recipe's type {kind} would leave layers at {kind}, but this quantization keeps "
                            f"unquantized layers at {dtype} (set dtype={kind}, or name {dtype})")
    assigned = {name: types[recipe.type_of(name)] for name in widths}
    for name, entry in assigned.items():
        if entry and widths[name] % entry["group_size"]:
            raise EdgeError(f"the recipe's type {recipe.type_of(name)} does not divide layer {name} "
                            f"({widths[name]} wide)")
    if not any(assigned.values()):
        raise EdgeError(f"the recipe leaves every layer unquantized ({dtype})")


def extract_recipe(folder: Path, layers: Sequence[str], source_sha256: str | None = None) -> recipes.Recipe:
    """The type of each of ``layers`` in the quantized MLX ``folder``, as mlx-lm's loader reads it back (the layer's
    entry in ``config.json``'s ``quantization``; else the model-wide setting when the weights hold its scales; else
    unquantized, at its weight's dtype), as one exact rule per layer that differs from the most common type."""
    config = json.loads((folder / "config.json").read_text())
    quantization = config.get("quantization") or {}
    tensors = {key: entry for file in weight_files(folder) for key, entry in _safetensors_header(file).items()}

    def type_of(name: str) -> str:
        entry = quantization.get(name, quantization if f"{name}.scales" in tensors else False)
        if entry:
            return _type_name(entry)
        return _SAFETENSORS_DTYPES.get(tensors[f"{name}.weight"]["dtype"], tensors[f"{name}.weight"]["dtype"])

    kinds = {name: type_of(name) for name in layers}
    default = collections.Counter(kinds.values()).most_common(1)[0][0]
    return recipes.recipe_from_allocation({name: kind for name, kind in kinds.items() if kind != default},
                                          backend=MLXBackend.name, architecture=str(config["model_type"]),
                                          default_type=default, source_sha256=source_sha256)


# -- the backend -----------------------------------------------------------------------------------------------------
class MLXBackend:
    """MLX folders through mlx-lm: conversion, affine/microscaling/mixed/dynamic/AWQ quantization, the MLX runtime."""

    name: ClassVar[str] = "mlx"
    format: ClassVar[str] = "mlx"
    flavor: ClassVar[str] = "mlflow_edge.flavors.mlx"
    requirements: ClassVar[tuple[str, ...]] = runtime_distributions()
    # MLX's Linux CPU backend works but is one thread with reference kernels (SmolLM2-135M: a few tokens/s here),
    # so generic CPU targets are better served by llama.cpp/OpenVINO; the Apple-silicon target is its home
    targets: ClassVar[Mapping[str, str]] = {"apple-silicon": "primary"}
    base_precision: ClassVar[str] = "float32"
    sweep_types: ClassVar[tuple[str, ...]] = ("q3_g64", "q4_g64", "q5_g64", "q6_g64", "q8_g64", "mixed_3_6",
                                              "mixed_4_6")
    native_serve_commands: ClassVar[tuple[str, ...]] = (  # mlx-lm's OpenAI-compatible server
        "mlx_lm.server --model {model} --host 127.0.0.1 --port {port}",
    )

    def convert_precisions(self) -> Sequence[str]:
        return CONVERT_PRECISIONS

    def quantize_precisions(self) -> Sequence[str]:
        uniform = [f"q{b}_g{g}" for b in affine_bits() for g in group_sizes()]
        return (*uniform, *quant_modes(), *RECIPES, *DYNAMIC_TARGETS, *(f"awq_{name}" for name in uniform), MIXED)

    def option_specs(self) -> Sequence[OptionSpec]:
        return (
            OptionSpec("q_group_size", int, None, choices=GROUP_SIZES, label="g{value}",
                       help="mixed_* recipes: group size (mlx-lm --q-group-size; default 64)"),
            OptionSpec("recipe", str, None, help=f"{MIXED}: a recipe JSON file (layer pattern -> q<bits>_g<group>, a "
                       "mode, or the dtype for unquantized; see mlflow_edge.recipes)"),
            OptionSpec("dtype", str, None, choices=CONVERT_PRECISIONS,
                       help="float type of the unquantized parameters and scales (default: the base's)"),
            OptionSpec("low_bits", int, None, help="dynamic_*: bits of the less sensitive layers (default 4)"),
            OptionSpec("low_group_size", int, None, help="dynamic_*: their group size (default 64)"),
            OptionSpec("high_bits", int, None, help="dynamic_*: bits of the most sensitive layers (default 5)"),
            OptionSpec("high_group_size", int, None, help="dynamic_*: their group size (default 64)"),
            OptionSpec("embed_bits", int, None, help="awq_*: bits of the embeddings (default 4)"),
            OptionSpec("embed_group_size", int, None, help="awq_*: group size of the embeddings (default 32)"),
            OptionSpec("n_grid", int, None, help="awq_*: grid points of the scale and clip search (default 20)"),
            OptionSpec("num_samples", int, None, help="dynamic_*/awq_*: calibration windows (default 8)"),
            OptionSpec("sequence_length", int, None, help="dynamic_*/awq_*: tokens per window (default 128)"),
            OptionSpec("adapter_path", str, None,
                       help="mlx-lm LoRA adapter folder (adapters.safetensors + adapter_config.json)"),
            OptionSpec("fuse_adapter", bool, None, help="fuse the adapter before quantizing (else applied at load)"),
        )

    def versions(self) -> Mapping[str, str]:
        require_mlx_lm()
        return {"mlx": version("mlx"), "mlx_lm": version("mlx-lm")}

    def unsupported_reason(self, source: Any) -> str | None:
        return convertible_reason(source)

    def open_artifact(self, path: Path, source: Any) -> Artifact | None:
        if not is_mlx_folder(path):
            return None
        config = check_folder(path)
        return self._artifact(Path(path), folder_precision(Path(path), config), source.name, source.sha256,
                              source.num_parameters, {})

    def starting_points(self) -> Sequence[Mapping[str, Any]]:
        # mlx-lm's default quantization (mlx_lm.convert -q): 4 bits, groups of 64, affine
        return ({"mlx.recipe": "uniform", "mlx.q_bits": 4, "mlx.q_group_size": 64},)

    def search_space(self, trial: Any) -> tuple[str, dict[str, Any]]:
        # 32 and 64 divide every layer of SmolLM2 (576 wide) and of the tiny test model (256); 128 does not divide 576
        recipe = trial.suggest_categorical("mlx.recipe", ["uniform", "mixed_3_6", "mixed_4_6"])
        group = trial.suggest_categorical("mlx.q_group_size", [32, 64])
        if recipe == "uniform":
            bits = trial.suggest_categorical("mlx.q_bits", [3, 4, 5, 6, 8])
            return f"q{bits}_g{group}", {}
        return recipe, {"q_group_size": group}

    def resource_needs(self, facts: Any) -> Sequence[StageNeed]:
        # mlx_lm.convert loads the weights and casts them to the base dtype (float32 here), then writes them
        runtime, fp32 = 1 << 29, facts.bytes_at("float32")
        return (StageNeed("mlx conversion (float32)", runtime + facts.disk_bytes + fp32, fp32,
                          "leave mlx out (--backends)"),
                StageNeed("mlx quantization", runtime + fp32 + facts.parameters, facts.parameters,
                          "leave mlx out (--backends)"))

    def precision_bits(self, precision: str, options: Mapping[str, Any], source: Any) -> Bits | None:
        # affine quantization: the bits and a scale and a bias (16 bits each) per group; mlx-lm's mixed recipes keep
        # about a quarter of the weights (v_proj, down_proj of some layers, lm_head) at the high bits
        if match := re.fullmatch(r"q(\d+)_g(\d+)", precision):
            bits, group = int(match.group(1)), int(match.group(2))
            return Bits("affine", bits + 32 / group)
        if match := re.fullmatch(r"mixed_(\d)_(\d)", precision):
            low, high = int(match.group(1)), int(match.group(2))
            return Bits("mixed", 0.75 * low + 0.25 * high + 32 / int(options.get("q_group_size") or 64))
        return None

    # -- convert -------------------------------------------------------------------------------------------------
    def convert(self, source: Any, out_dir: Path, precision: str) -> Artifact:
        dtype = _convert_dtype(precision)
        if reason := convertible_reason(source):
            raise EdgeError(f"unsupported architecture: {reason}")
        from mlx_lm.convert import convert

        with _writing_into(Path(out_dir)) as staging:
            _mlx_call(f"convert {source.name}", lambda: convert(str(source.path), str(staging), dtype=dtype))
            config_path = staging / "config.json"
            config = json.loads(config_path.read_text())
            if legacy := legacy_rope_keys(config):
                config_path.write_text(json.dumps({**config, **legacy}, indent=4, sort_keys=True))
        return self._artifact(Path(out_dir), dtype, source.name, source.sha256, source.num_parameters,
                              {"dtype": dtype})

    def _artifact(self, folder: Path, precision: str, source_name: str, source_sha256: str, num_parameters: int,
                  options: Mapping[str, Any]) -> Artifact:
        return Artifact(path=folder, backend=self.name, format=self.format, precision=precision,
                        source_name=source_name, source_sha256=source_sha256, num_parameters=num_parameters,
                        options=dict(options), files=model_files(folder))

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
        settings = typed_options(self.name, self.option_specs(), options)
        if settings.get("fuse_adapter") and not settings.get("adapter_path"):
            raise EdgeError("fuse_adapter needs adapter_path")
        plan = parse_precision(precision)
        settings = _method_settings(plan, settings)
        if base.precision.lower() not in CONVERT_PRECISIONS:
            raise EdgeError(f"{base.path.name} is already quantized ({base.precision}); quantize a "
                            f"{'/'.join(CONVERT_PRECISIONS)} conversion")
        folder = Path(base.path)
        config = check_folder(folder)
        settings.setdefault("dtype", folder_precision(folder, config))
        recipe = read_recipe(settings["recipe"]) if plan.method == "per_layer" else None
        layers = _check_layers(folder, plan, settings, recipe)
        adapter = Path(settings["adapter_path"]) if settings.get("adapter_path") else None
        if adapter is not None:
            check_adapter(adapter, folder)
        recorded = _recorded(plan, settings, adapter)
        data: Any = recipe  # what the method reads: the recipe, or calibration windows
        if plan.method in ("dynamic", "awq"):
            data = _calibration_windows(calibration, folder, settings["num_samples"], settings["sequence_length"])
            recorded.update({"calib.dataset": calibration.label, "calib.sha256": calibration.sha256})
        with _writing_into(Path(out_dir)) as staging:
            _quantize_into(staging, folder, plan, settings, adapter, data)
            if plan.method in _PER_LAYER_METHODS:
                written = extract_recipe(staging, list(layers), base.source_sha256)
                written.save(staging / RECIPE_FILE)
                recorded["recipe_sha256"] = written.digest()
        return self._artifact(Path(out_dir), plan.precision, base.source_name, base.source_sha256,
                              base.num_parameters, {**recorded, "base_precision": base.precision})

    # -- load ----------------------------------------------------------------------------------------------------
    def load(self, artifact: Artifact, threads: int, context_tokens: int) -> "MLXRunner":
        return MLXRunner(artifact.path, threads=threads, context_tokens=context_tokens)


def convertible_reason(source: Any) -> str | None:
    """``None`` when mlx-lm has a model class for the source's ``model_type`` (one module per type in
    ``mlx_lm.models``, after its ``MODEL_REMAPPING``), else why not."""
    import importlib.util

    try:
        from mlx_lm.utils import MODEL_REMAPPING
    except ImportError:
        return "mlx-lm is not installed: pip install 'mlflow-edge[mlx]'"
    try:
        config = json.loads((Path(source.path) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"cannot read the config of {source.name}: {first_line(exc)}"
    if config.get("model_file"):
        return f"{source.name} needs custom model code ({config['model_file']})"
    model_type = str(config.get("model_type", ""))
    module = MODEL_REMAPPING.get(model_type, model_type)
    if model_type and re.fullmatch(r"[A-Za-z0-9_]+", module) and importlib.util.find_spec(f"mlx_lm.models.{module}"):
        return None
    return f"mlx-lm has no model class for {source.architecture} (model_type '{model_type}')"


# -- helpers: quantize -----------------------------------------------------------------------------------------------
_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "uniform": {},
    "recipe": {"q_group_size": 64},
    "dynamic": {"low_bits": 4, "low_group_size": 64, "high_bits": 5, "high_group_size": 64, "num_samples": 8,
                "sequence_length": 128},
    "awq": {"embed_bits": 4, "embed_group_size": 32, "n_grid": 20, "num_samples": 8, "sequence_length": 128},
    "per_layer": {},
}
_METHOD_OPTIONS = {"uniform": (), "recipe": ("q_group_size",), "dynamic": (*_DYNAMIC_OPTIONS, *_DATA_OPTIONS),
                   "awq": (*_AWQ_OPTIONS, *_DATA_OPTIONS), "per_layer": ("recipe",)}
_PER_LAYER_METHODS = ("recipe", "dynamic", "per_layer")
"""Methods whose weights are a plain quantization of each layer at its own type: their artifacts carry a recipe
that reproduces them (AWQ rescales the weights first; a recipe of its types would not)."""
_COMMON_OPTIONS = ("dtype", "adapter_path", "fuse_adapter")


def _method_settings(plan: Plan, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``plan``'s method with its defaults; options of another method are refused."""
    allowed = set(_METHOD_OPTIONS[plan.method]) | set(_COMMON_OPTIONS)
    if misplaced := sorted(set(options) - allowed):
        raise EdgeError(f"{', '.join(misplaced)} do(es) not apply to {plan.precision}"
                        f"{f' (a recipe applies with precision {MIXED})' if 'recipe' in misplaced else ''}")
    if plan.method == "per_layer" and not options.get("recipe"):
        raise EdgeError(f"precision {MIXED} needs recipe=<a recipe JSON file>")
    settings = {**_METHOD_DEFAULTS[plan.method], **options}
    for bits, group in (("low_bits", "low_group_size"), ("high_bits", "high_group_size"),
                        ("embed_bits", "embed_group_size")):
        if bits in settings:
            _check_bits_and_group(settings[bits], settings[group])
    if plan.method == "dynamic" and settings["high_bits"] <= settings["low_bits"]:
        raise EdgeError(f"high_bits ({settings['high_bits']}) must exceed low_bits ({settings['low_bits']})")
    for name in ("num_samples", "sequence_length", "n_grid"):
        if name in settings and settings[name] < 1:
            raise EdgeError(f"{name} must be positive, got {settings[name]}")
    return settings


def _group_sizes_used(plan: Plan, settings: Mapping[str, Any]) -> dict[str, int]:
    if plan.method == "per_layer":
        return {}  # per layer: check_recipe
    if plan.method == "recipe":
        return {"q_group_size": settings["q_group_size"]}
    if plan.method == "dynamic":
        return {"low_group_size": settings["low_group_size"], "high_group_size": settings["high_group_size"]}
    groups = {"group size": int(plan.group_size)}
    if plan.method == "awq":
        groups["embed_group_size"] = settings["embed_group_size"]
    return groups


def _check_layers(folder: Path, plan: Plan, settings: Mapping[str, Any],
                  recipe: recipes.Recipe | None = None) -> dict[str, int]:
    """Before any work: the group sizes divide every quantizable layer, the recipe fits the model, mlx-lm's recipe or
    AWQ knows the architecture, a dynamic target is within reach. Returns the widths of the quantizable layers."""
    from mlx_lm.utils import load_model

    model, config = _mlx_call(f"load {folder}", lambda: load_model(folder, lazy=True))
    widths = quantizable_layers(model)
    if recipe is not None:
        check_recipe(recipe, widths, str(config.get("model_type")), settings["dtype"])
    for option, group in _group_sizes_used(plan, settings).items():
        if bad := sorted(name for name, width in widths.items() if width % group):
            raise EdgeError(f"{option} {group} does not divide layer {bad[0]} ({widths[bad[0]]} wide"
                            f"{f', and {len(bad) - 1} more' if len(bad) > 1 else ''})")
    if plan.method == "recipe":
        from mlx_lm.convert import mixed_quant_predicate_builder

        _mlx_call(f"apply {plan.precision}", lambda: mixed_quant_predicate_builder(plan.precision, model))
    if plan.method == "awq":
        from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS

        if config["model_type"] not in AWQ_MODEL_CONFIGS:
            raise EdgeError(f"mlx-lm has no AWQ config for model_type '{config['model_type']}' "
                            f"(it has {', '.join(sorted(AWQ_MODEL_CONFIGS))})")
    if plan.method == "dynamic":
        low, high = _bpw_range(_cast(model, settings["dtype"]), settings)
        if not low <= plan.target_bpw <= high:
            raise EdgeError(f"{plan.precision} is outside the {low:.2f}-{high:.2f} bits per weight that low_bits="
                            f"{settings['low_bits']} and high_bits={settings['high_bits']} reach at dtype "
                            f"{settings['dtype']}")
    return widths


def _recorded(plan: Plan, settings: Mapping[str, Any], adapter: Path | None) -> dict[str, Any]:
    """The mlx-lm arguments a quantization used, under mlx-lm's names (logged as ``mlx.<name>`` params)."""
    recorded: dict[str, Any] = {"dtype": settings["dtype"]}
    if plan.method in ("uniform", "awq"):
        recorded.update({"q_bits": plan.bits, "q_group_size": plan.group_size, "q_mode": plan.mode})
    if plan.method == "recipe":
        recorded.update({"quant_predicate": plan.precision, "q_group_size": settings["q_group_size"]})
    if plan.method == "dynamic":
        recorded["target_bpw"] = plan.target_bpw
    for name in (*_METHOD_OPTIONS[plan.method],):
        recorded.setdefault(name, settings[name])
    if adapter is not None:
        recorded.update({"adapter": adapter.name, "adapter.sha256": adapter_sha256(adapter),
                         "fuse_adapter": bool(settings.get("fuse_adapter", False))})
    return recorded


def _calibration_windows(calibration: Any, folder: Path, num_samples: int, sequence_length: int) -> Any:
    """``num_samples`` consecutive windows of ``sequence_length`` calibration tokens, ``[num_samples, length]``."""
    import mlx.core as mx
    from transformers import AutoTokenizer

    if calibration is None:
        raise EdgeError("this MLX precision reads calibration text; none was given")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(calibration.text(), add_special_tokens=False)["input_ids"]
    needed = num_samples * sequence_length
    if len(ids) < needed:
        raise EdgeError(f"calibration text {calibration.label} has {len(ids)} tokens; {needed} are needed "
                        f"({num_samples} windows of {sequence_length})")
    return mx.array(np.asarray(ids[:needed], dtype=np.int32).reshape(num_samples, sequence_length))


def _cast(model: Any, dtype: str) -> Any:
    """Floating parameters to ``dtype`` (what ``mlx_lm.convert --dtype`` does)."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path

    target = getattr(mx, dtype)
    keep = getattr(model, "cast_predicate", lambda _: True)
    model.update(tree_map_with_path(
        lambda k, v: v.astype(target) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v, model.parameters()))
    return model


def _quantize_into(staging: Path, folder: Path, plan: Plan, settings: Mapping[str, Any], adapter: Path | None,
                   data: Any) -> None:
    from mlx_lm.utils import load, save

    fuse = adapter is not None and settings.get("fuse_adapter", False)
    legacy = legacy_rope_keys(json.loads((folder / "config.json").read_text()))
    model, tokenizer, config = _mlx_call(f"load {folder}", lambda: load(
        str(folder), lazy=True, return_config=True, adapter_path=str(adapter) if fuse else None, model_config=legacy))
    if fuse:
        model = _fuse_adapter(model)
    model = _cast(model, settings["dtype"])
    quantizers = {"uniform": _quantize_uniform, "recipe": _quantize_recipe, "dynamic": _quantize_dynamic,
                  "awq": _quantize_awq, "per_layer": _quantize_per_layer}
    model, config = _mlx_call(f"quantize to {plan.precision}",
                              lambda: quantizers[plan.method](model, config, plan, settings, data))
    _mlx_call(f"save {plan.precision}", lambda: save(staging, folder, model, tokenizer, config))
    if adapter is not None and not fuse:
        _copy_adapter(adapter, staging)


def _quantize_uniform(model: Any, config: dict, plan: Plan, settings: Mapping[str, Any], data: Any) -> tuple:
    from mlx_lm.utils import quantize_model

    return quantize_model(model, config, plan.group_size, plan.bits, mode=plan.mode)


def _quantize_recipe(model: Any, config: dict, plan: Plan, settings: Mapping[str, Any], data: Any) -> tuple:
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import quantize_model

    group = settings["q_group_size"]
    predicate = mixed_quant_predicate_builder(plan.precision, model, group)
    return quantize_model(model, config, group, None, mode="affine", quant_predicate=predicate)


def _quantize_per_layer(model: Any, config: dict, plan: Plan, settings: Mapping[str, Any],
                        recipe: recipes.Recipe) -> tuple:
    """Each layer at its recipe type (mlx-lm records each as a per-layer entry; unquantized ones are not recorded:
    mlx-lm's loader finds no scales for them). ``config.json``'s model-wide setting is the default type's, else the
    first quantized layer's; the group size handed to mlx-lm, which skips layers it does not divide before asking
    the predicate, is the smallest in use (all are powers of two)."""
    from mlx_lm.utils import quantize_model

    types = layer_types(settings["dtype"])
    entries = {name: types[recipe.type_of(name)] for name in quantizable_layers(model)}
    used = [entry for entry in entries.values() if entry]
    top = types[recipe.default_type] or used[0]
    model, config = quantize_model(model, config, min(entry["group_size"] for entry in used), top["bits"],
                                   mode=top["mode"], quant_predicate=lambda path, _: entries.get(path, False))
    config["quantization"].update(top)
    return model, config


def _bpw_range(model: Any, settings: Mapping[str, Any]) -> tuple[float, float]:
    """Bits per weight (mlx-lm's measure) with every layer at the low and at the high setting (lazy: no compute)."""
    import copy

    import mlx.nn as nn
    from mlx_lm.utils import compute_bits_per_weight

    found = []
    for level in ("low", "high"):
        trial = copy.deepcopy(model)
        nn.quantize(trial, group_size=settings[f"{level}_group_size"], bits=settings[f"{level}_bits"])
        found.append(compute_bits_per_weight(trial))
    return found[0], found[1]


def _bpw_at(model: Any, sensitivities: Mapping[str, float], threshold: float, settings: Mapping[str, Any]) -> float:
    """mlx-lm's bits per weight with the layers more sensitive than ``threshold`` at the high setting (lazy)."""
    import copy

    import mlx.nn as nn
    from mlx_lm.utils import compute_bits_per_weight

    high = {"bits": settings["high_bits"], "group_size": settings["high_group_size"]}
    trial = copy.deepcopy(model)
    nn.quantize(trial, group_size=settings["low_group_size"], bits=settings["low_bits"],
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and (high if sensitivities[p] > threshold
                                                                             else True))
    return compute_bits_per_weight(trial)


def _threshold_within(model: Any, sensitivities: Mapping[str, float], threshold: float, target: float,
                      settings: Mapping[str, Any]) -> float:
    """``threshold``, raised past the least sensitive high-bit layers until the target holds: mlx-lm's
    ``estimate_threshold`` returns the middle of its last bracket, which can overshoot by a whole layer (on a model
    whose embedding is most of its weights, by a whole bit)."""
    above = sorted(value for value in sensitivities.values() if value > threshold)
    while above and _bpw_at(model, sensitivities, threshold, settings) > target:
        threshold = above.pop(0)
    return threshold


def _quantize_dynamic(model: Any, config: dict, plan: Plan, settings: Mapping[str, Any], data: Any) -> tuple:
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold
    from mlx_lm.utils import quantize_model

    levels = (settings["low_bits"], settings["low_group_size"], settings["high_bits"], settings["high_group_size"])
    sensitivities = dict(estimate_sensitivities(model, data, *levels))
    threshold = estimate_threshold(model, sensitivities, plan.target_bpw, *levels)
    threshold = _threshold_within(model, sensitivities, threshold, plan.target_bpw, settings)

    def predicate(path: str, module: Any) -> bool | dict:
        if not hasattr(module, "to_quantized"):
            return False
        if sensitivities[path] > threshold:
            return {"bits": settings["high_bits"], "group_size": settings["high_group_size"]}
        return True

    return quantize_model(model, config, group_size=settings["low_group_size"], bits=settings["low_bits"],
                          quant_predicate=predicate)


def _quantize_awq(model: Any, config: dict, plan: Plan, settings: Mapping[str, Any], data: Any) -> tuple:
    from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

    awq_quantize(model, data, AWQ_MODEL_CONFIGS[config["model_type"]], group_size=plan.group_size, bits=plan.bits,
                 embed_group_size=settings["embed_group_size"], embed_bits=settings["embed_bits"],
                 n_grid=settings["n_grid"])
    return model, update_config(model, config)


# -- runtime ---------------------------------------------------------------------------------------------------------
def load_mlx_model(path: Path, adapter_dir: Path | None = None) -> Any:
    """The mlx-lm model of the MLX folder ``path`` (checked first), with its ``adapters/`` or ``adapter_dir``."""
    require_mlx_lm()
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    folder = Path(path)
    config = check_folder(folder)
    model, _ = _mlx_call(f"load {folder}", lambda: load_model(folder, model_config=legacy_rope_keys(config)))
    adapter = adapter_dir or (folder / ADAPTER_DIR if (folder / ADAPTER_DIR).is_dir() else None)
    if adapter is not None:
        check_adapter(Path(adapter), folder)
        model = _mlx_call(f"apply adapter {Path(adapter).name}", lambda: load_adapters(model, str(adapter)))
        model.eval()
    return model


class MLXRunner:
    """An mlx-lm model: one sequence with mlx-lm's KV cache, logits per position, greedy generation.

    ``reset()`` starts a fresh sequence (a new ``make_prompt_cache``) and ``forward(tokens)`` appends ``tokens``,
    returning their logits; ``generate`` is mlx-lm's own ``generate_step`` loop. ``threads`` is not applied: MLX has
    no thread setting (its CPU backend runs a stream on one thread).
    """

    def __init__(self, path: Path, threads: int, context_tokens: int, adapter_dir: Path | None = None) -> None:
        self._model = load_mlx_model(Path(path), adapter_dir)
        self.threads = int(threads)
        self._n_ctx = int(context_tokens)
        self._cache: list[Any] | None = None
        self._position = 0

    @property
    def context_tokens(self) -> int:
        return self._n_ctx

    def _live_model(self, length: int) -> Any:
        if self._model is None:
            raise EdgeError("this MLX runner is closed")
        if length > self._n_ctx:
            raise EdgeError(f"sequence of {length} tokens exceeds the context of {self._n_ctx}")
        return self._model

    def reset(self) -> None:
        """Start a fresh sequence."""
        from mlx_lm.models.cache import make_prompt_cache

        self._cache = make_prompt_cache(self._live_model(0))
        self._position = 0

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Append ``tokens`` to the sequence; their logits, float32 ``[len(tokens), vocab]``."""
        import mlx.core as mx

        model = self._live_model(self._position + len(tokens))
        if self._cache is None:
            self.reset()
        logits = model(mx.array(np.asarray(tokens, dtype=np.int32))[None], cache=self._cache)
        self._position += len(tokens)
        return np.array(logits[0].astype(mx.float32))

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        import mlx.core as mx

        model = self._live_model(len(tokens))
        return np.array(model(mx.array(np.asarray(tokens, dtype=np.int32))[None])[0].astype(mx.float32))

    def prefill(self, tokens: Sequence[int]) -> float:
        import mlx.core as mx

        self.reset()
        model = self._live_model(len(tokens))
        start = time.perf_counter()
        logits = model(mx.array(np.asarray(tokens, dtype=np.int32))[None], cache=self._cache)
        mx.eval(logits[:, -1], [c.state for c in self._cache])
        self._position = len(tokens)
        return time.perf_counter() - start

    def generate(self, tokens: Sequence[int], max_new_tokens: int) -> Generation:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        self._live_model(len(tokens) + max_new_tokens - 1)
        self.reset()
        steps = generate_step(mx.array(np.asarray(tokens, dtype=np.int32)), self._model, max_tokens=max_new_tokens,
                              prompt_cache=self._cache)
        start = time.perf_counter()
        ttft = 0.0
        for count, _ in enumerate(steps, start=1):  # greedy: mlx-lm's default sampler is the argmax
            if count == 1:
                ttft = time.perf_counter() - start
            if count == max_new_tokens:
                break
        total = time.perf_counter() - start
        steps.close()
        self._cache = None  # generate_step ran one step ahead: this sequence is done
        return Generation(len(tokens), max_new_tokens, ttft, total)

    def close(self) -> None:
        if self._model is not None:
            import mlx.core as mx

            self._model = None
            self._cache = None
            mx.clear_cache()
