"""The precisions this backend writes, by name: the builder's float graphs, the weight-only ``MatMulNBits`` methods,
the two int8 methods, and which quantization options apply to which of them."""

from __future__ import annotations

from mlflow_edge.errors import EdgeError

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

# which options apply to which precisions (the runtime option applies to all)
_INT8 = frozenset({INT8_DYNAMIC, INT8_STATIC})
APPLIES_TO: dict[str, frozenset[str]] = {
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


def convert_precision(precision: str) -> str:
    """``precision`` as one of :data:`CONVERT_PRECISIONS` (aliases such as ``f16`` accepted), else a one-line
    error."""
    precision = _CONVERT_ALIASES.get(precision.strip().lower(), precision.strip().lower())
    if precision not in CONVERT_PRECISIONS:
        raise EdgeError(f"unknown ONNX Runtime GenAI conversion type '{precision}' "
                        f"(choose from {', '.join(CONVERT_PRECISIONS)})")
    return precision


def quantize_precision(precision: str) -> str:
    """``precision`` as one of :data:`QUANTIZE_PRECISIONS`, else a one-line error."""
    precision = str(precision).strip().lower()
    if precision not in QUANTIZE_PRECISIONS:
        raise EdgeError(f"unknown ONNX Runtime quantization precision '{precision}' "
                        f"(choose from {', '.join(QUANTIZE_PRECISIONS)})")
    return precision
