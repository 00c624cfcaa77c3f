"""The per-tensor sensitivity table of a base GGUF: every quantizable tensor at each candidate type, as llama.cpp
really writes it (fallbacks included), with its size in bits and its predicted error, measured once per base and
cached; and what a recipe or an estimate reads from it."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mlflow_edge import cache, recipes
from mlflow_edge.backends.base import Artifact, option_bool
from mlflow_edge.backends.llamacpp.ggml import UNQUANTIZED, quant_types, require_llama_cpp
from mlflow_edge.backends.llamacpp.imatrix import Imatrix, fisher_factors, imatrix_key
from mlflow_edge.backends.llamacpp.layout import gguf_layout, quantizable_tensors, tensor_reader
from mlflow_edge.backends.llamacpp.quantize import candidate_types, run_quantize

TABLE_TYPE = {"Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
              "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q8_0": "Q8_0"}
"""The sensitivity table's type a uniform type is estimated by (its mixtures' main k-quant)."""
FALLBACK_TYPE = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1",
                 "Q6_K": "Q8_0"}
"""The type llama.cpp writes instead of a k-quant on a row that is no multiple of 256 (the table holds its row)."""


def _sensitivity_key(base: Artifact, types: Sequence[str], options: Mapping[str, Any],
                     imatrix: Mapping[str, Any] | None, calibration: Any, source: Any) -> dict[str, Any]:
    weighted = calibration is not None and source is not None
    chunks = int(options.get("imatrix_chunks") or 16)
    return {"source": base.source_sha256, "base": base.precision, "base_bytes": base.path.stat().st_size,
            "types": list(types), "imatrix": dict(imatrix) if imatrix else None,
            "fisher": {"calibration": calibration.sha256, "chunks": chunks} if weighted else None,
            "allow_requantize": option_bool(options.get("allow_requantize", False)),
            "llama_cpp_python": require_llama_cpp().__version__, "version": 1}


def measured_sensitivity(base: Artifact, options: Mapping[str, Any], calibration: Any, source: Any) -> Any:
    """The sensitivity table a budgeted recipe with ``options`` would use, when it is already measured (cached),
    else ``None``: nothing is measured here."""
    imatrix = option_bool(options.get("imatrix", False))
    if imatrix and (calibration is None or source is None):
        return None
    key = _sensitivity_key(base, candidate_types(options), options,
                           imatrix_key(base, options, calibration, source) if imatrix else None, calibration, source)
    folder = cache.find("gguf-sensitivity", key)
    return None if folder is None else _read_table(str(folder))


@functools.lru_cache(maxsize=8)
def _read_table(folder: str) -> Any:
    """A cached sensitivity table (an entry's content never changes: its key is its content's recipe)."""
    import pandas as pd

    return pd.read_csv(Path(folder) / "sensitivity.csv", dtype={"tensor": str, "type": str})


def sensitivity_table(base: Artifact, types: Sequence[str], options: Mapping[str, Any], imatrix: Imatrix | None,
                      calibration: Any = None, source: Any = None) -> Any:
    """The sensitivity table of ``base`` (:data:`mlflow_edge.recipes.TABLE_COLUMNS`): every quantizable tensor at the
    type llama.cpp really writes for each of ``types`` (fallbacks included), its size in bits and its predicted error
    (:func:`tensor_errors`; weighted by the diagonal Fisher of the source on ``calibration`` when both are given).
    Measured once per source, base, types, importance matrix and calibration text (cached)."""
    import pandas as pd

    chunks = int(options.get("imatrix_chunks") or 16)
    weighted = calibration is not None and source is not None
    key = _sensitivity_key(base, types, options, imatrix.key if imatrix else None, calibration, source)

    def measure(tmp: Path) -> None:
        fisher = fisher_factors(source, base.path, calibration, chunks) if weighted else None
        quantized = {kind: run_quantize(base, tmp / f"{kind}.gguf", "Q8_0", options, imatrix,
                                        (recipes.Rule(".", kind),), pure=True) for kind in types}
        tensor_errors(base.path, quantized, fisher).to_csv(tmp / "sensitivity.csv", index=False)
        for path in quantized.values():
            path.unlink()

    folder = cache.get_or_build("gguf-sensitivity", key, measure)
    return pd.read_csv(folder / "sensitivity.csv", dtype={"tensor": str, "type": str})


def tensor_errors(base_path: Path, quantized: Mapping[str, Path],
                  fisher: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]] | None = None) -> Any:
    """One row per quantizable tensor and real type among the ``quantized`` files: params, bits and predicted error.

    The error of a tensor W quantized to Ŵ is Σ_ij r_i c_j (W - Ŵ)²_ij summed over its ``fisher`` factor pairs
    (r per row, c per column; :func:`fisher_factors`): twice the KL divergence it adds per token to second order.
    Without factors (no ``fisher``) it is the plain squared error; a tensor the factors miss gets that times the
    average over the others of mean(r) · mean(c).
    """
    import pandas as pd
    from gguf.quants import dequantize

    def tensors(path: Path) -> dict[str, Any]:
        return {t.name: t for t in tensor_reader()(str(path)).tensors}

    names = quantizable_tensors(base_path)[1]
    fallback = _mean_factor(fisher) if fisher else 1.0
    base = tensors(base_path)
    outputs = [tensors(path) for path in quantized.values()]
    rows = []
    for name in names:
        reference = dequantize(base[name].data, base[name].tensor_type).astype(np.float32, copy=False)
        for output in outputs:
            tensor = output[name]
            squares = np.square(reference - dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
            error = _weighted_error(squares, (fisher or {}).get(name), fallback)
            rows.append((name, tensor.tensor_type.name, int(tensor.n_elements), 8 * int(tensor.n_bytes), error))
    table = pd.DataFrame(rows, columns=list(recipes.TABLE_COLUMNS))
    return table.drop_duplicates(["tensor", "type"], ignore_index=True)


def _weighted_error(squares: np.ndarray, factors: Sequence[tuple[np.ndarray, np.ndarray]] | None,
                    fallback: float) -> float:
    shaped = squares.reshape(-1, squares.shape[-1]).astype(np.float64)  # experts' rows one after the other
    usable = [(r, c) for r, c in factors or () if r.size == shaped.shape[0] and c.size == shaped.shape[1]]
    if not usable:
        return float(shaped.sum()) * fallback
    return float(sum((r.astype(np.float64) @ shaped) @ c.astype(np.float64) for r, c in usable))


def _mean_factor(fisher: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]]) -> float:
    return float(np.mean([float(r.mean()) * float(c.mean()) for pairs in fisher.values() for r, c in pairs]))


def uniform_error(table: Any, kind: str) -> float | None:
    """The table's summed error with every tensor at ``kind`` (its fallback's row where llama.cpp wrote that)."""
    by_tensor = table.set_index(["tensor", "type"])["error"]
    total = 0.0
    for tensor in table["tensor"].unique():
        for candidate in (kind, FALLBACK_TYPE.get(kind)):
            if candidate and (tensor, candidate) in by_tensor.index:
                total += float(by_tensor[(tensor, candidate)])
                break
        else:
            return None
    return total


def fixed_bits(base_path: Path, table: Any) -> float:
    """Bits of a quantized file besides the table's tensors: the base file less those tensors, plus a margin for the
    alignment of each tensor (32 bytes)."""
    names = set(table["tensor"])
    tensors = gguf_layout(base_path)[2]
    table_bytes = sum(n_bytes for name, _, n_bytes in tensors if name in names)
    return 8.0 * (base_path.stat().st_size - table_bytes + 32 * len(tensors))


def default_type(allocation: Mapping[str, str], table: Any) -> str:
    """The file type of a mixed recipe: that of the type holding most parameters (Q8_0 when it is none)."""
    params = table.drop_duplicates("tensor").set_index("tensor")["params"]
    held: dict[str, int] = {}
    for tensor, kind in allocation.items():
        held[kind] = held.get(kind, 0) + int(params[tensor])
    kind = max(held, key=lambda k: (held[k], k))
    ftypes = quant_types()
    return next((n for n in (kind, f"{kind}_S") if n in ftypes and n not in UNQUANTIZED), "Q8_0")
