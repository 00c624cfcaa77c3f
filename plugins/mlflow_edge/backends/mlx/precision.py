"""The precision names of this backend: what this mlx quantizes (bits, group sizes, microscaling modes), a name as
the :class:`Plan` of what it asks of mlx-lm, and the layer types a recipe may name."""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping

import numpy as np

from mlflow_edge.backends.mlx.framework import require_mlx_lm
from mlflow_edge.errors import EdgeError

CONVERT_PRECISIONS = ("float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"f32": "float32", "fp32": "float32", "f16": "float16", "fp16": "float16", "bf16": "bfloat16"}
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}  # mode → (bits, group size), fixed by the format
RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
MIXED = "mixed"
"""The precision whose layer types a recipe file decides (option ``recipe``)."""
DYNAMIC_TARGETS = tuple(f"dynamic_{bpw:g}bpw" for bpw in np.arange(3.0, 8.5, 0.5))  # listed; any target is accepted


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
        check_bits_and_group(bits, group)
        return Plan(f"{match.group(1) or ''}q{bits}_g{group}", "awq" if match.group(1) else "uniform", bits, group)
    raise EdgeError(f"unknown MLX precision '{name}' (choose from q<bits>_g<group>, {', '.join(quant_modes())}, "
                    f"{', '.join(RECIPES)}, dynamic_<bpw>bpw, awq_q<bits>_g<group>, {MIXED} with a recipe)")


def check_bits_and_group(bits: int, group: int) -> None:
    if bits not in affine_bits():
        raise EdgeError(f"this mlx does not quantize to {bits} bits (supported: {', '.join(map(str, affine_bits()))})")
    if group not in group_sizes():
        raise EdgeError(f"this mlx does not quantize in groups of {group} "
                        f"(supported: {', '.join(map(str, group_sizes()))})")


def convert_dtype(precision: str) -> str:
    dtype = _DTYPE_ALIASES.get(str(precision).strip().lower(), str(precision).strip().lower())
    if dtype not in CONVERT_PRECISIONS:
        raise EdgeError(f"unknown MLX conversion type '{precision}' (choose from {', '.join(CONVERT_PRECISIONS)})")
    return dtype


def layer_types(dtype: str) -> dict[str, dict[str, Any] | bool]:
    """The types a recipe may name, as mlx-lm's per-layer quantization entries: every uniform precision this mlx
    quantizes (``q<bits>_g<group>`` and the microscaling modes) and ``dtype``, a layer left unquantized (``False``)."""
    types: dict[str, dict[str, Any] | bool] = {
        f"q{bits}_g{group}": {"group_size": group, "bits": bits, "mode": "affine"}
        for bits in affine_bits() for group in group_sizes()}
    types.update({mode: {"group_size": MODES[mode][1], "bits": MODES[mode][0], "mode": mode} for mode in quant_modes()})
    return {**types, dtype: False}


def type_name(entry: Mapping[str, Any]) -> str:
    """The type of one mlx-lm quantization entry (``{"group_size", "bits", "mode"}``)."""
    mode = entry.get("mode", "affine")
    return f"q{int(entry['bits'])}_g{int(entry['group_size'])}" if mode == "affine" else mode
