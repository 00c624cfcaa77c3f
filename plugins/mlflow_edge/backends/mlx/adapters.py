"""mlx-lm LoRA/DoRA adapters: checked against the model they adapt (before anything is written), fused into it
before quantizing, or copied into the artifact to be applied at load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mlflow_edge.backends.mlx.folder import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, safetensors_header
from mlflow_edge.backends.mlx.framework import mlx_call
from mlflow_edge.errors import EdgeError, first_line


def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file() or not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise EdgeError(f"no mlx-lm adapter ({ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}) at {adapter_dir}")
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise EdgeError(f"cannot read {adapter_dir / ADAPTER_CONFIG}: {first_line(exc)}") from exc
    if config.get("fine_tune_type", "lora") != "full" and not {"num_layers", "lora_parameters"} <= set(config):
        raise EdgeError(f"{adapter_dir / ADAPTER_CONFIG} lacks num_layers or lora_parameters")
    safetensors_header(adapter_dir / ADAPTER_WEIGHTS)
    return config


def check_adapter(adapter_dir: Path, model_folder: Path) -> None:
    """Refuse, in one line, an adapter whose weights are not parameters of the model in ``model_folder`` with the
    same shapes (mlx-lm loads adapters with ``strict=False`` and would not notice)."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    adapter_dir = Path(adapter_dir)
    config = _read_adapter_config(adapter_dir)
    model, _ = mlx_call(f"load {model_folder}", lambda: load_model(Path(model_folder), lazy=True))
    if config.get("fine_tune_type", "lora") != "full":
        if int(config["num_layers"]) > len(model.layers):
            raise EdgeError(f"adapter {adapter_dir.name} does not match the base model: it adapts "
                            f"{config['num_layers']} layers, the model has {len(model.layers)}")
        mlx_call(f"apply adapter {adapter_dir.name}", lambda: linear_to_lora_layers(
            model, int(config["num_layers"]), config["lora_parameters"],
            use_dora=config.get("fine_tune_type") == "dora"))
    expected = {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}
    header = safetensors_header(adapter_dir / ADAPTER_WEIGHTS)
    for name, entry in sorted(header.items()):
        if name == "__metadata__":
            continue
        if name not in expected:
            raise EdgeError(f"adapter {adapter_dir.name} does not match the base model: it has no parameter {name}")
        if tuple(entry["shape"]) != expected[name]:
            raise EdgeError(f"adapter {adapter_dir.name} does not match the base model: {name} is "
                            f"{tuple(entry['shape'])}, the model's {expected[name]}")


def fuse_adapter(model: Any) -> Any:
    """Fold the loaded LoRA layers into their base layers (``mlx_lm.fuse``)."""
    from mlx.utils import tree_unflatten

    fused = [(name, module.fuse(dequantize=False)) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


def copy_adapter(adapter_dir: Path, folder: Path) -> None:
    target = folder / ADAPTER_DIR
    target.mkdir()
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        shutil.copyfile(adapter_dir / name, target / name)


def adapter_sha256(adapter_dir: Path) -> str:
    from mlflow_edge import cache

    return cache.sha256_file(Path(adapter_dir) / ADAPTER_WEIGHTS)
