"""One ``llama_model_quantize``, run as ``python -m mlflow_edge.backends.llamacpp.worker`` with its JSON spec (from
:func:`~mlflow_edge.backends.llamacpp.quantize.run_quantize`) as the argument or on stdin: in a child process, so
that a llama.cpp abort cannot take the caller down."""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mlflow_edge.backends.llamacpp.ggml import require_llama_cpp
from mlflow_edge.backends.llamacpp.imatrix import read_imatrix


def _quantize_worker(spec: dict[str, Any]) -> int:
    """Runs in a child process so that a llama.cpp abort cannot take the caller down."""
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = spec["ftype"]
    params.nthread = spec["nthread"]
    params.allow_requantize = spec["allow_requantize"]
    params.pure = spec["pure"]
    params.quantize_output_tensor = spec["quantize_output_tensor"]
    if spec["output_tensor_type"] is not None:
        params.output_tensor_type = spec["output_tensor_type"]
    if spec["token_embedding_type"] is not None:
        params.token_embedding_type = spec["token_embedding_type"]
    keep_alive: list[Any] = []
    if spec.get("tensor_types"):  # llama-quantize --tensor-type PATTERN=TYPE, in order; the first match wins
        params.tt_overrides = _tensor_overrides(llama_cpp, spec["tensor_types"], keep_alive)
    if spec["imatrix"]:
        params.imatrix = _imatrix_data(llama_cpp, read_imatrix(Path(spec["imatrix"])), keep_alive)
    rc = llama_cpp.llama_model_quantize(spec["input"].encode(), spec["output"].encode(), ctypes.byref(params))
    if rc != 0:
        print(f"error: llama_model_quantize returned {rc}", file=sys.stderr)
    return rc


def _tensor_overrides(llama_cpp: Any, rules: list[list[Any]], keep_alive: list[Any]) -> Any:
    """The ``(pattern, type)`` rules as llama.cpp's null-terminated tensor override array (its buffers kept alive in
    ``keep_alive``)."""
    overrides = (llama_cpp.llama_model_tensor_override * (len(rules) + 1))()
    for i, (pattern, type_id) in enumerate(rules):
        encoded = pattern.encode()
        keep_alive.append(encoded)
        overrides[i].pattern = encoded
        overrides[i].type = int(type_id)
    overrides[len(rules)].pattern = None
    keep_alive.append(overrides)
    return ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))


def _imatrix_data(llama_cpp: Any, entries: dict[str, np.ndarray], keep_alive: list[Any]) -> Any:
    """The importance matrix as llama.cpp's null-terminated array of named float vectors (buffers kept alive in
    ``keep_alive``)."""
    array = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
    for i, (name, values) in enumerate(sorted(entries.items())):
        values = np.ascontiguousarray(values, dtype=np.float32)
        encoded = name.encode()
        keep_alive += [values, encoded]
        array[i].name = encoded
        array[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        array[i].size = values.size
    array[len(entries)].name = None
    keep_alive.append(array)
    return ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))


if __name__ == "__main__":
    sys.exit(_quantize_worker(json.loads(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read())))
