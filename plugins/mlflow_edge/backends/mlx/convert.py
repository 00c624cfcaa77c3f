"""HF checkpoint → MLX folder through ``mlx_lm.convert``, with the legacy RoPE keys mlx-lm's model classes read,
and whether mlx-lm has a model class for a source at all."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mlflow_edge.backends.mlx.folder import legacy_rope_keys, writing_into
from mlflow_edge.backends.mlx.framework import mlx_call
from mlflow_edge.errors import EdgeError, first_line


def convert_folder(source: Any, out_dir: Path, dtype: str) -> None:
    """Write ``source`` as an MLX folder at ``dtype`` into ``out_dir`` (nothing stays behind on failure)."""
    if reason := convertible_reason(source):
        raise EdgeError(f"unsupported architecture: {reason}")
    from mlx_lm.convert import convert

    with writing_into(Path(out_dir)) as staging:
        mlx_call(f"convert {source.name}", lambda: convert(str(source.path), str(staging), dtype=dtype))
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        if legacy := legacy_rope_keys(config):
            config_path.write_text(json.dumps({**config, **legacy}, indent=4, sort_keys=True))


def convertible_reason(source: Any) -> str | None:
    """``None`` when mlx-lm has a model class for the source's ``model_type`` (one module per type in
    ``mlx_lm.models``, after its ``MODEL_REMAPPING``), else why not."""
    import importlib.util

    try:
        from mlx_lm.utils import MODEL_REMAPPING
    except ImportError:
        return "mlx-lm is not installed: pip install 'mlflow-edge[mlx]'"
    try:
        config = json.loads((Path(source.path) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"cannot read the config of {source.name}: {first_line(exc)}"
    if config.get("model_file"):
        return f"{source.name} needs custom model code ({config['model_file']})"
    model_type = str(config.get("model_type", ""))
    module = MODEL_REMAPPING.get(model_type, model_type)
    if model_type and re.fullmatch(r"[A-Za-z0-9_]+", module) and importlib.util.find_spec(f"mlx_lm.models.{module}"):
        return None
    return f"mlx-lm has no model class for {source.architecture} (model_type '{model_type}')"
