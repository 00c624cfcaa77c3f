"""What this backend needs of its frameworks: the guards that import ONNX Runtime GenAI, onnx and Olive's passes,
and the execution providers the GenAI build has here (the runtime option, from the artifact or the environment)."""

from __future__ import annotations

import os

from mlflow_edge.backends.base import require
from mlflow_edge.errors import EdgeError

NAME = "onnxruntime"
"""The backend's entry-point name (its params are ``onnxruntime.<option>``) and its extra."""
EXECUTION_PROVIDERS = ("cpu", "cuda", "dml")
ENV_PREFIX = "MLFLOW_EDGE_ONNXRUNTIME_"
EXTRA = "pip install 'mlflow-edge[onnxruntime]'"


def require_genai():
    """The ``onnxruntime_genai`` module, or a one-line error naming the extra to install."""
    return require("onnxruntime_genai", "onnxruntime-genai", NAME)


def require_onnx():
    return require("onnx", "onnx", NAME)


def require_olive_passes():
    """Olive's ONNX pass classes, by name, with Olive's logging at warnings."""
    set_verbosity_warning = require("olive.logging", "olive-ai", NAME).set_verbosity_warning
    modules = {name: require(f"olive.passes.onnx.{module}", "olive-ai", NAME)
               for name, module in (("rtn", "rtn_quantization"), ("k_quant", "kquant_quantization"),
                                    ("quantization", "quantization"))}
    set_verbosity_warning()
    return {"rtn": modules["rtn"].OnnxBlockWiseRtnQuantization, "k_quant": modules["k_quant"].OnnxKQuantQuantization,
            "dynamic": modules["quantization"].OnnxDynamicQuantization,
            "static": modules["quantization"].OnnxStaticQuantization}


def available_execution_providers() -> tuple[str, ...]:
    """The execution providers (builder names) this ONNX Runtime GenAI build can use here; ``cpu`` always."""
    og = require_genai()
    found = ["cpu"]
    if og.is_cuda_available():
        found.append("cuda")
    if og.is_dml_available():
        found.append("dml")
    return tuple(found)


def searched_providers() -> list[str]:
    """Execution providers the search samples: those installed here (``cpu`` first)."""
    try:
        return list(available_execution_providers())
    except EdgeError:
        return ["cpu"]


def check_execution_provider(name: str) -> str:
    """``name`` (lower-cased) when this ONNX Runtime GenAI build has it here, else a one-line error."""
    provider = str(name).strip().lower()
    if provider not in EXECUTION_PROVIDERS:
        raise EdgeError(f"unknown execution_provider '{name}' (choose from {', '.join(EXECUTION_PROVIDERS)})")
    available = available_execution_providers()
    if provider not in available:
        raise EdgeError(f"ONNX Runtime execution provider '{provider}' is not available here "
                        f"(available: {', '.join(available)})")
    return provider


def runtime_from_env() -> dict[str, str]:
    """Runtime options from the environment (``MLFLOW_EDGE_ONNXRUNTIME_EXECUTION_PROVIDER``)."""
    value = os.environ.get(ENV_PREFIX + "EXECUTION_PROVIDER")
    return {"execution_provider": value} if value else {}
