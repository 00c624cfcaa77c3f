"""``llama_model_quantize`` in a child process (:mod:`.worker`), and the checks that refuse, before anything is
written, what it would refuse or silently ignore: the type, the importance matrix, re-quantizing, and which of the
per-tensor modes (a recipe file, or a budget to allocate) the options ask for."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from mlflow_edge import procs, recipes
from mlflow_edge.backends.base import Artifact, option_bool
from mlflow_edge.backends.llamacpp.ggml import (
    IMATRIX_REQUIRED,
    MIXED,
    TENSOR_TYPES,
    TENSOR_TYPES_NEED_IMATRIX,
    UNQUANTIZED,
    ggml_type_id,
    quant_types,
)
from mlflow_edge.backends.llamacpp.imatrix import Imatrix
from mlflow_edge.errors import EdgeError

DEFAULT_RECIPE_TYPES = "Q3_K,IQ4_XS,IQ4_NL,Q4_K,Q5_K,Q6_K,Q8_0"
"""Candidate types of a budgeted allocation, 3.4 to 8.5 bits per weight: the k-quants and IQ4 types of llama.cpp's
own mixtures, and Q8_0. IQ4_NL rather than Q4_0: the same size, a lower error on every SmolLM2 tensor measured, and
about the same CPU decode speed (both repacked for AVX2). Q4_1, Q5_0 and Q5_1 are left out: on this x86 CPU they
decode at half Q4_0's speed; llama.cpp still falls back to Q5_0/Q5_1 (and Q8_0) for k-quants on rows whose width is no
multiple of 256 (SmolLM2's 576), and the table records the type it really wrote."""
_NOT_WITH_TARGET = ("output_tensor_type", "token_embedding_type", "leave_output_tensor")
WORKER = "mlflow_edge.backends.llamacpp.worker"
"""The module ``python -m`` runs for one ``llama_model_quantize``."""


def check_quantize(base: Artifact, qtype: str, options: Mapping[str, Any]) -> None:
    """Refuse, before anything is written, what llama.cpp would refuse or silently ignore."""
    types = quant_types()
    if qtype != MIXED and qtype not in types:
        raise EdgeError(f"unknown GGUF quantization type '{qtype}' (choose from {', '.join(types)}, or {MIXED} "
                        "with a recipe)")
    if qtype in IMATRIX_REQUIRED and not option_bool(options.get("imatrix", False)):
        raise EdgeError(f"{qtype} needs an importance matrix: set llamacpp.imatrix=true "
                        "(computed from calibration text)")
    for key in ("output_tensor_type", "token_embedding_type"):
        if options.get(key):
            ggml_type_id(options[key])  # validate early
    if _is_quantized(base) and not option_bool(options.get("allow_requantize", False)):
        raise EdgeError(f"{base.path.name} is already quantized ({base.precision}); "
                        "set llamacpp.allow_requantize=true")


def _is_quantized(artifact: Artifact) -> bool:
    return artifact.precision.upper() not in UNQUANTIZED


def recipe_mode(options: Mapping[str, Any], qtype: str) -> str | None:
    """``"recipe"`` (a recipe file), ``"target"`` (a budget to allocate) or ``None``; one of them at most."""
    given = [k for k in ("recipe", "target_bpw", "target_size_mb") if options.get(k) is not None]
    if len(given) > 1:
        raise EdgeError(f"give one of llamacpp.recipe, target_bpw and target_size_mb, not {' and '.join(given)}")
    if not given:
        if qtype == MIXED:
            raise EdgeError(f"precision {MIXED} needs llamacpp.recipe=<file>, target_bpw=<bits> or "
                            "target_size_mb=<MB>")
        if options.get("recipe_types") is not None:
            raise EdgeError("llamacpp.recipe_types needs target_bpw or target_size_mb")
        return None
    if qtype in UNQUANTIZED:
        raise EdgeError(f"{qtype} is not a quantized type: llama.cpp applies per-tensor types only under one "
                        f"(use {MIXED} or e.g. Q8_0)")
    key = given[0]
    if key != "recipe" and not (math.isfinite(options[key]) and options[key] > 0):
        raise EdgeError(f"llamacpp.{key} must be a positive number, got {options[key]}")
    if key == "recipe":
        if options.get("recipe_types") is not None:
            raise EdgeError("llamacpp.recipe_types needs target_bpw or target_size_mb, not a recipe file")
        return "recipe"
    if fixed := [k for k in _NOT_WITH_TARGET if options.get(k)]:
        raise EdgeError(f"llamacpp.{fixed[0]} cannot be combined with {key}: the allocation chooses every "
                        "tensor's type (edit its recipe.json and apply that instead)")
    return "target"


def candidate_types(options: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``recipe_types`` of an allocation, checked: known ggml types, importance matrix where one is needed."""
    text = options.get("recipe_types") or DEFAULT_RECIPE_TYPES
    types = tuple(dict.fromkeys(t.strip().upper() for t in str(text).split(",") if t.strip()))
    if not types:
        raise EdgeError("llamacpp.recipe_types names no type")
    if unknown := [t for t in types if t not in TENSOR_TYPES]:
        raise EdgeError(f"unknown ggml tensor type in llamacpp.recipe_types: {unknown[0]} "
                        f"(choose from {', '.join(TENSOR_TYPES)})")
    needs = [t for t in types if t in TENSOR_TYPES_NEED_IMATRIX]
    if needs and not option_bool(options.get("imatrix", False)):
        raise EdgeError(f"recipe type {needs[0]} needs an importance matrix: set llamacpp.imatrix=true")
    return types


def run_quantize(base: Artifact, output: Path, default_type: str, options: Mapping[str, Any],
                 imatrix: Imatrix | None, rules: Sequence[recipes.Rule] = (), pure: bool | None = None) -> Path:
    """``llama_model_quantize`` in a child process: ``base`` to ``output`` with file type ``default_type`` and the
    ``rules`` as tensor type overrides; the file appears only when it is complete."""
    partial = output.with_name(output.name + ".partial")
    spec = {
        "input": str(base.path),
        "output": str(partial),
        "ftype": quant_types()[default_type],
        "nthread": int(options.get("nthread") or 0),
        "allow_requantize": option_bool(options.get("allow_requantize", False)),
        "pure": option_bool(options.get("pure", False)) if pure is None else pure,
        "quantize_output_tensor": not option_bool(options.get("leave_output_tensor", False)),
        "output_tensor_type": _tensor_type(options, "output_tensor_type"),
        "token_embedding_type": _tensor_type(options, "token_embedding_type"),
        "imatrix": str(imatrix.path) if imatrix else None,
        "tensor_types": [[rule.pattern, ggml_type_id(rule.type)] for rule in rules],
    }
    proc = procs.run([sys.executable, "-m", WORKER], input=json.dumps(spec), capture_output=True, text=True)
    if proc.returncode != 0 or not partial.is_file():
        full = _full_disk(output.parent)  # before the partial file goes: llama.cpp only says that it failed
        partial.unlink(missing_ok=True)
        what = default_type if not rules else f"{default_type} with {len(rules)} tensor type rule(s)"
        raise EdgeError(f"llama.cpp could not quantize to {what}: {procs.last_error_line(proc.stderr)}{full}")
    return partial.rename(output)


def _tensor_type(options: Mapping[str, Any], key: str) -> int | None:
    return ggml_type_id(options[key]) if options.get(key) else None


def _full_disk(folder: Path) -> str:
    """`` (no space left …)`` when the file system of ``folder`` has under 1 MiB free, else ``""``."""
    stat = os.statvfs(folder)
    if stat.f_bavail * stat.f_frsize >= 1 << 20:
        return ""
    return f" (no space left on the device of {folder.parent}; free some, or set MLFLOW_EDGE_CACHE to a larger one)"
