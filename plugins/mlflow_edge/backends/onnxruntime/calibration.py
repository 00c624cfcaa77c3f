"""Calibration for the data-aware methods (``int4_gptq``, ``int8_static``): consecutive windows of the calibration
text in the source tokenizer's ids, the decoder's feeds for each (a fresh sequence, an empty KV cache), and what an
artifact records of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mlflow_edge.backends.onnxruntime.plan import Request
from mlflow_edge.errors import EdgeError


def calibration_windows(request: Request, calibration: Any, tokenizer_folder: Path) -> np.ndarray:
    """``[samples, tokens]`` token ids of the calibration text (consecutive windows), or a one-line error."""
    if calibration is None:
        raise EdgeError(f"{request.precision} reads calibration text; none was given")
    from transformers import AutoTokenizer

    seq_len = int(request.options.get("calibration_tokens", 128))
    samples = int(request.options.get("calibration_samples", 16))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    ids = tokenizer(calibration.text(), add_special_tokens=False)["input_ids"]
    count = min(samples, len(ids) // seq_len)
    if count < 1:
        raise EdgeError(f"calibration text {calibration.label} has {len(ids)} tokens, fewer than one window of "
                        f"{seq_len} (calibration_tokens)")
    return np.asarray(ids[: count * seq_len], dtype=np.int64).reshape(count, seq_len)


def calibration_record(calibration: Any, windows: np.ndarray | None) -> dict[str, Any]:
    if windows is None:
        return {}
    return {"calibration_samples": int(windows.shape[0]), "calibration_tokens": int(windows.shape[1]),
            "calib.dataset": calibration.label, "calib.sha256": calibration.sha256}


def decoder_feeds(model: Any, config: Mapping[str, Any], windows: np.ndarray) -> list[dict[str, np.ndarray]]:
    """The decoder's inputs for each window as a fresh sequence: ids, mask, and an empty KV cache."""
    decoder = config["model"]["decoder"]
    feeds = []
    for window in windows:
        feed: dict[str, np.ndarray] = {"input_ids": window[None, :].astype(np.int64),
                                       "attention_mask": np.ones((1, len(window)), dtype=np.int64)}
        for graph_input in model.graph.input:
            name, elem_type = graph_input.name, graph_input.type.tensor_type.elem_type
            if name.startswith("past_key_values"):
                shape = (1, decoder["num_key_value_heads"], 0, decoder["head_size"])
                feed[name] = np.zeros(shape, dtype=np.float16 if elem_type == 10 else np.float32)
            elif name == "position_ids":
                feed[name] = np.arange(len(window), dtype=np.int64)[None, :]
        feeds.append(feed)
    return feeds
