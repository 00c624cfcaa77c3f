"""llama.cpp / GGUF backend (llama-cpp-python).

- ``convert``: llama.cpp's own ``convert_hf_to_gguf.py`` (shipped in the llama-cpp-python sdist, fetched once into the
  cache) writes ``f32``/``f16``/``bf16``/``q8_0`` GGUF.
- ``quantize``: ``llama_model_quantize`` with every type it offers (``Q2_K`` … ``Q8_0``, ``IQ*``, ``TQ*``), and the
  options of ``llama-quantize``: ``allow_requantize``, ``pure``, ``output_tensor_type``, ``token_embedding_type``,
  ``leave_output_tensor``, and an importance matrix (``imatrix``) computed from calibration text.
- per-tensor mixed precision: a recipe (:mod:`mlflow_edge.recipes`, ``recipe=<file>``) becomes llama.cpp's tensor
  type overrides (``llama-quantize --tensor-type``); ``target_bpw`` / ``target_size_mb`` measure each tensor's error at
  each of ``recipe_types`` once per base (cached), allocate the types within the budget and apply that recipe.
- ``load``: a :class:`LlamaCppRunner` on the llama.cpp C API (per-position logits, timed greedy generation).
"""

from mlflow_edge.backends.llamacpp.backend import LlamaCppBackend
from mlflow_edge.backends.llamacpp.convert import SDIST_SHA256, converter_dir
from mlflow_edge.backends.llamacpp.ggml import MIXED, quant_types, require_llama_cpp
from mlflow_edge.backends.llamacpp.imatrix import read_imatrix
from mlflow_edge.backends.llamacpp.layout import quantizable_tensors
from mlflow_edge.backends.llamacpp.quantize import DEFAULT_RECIPE_TYPES

__all__ = [
    "DEFAULT_RECIPE_TYPES",
    "MIXED",
    "SDIST_SHA256",
    "LlamaCppBackend",
    "converter_dir",
    "quant_types",
    "quantizable_tensors",
    "read_imatrix",
    "require_llama_cpp",
]
