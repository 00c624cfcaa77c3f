"""What this backend needs of OpenVINO and NNCF: the guards that import them, the compression modes this NNCF
offers, and their exceptions and enum values as one line."""

from __future__ import annotations

from typing import Any

from mlflow_edge.backends.base import require
from mlflow_edge.errors import EdgeError

NAME = "openvino"
"""The backend's entry-point name (its params are ``openvino.<option>``; recipes name it) and its extra."""
# CODEBOOK and ADAPTIVE_CODEBOOK need a user codebook (advanced parameters): not offered
_UNOFFERED_MODES = frozenset({"CODEBOOK", "ADAPTIVE_CODEBOOK"})


def require_openvino():
    """The ``openvino`` module, or a one-line error naming the extra to install."""
    return require("openvino", "openvino", NAME)


def require_nncf():
    return require("nncf", "nncf", NAME)


def compress_modes() -> tuple[str, ...]:
    """The :class:`nncf.CompressWeightsMode` names this backend offers."""
    return tuple(m.name for m in require_nncf().CompressWeightsMode if m.name not in _UNOFFERED_MODES)


def first_reason(exc: BaseException) -> str:
    """The reason in an exception: OpenVINO's messages open with location lines (``Exception from src/…``,
    ``Check '…' failed at …``) before it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    return (reasons or lines or [type(exc).__name__])[0][:300]


def enum_name(enum: Any, option: str, value: Any) -> Any:
    """``enum[value]`` by member name (case-insensitive) or value, or a one-line error listing the choices."""
    text = str(getattr(value, "name", value)).strip()
    for member in enum:
        if text.upper() == member.name or text.lower() == str(member.value).lower():
            return member
    raise EdgeError(f"unknown {option} '{value}' (choose from {', '.join(m.name for m in enum)})")
