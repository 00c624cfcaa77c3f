"""The names llama.cpp and ggml give types: the file types ``llama_model_quantize`` writes, the tensor types a recipe
may name, and the import of llama-cpp-python itself."""

from __future__ import annotations

from pathlib import Path

from mlflow_edge.backends.base import require
from mlflow_edge.errors import EdgeError

CONVERT_PRECISIONS = ("f32", "f16", "bf16", "q8_0")
# llama-quantize refuses these without an importance matrix
IMATRIX_REQUIRED = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"})
GGUF_NAME = "model.gguf"
MIXED = "MIXED"
"""The precision whose types a recipe decides (its ``default_type`` becomes the file type)."""
TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0",
                "TQ2_0", "MXFP4")
"""ggml tensor types a recipe rule may name (llama.cpp quantizes to them; gguf-py reads them back)."""
TENSOR_TYPES_NEED_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})
UNQUANTIZED = frozenset({"F32", "F16", "BF16"})


def require_llama_cpp():
    """The ``llama_cpp`` module, or a one-line error naming the extra to install."""
    return require("llama_cpp", "llama-cpp-python", "llamacpp")


def quant_types() -> dict[str, int]:
    """Every ``llama_ftype`` this llama.cpp build offers, by its llama-quantize name."""
    llama_cpp = require_llama_cpp()
    types = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            types[attr.removeprefix("LLAMA_FTYPE_MOSTLY_")] = int(getattr(llama_cpp, attr))
    return types


def file_type_name(path: Path) -> str:
    """The quantization type a GGUF file records (``general.file_type``, e.g. ``Q4_K_M``), else its name's suffix."""
    import gguf

    field = gguf.GGUFReader(str(path)).get_field("general.file_type")
    names = {number: name for name, number in quant_types().items()}
    if field is not None and int(field.contents()) in names:
        return names[int(field.contents())]
    return path.stem.split(".")[-1]


def ggml_type_id(name: str) -> int:
    from gguf import GGMLQuantizationType

    try:
        return int(GGMLQuantizationType[name.upper()])
    except KeyError:
        raise EdgeError(f"unknown ggml tensor type: {name}") from None
