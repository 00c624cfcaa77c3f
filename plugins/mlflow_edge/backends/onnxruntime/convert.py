"""The conversion: the ONNX Runtime GenAI model builder (``python -m onnxruntime_genai.models.builder``), run in this
process into a staging folder, and the architectures it exports (read from its source)."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

from mlflow_edge.backends.onnxruntime.folder import GENAI_CONFIG, MODEL_FILE, publish, read_graph, staging_folder
from mlflow_edge.backends.onnxruntime.precision import BUILDER_PROVIDER
from mlflow_edge.errors import EdgeError, first_line

_NOT_CAUSAL_LM = frozenset({"WhisperForConditionalGeneration"})  # the builder exports it, but it is speech-to-text


def builder_architectures() -> frozenset[str]:
    """HF architectures the installed model builder exports as causal LMs (read from its source, not imported:
    importing it loads torch)."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    script = Path(next(iter(spec.submodule_search_locations))) / "models" / "builder.py"
    try:
        text = script.read_text(encoding="utf-8")
    except OSError:
        return frozenset()
    return frozenset(re.findall(r"architectures\[0\] == \"([A-Za-z0-9_]+)\"", text)) - _NOT_CAUSAL_LM


def _run_model_builder(source_path: Path, out_dir: Path, precision: str, provider: str, source_name: str) -> None:
    """``python -m onnxruntime_genai.models.builder -i source -o out_dir -p precision -e provider``, in this process
    (its output kept from the terminal; the first line of its error becomes the message)."""
    cache_dir = out_dir / ".builder-cache"
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            import onnxruntime_genai.models  # noqa: F401  (puts the builder's own modules on sys.path)
            from onnxruntime_genai.models.builder import create_model, parse_extra_options

            extra = parse_extra_options(None, str(source_path), str(out_dir), precision, provider, str(cache_dir),
                                        ["hf_token=false"])
            create_model(None, str(source_path), str(out_dir), precision, provider, str(cache_dir), **extra)
    except Exception as exc:  # the builder raises ValueError, NotImplementedError, OSError, torch errors ...
        raise EdgeError(f"the ONNX Runtime GenAI model builder cannot export {source_name}: {first_line(exc)}") from exc
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if not (out_dir / MODEL_FILE).is_file() or not (out_dir / GENAI_CONFIG).is_file():
        raise EdgeError(f"the ONNX Runtime GenAI model builder wrote no {MODEL_FILE} for {source_name}")


def export_folder(source_path: Path, out_dir: Path, precision: str, source_name: str) -> list[Path]:
    """The builder's graph of ``source_path`` at ``precision`` (checked) published into ``out_dir``; its model files
    (graph, external data) there."""
    provider = BUILDER_PROVIDER[precision]
    with staging_folder(out_dir, ".export.partial") as staging:
        _run_model_builder(source_path, staging, precision, provider, source_name)
        _, files = read_graph(staging)
        publish(staging, out_dir)
    return [out_dir / f.name for f in files]
