"""An OpenVINO IR folder on disk: its model files and the companions that travel with them (tokenizer, configs),
reading it (a corrupt IR refused in one line), its dominant weight type and the architecture beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow_edge import recipes
from mlflow_edge.backends.openvino.framework import first_reason, require_openvino
from mlflow_edge.errors import EdgeError

MODEL_XML = "openvino_model.xml"
MODEL_BIN = "openvino_model.bin"
EXPORT_TASK = "text-generation-with-past"
# files of the artifact folder that are not the model but travel with it (tokenizer, configs)
_COMPANION_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "openvino_tokenizer.*", "openvino_detokenizer.*")
# the cache's own records, and optimum's quantization config (stale once NNCF has run)
_NOT_COMPANIONS = frozenset({"artifact.json", "key.json", "openvino_config.json"})


def model_xml(path: Path) -> Path:
    """The IR file of an artifact path (its folder, or the ``.xml`` itself)."""
    path = Path(path)
    return path / MODEL_XML if path.is_dir() else path


def model_files(folder: Path) -> tuple[Path, Path]:
    """The files whose bytes are the model's size: the IR and its weights."""
    return Path(folder) / MODEL_XML, Path(folder) / MODEL_BIN


def companion_files(folder: Path) -> list[Path]:
    """Tokenizer and config files beside the IR in ``folder`` (everything a runtime needs but the model files)."""
    found = {p for pattern in _COMPANION_PATTERNS for p in Path(folder).glob(pattern) if p.is_file()}
    return sorted(p for p in found if p.name not in _NOT_COMPANIONS | {MODEL_XML, MODEL_BIN, *recipes.SIDE_FILES})


def read_model(path: Path) -> Any:
    ov = require_openvino()
    xml = model_xml(path)
    if not xml.is_file():
        raise EdgeError(f"no OpenVINO IR at {xml}")
    try:
        return ov.Core().read_model(str(xml))
    except Exception as exc:
        raise EdgeError(f"OpenVINO cannot read {xml}: {first_reason(exc)}") from exc


def dominant_weight_type(model: Any) -> str:
    """The element type holding most constant bytes of ``model`` (``f16``, ``u8``, ``u4`` …): a local IR's precision."""
    totals: dict[str, int] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant":
            element = op.get_output_element_type(0)
            totals[element.get_type_name()] = totals.get(element.get_type_name(), 0) + op.get_byte_size()
    return max(totals, key=totals.__getitem__) if totals else "unknown"


def ir_architecture(folder: Path) -> str | None:
    """The ``model_type`` of the ``config.json`` that optimum-intel writes beside the IR (``None`` without one)."""
    try:
        return str(json.loads((Path(folder) / "config.json").read_text())["model_type"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
