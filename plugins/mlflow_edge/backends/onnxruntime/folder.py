"""A GenAI model folder on disk: ``genai_config.json``, the decoder graph and its external data, the tokenizer files
beside them; reading one checked (a corrupt or truncated model is refused in one line), its precision, and the
staging folder a conversion or quantization builds in before it publishes."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Any, Iterator

from mlflow_edge.backends.onnxruntime.framework import require_onnx
from mlflow_edge.backends.onnxruntime.precision import INT8_DYNAMIC, INT8_STATIC
from mlflow_edge.errors import EdgeError, first_line

MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
QUANTIZATION_RECORD = "quantization.json"
# files of an artifact folder that are not the model but travel with it (GenAI config, tokenizer, chat template)
_COMPANION_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model")
_NOT_COMPANIONS = frozenset({"artifact.json", "key.json", QUANTIZATION_RECORD})
METADATA_PRECISION = "mlflow_edge.precision"


def model_folder(path: Path) -> Path | None:
    """The GenAI model folder of ``path`` (a folder with ``genai_config.json``, or its decoder ``.onnx``), or
    ``None`` when it is none."""
    folder = path.parent if path.is_file() and path.suffix.lower() == ".onnx" else path
    if not folder.is_dir() or not (folder / GENAI_CONFIG).is_file():
        return None
    if path.is_file() and path.name != decoder_file(folder):
        return None
    return folder


def genai_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / GENAI_CONFIG).read_text())
        config["model"]["decoder"]  # noqa: B018  (the part every decoder-only model has)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EdgeError(f"not a valid {GENAI_CONFIG}: {folder / GENAI_CONFIG} ({first_line(exc)})") from exc
    return config


def decoder_file(folder: Path) -> str:
    try:
        return str(json.loads((folder / GENAI_CONFIG).read_text())["model"]["decoder"].get("filename", MODEL_FILE))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return MODEL_FILE


def read_graph(folder: Path) -> tuple[Any, list[Path]]:
    """The decoder graph of ``folder`` (without its weights) and the model files (graph, external data), checked:
    a corrupt graph, a missing or truncated external-data file is a one-line :class:`EdgeError`."""
    onnx = require_onnx()
    genai_config(folder)
    model_path = folder / decoder_file(folder)
    if not model_path.is_file():
        raise EdgeError(f"no {model_path.name} in {folder}")
    try:
        graph = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends
        raise EdgeError(f"not a valid ONNX model: {model_path} ({first_line(exc)})") from exc
    # onnx.checker knows none of ONNX Runtime's own operators (SimplifiedLayerNormalization, GroupQueryAttention):
    # check what the GenAI runtime reads instead, the decoder's inputs, outputs and opsets
    names = {v.name for v in graph.graph.input} | {v.name for v in graph.graph.output}
    if not graph.opset_import or not graph.graph.node or not {"input_ids", "logits"} <= names:
        raise EdgeError(f"not a valid ONNX Runtime GenAI decoder: {model_path} (no input_ids/logits or no opsets)")
    return graph, [model_path, *_external_files(graph, folder)]


def _external_files(graph: Any, folder: Path) -> list[Path]:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    needed: dict[Path, int] = {}
    for tensor in graph.graph.initializer:
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            file = folder / info.location
            end = (info.offset or 0) + (info.length or 0)
            needed[file] = max(needed.get(file, 0), end)
    for file, end in needed.items():
        if not file.is_file():
            raise EdgeError(f"missing external data file {file.name} of {folder / decoder_file(folder)}")
        if file.stat().st_size < end:
            raise EdgeError(f"truncated external data file: {file} ({file.stat().st_size} bytes, tensors need {end})")
    return sorted(needed)


def graph_precision(graph: Any) -> str:
    """The precision of a model graph: mlflow-edge's record in its metadata, else read from its operators and
    weights (``int4``, ``int8``, ``int8_dynamic``, ``int8_static``, ``fp32``, ``fp16``, ``bf16``)."""
    recorded = {p.key: p.value for p in graph.metadata_props}
    if METADATA_PRECISION in recorded:
        return recorded[METADATA_PRECISION]
    ops = [node for node in graph.graph.node]
    bits = [a.i for node in ops if node.op_type == "MatMulNBits" for a in node.attribute if a.name == "bits"]
    if bits:
        return f"int{max(set(bits), key=bits.count)}"
    types = {node.op_type for node in ops}
    if "MatMulInteger" in types:
        return INT8_DYNAMIC
    if types & {"QLinearMatMul", "DequantizeLinear"}:
        return INT8_STATIC
    sizes: dict[int, int] = {}
    for tensor in graph.graph.initializer:
        sizes[tensor.data_type] = sizes.get(tensor.data_type, 0) + math.prod(tensor.dims)
    names = {1: "fp32", 10: "fp16", 16: "bf16"}
    floats = {k: v for k, v in sizes.items() if k in names}
    return names[max(floats, key=floats.__getitem__)] if floats else "unknown"


def companion_files(folder: Path) -> list[Path]:
    """GenAI config and tokenizer files beside the model in ``folder`` (everything the runtime needs but the model)."""
    found = {p for pattern in _COMPANION_PATTERNS for p in Path(folder).glob(pattern) if p.is_file()}
    return sorted(p for p in found if p.name not in _NOT_COMPANIONS)


@contextlib.contextmanager
def staging_folder(out_dir: Path, name: str) -> Iterator[Path]:
    """A fresh ``out_dir/name`` to build in; on any failure it goes (with ``out_dir`` when this call created it)."""
    created = not out_dir.exists()
    staging = out_dir / name
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(out_dir if created else staging, ignore_errors=True)
        raise


def publish(folder: Path, out_dir: Path) -> None:
    """Move the finished files of ``folder`` into ``out_dir`` (the model files last) and remove ``folder``."""
    items = sorted(folder.iterdir(), key=lambda p: p.suffix in (".onnx", ".data"))
    for item in items:
        item.replace(out_dir / item.name)
    folder.rmdir()


def save_model(model: Any, folder: Path) -> None:
    """``model`` as ``folder/model.onnx`` with its weights in ``model.onnx.data``."""
    require_onnx().save_model(model, str(folder / MODEL_FILE), save_as_external_data=True,
                              all_tensors_to_one_file=True, location=MODEL_FILE + ".data", size_threshold=1024)
