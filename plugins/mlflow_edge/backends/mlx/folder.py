"""An MLX folder on disk: its safetensors weights (headers checked whole), its config and precision, the staging
folder mlx-lm writes into, and where an adapter travels inside it."""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping

from mlflow_edge.errors import EdgeError, first_line

SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
ADAPTER_DIR = "adapters"
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_STAGING = ".mlx.partial"


def safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file; :class:`EdgeError` when it is unreadable or the data is truncated."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as stream:
            length = struct.unpack("<Q", stream.read(8))[0]
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(stream.read(length))
        end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"), default=0)
    except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise EdgeError(f"not a valid safetensors file: {file} ({first_line(exc)})") from exc
    if 8 + length + end != size:
        raise EdgeError(f"truncated or corrupt safetensors file: {file} ({size} bytes, its header needs "
                        f"{8 + length + end})")
    return header


def weight_files(folder: Path) -> list[Path]:
    """The model weight files of an MLX folder (mlx-lm loads ``model*.safetensors``)."""
    return sorted(p for p in Path(folder).glob("model*.safetensors") if p.is_file())


def model_files(folder: Path) -> tuple[Path, ...]:
    """Files whose bytes count as an MLX artifact's size: the weights and an adapter that travels with them."""
    adapter = Path(folder) / ADAPTER_DIR / ADAPTER_WEIGHTS
    return (*weight_files(folder), *([adapter] if adapter.is_file() else []))


def is_mlx_folder(path: Path) -> bool:
    """A folder with ``config.json`` and weights that mlx-lm saved (safetensors metadata ``format: mlx``)."""
    path = Path(path)
    if not (path.is_dir() and (path / "config.json").is_file() and weight_files(path)):
        return False
    try:
        with open(weight_files(path)[0], "rb") as stream:
            length = struct.unpack("<Q", stream.read(8))[0]
            metadata = json.loads(stream.read(min(length, 1 << 24))).get("__metadata__") or {}
    except (OSError, struct.error, ValueError, UnicodeDecodeError, AttributeError):
        return True  # an unreadable header: this format's folder, corrupt (check_folder says how)
    return metadata.get("format") == "mlx"


def check_folder(path: Path) -> dict[str, Any]:
    """``config.json`` of the MLX folder ``path`` after checking every weight file; :class:`EdgeError` otherwise."""
    folder = Path(path)
    if not (folder / "config.json").is_file() or not weight_files(folder):
        raise EdgeError(f"no MLX model (config.json and model*.safetensors) at {folder}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise EdgeError(f"cannot read {folder / 'config.json'}: {first_line(exc)}") from exc
    if config.get("model_file"):  # mlx-lm would execute that file from the folder
        raise EdgeError(f"{folder} needs custom model code ({config['model_file']}); it is not loaded")
    for file in model_files(folder):
        safetensors_header(file)
    return config


def folder_precision(folder: Path, config: Mapping[str, Any]) -> str:
    """A precision name for an MLX folder made elsewhere: its float dtype, ``q<bits>_g<group>``, a mode, or
    ``mixed_<low>_<high>`` when layers differ (the method that chose them is not recorded in the folder)."""
    quantization = config.get("quantization")
    if not quantization:
        return _float_dtype(folder)
    layers = [v for v in quantization.values() if isinstance(v, dict)]
    bits = sorted({int(v.get("bits", quantization.get("bits", 4))) for v in layers} | {int(quantization["bits"])})
    if len(bits) > 1:
        return f"mixed_{bits[0]}_{bits[-1]}"
    mode = quantization.get("mode", "affine")
    return mode if mode != "affine" else f"q{bits[0]}_g{quantization['group_size']}"


def _float_dtype(folder: Path) -> str:
    """The float type holding most weight bytes of an MLX folder (``float32``, ``float16``, ``bfloat16``)."""
    totals: dict[str, int] = {}
    for file in weight_files(folder):
        for key, entry in safetensors_header(file).items():
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"]) if key != "__metadata__" else None
            if dtype:
                totals[dtype] = totals.get(dtype, 0) + entry["data_offsets"][1] - entry["data_offsets"][0]
    return max(totals, key=totals.__getitem__) if totals else "unknown"


def legacy_rope_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """``rope_theta`` (and ``rope_scaling`` for scaled RoPE) from transformers 5's ``rope_parameters``, when the
    config lacks them: mlx-lm 0.31's model classes read only the legacy keys (default theta 10000)."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_theta" in config:
        return {}
    keys: dict[str, Any] = {"rope_theta": rope["rope_theta"]}
    if rope.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        keys["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return keys


@contextlib.contextmanager
def writing_into(out_dir: Path) -> Iterator[Path]:
    """A staging folder inside ``out_dir`` that mlx-lm writes (it must not exist yet); its files move into
    ``out_dir`` on success, and nothing written stays behind on failure."""
    created = not out_dir.exists()
    staging = out_dir / _STAGING
    moved: list[Path] = []
    shutil.rmtree(staging, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
        if not (staging / "config.json").is_file():
            raise EdgeError(f"mlx-lm wrote no config.json into {out_dir}")
        for item in sorted(staging.iterdir()):
            moved.append(item.replace(out_dir / item.name))
        staging.rmdir()
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:
            shutil.rmtree(staging, ignore_errors=True)
            for item in moved:
                shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
        raise
