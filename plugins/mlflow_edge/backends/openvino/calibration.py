"""Calibration text for the data-aware NNCF methods: tokenized with the source tokenizer into windows fed with the
stateful model's inputs, and the ``1 / perplexity`` that accuracy control validates on held-out windows."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mlflow_edge.backends.openvino.precision import PTQ_PRECISION, needs_data
from mlflow_edge.errors import EdgeError


def token_ids(calibration: Any, tokenizer_folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    return tokenizer(calibration.text(), add_special_tokens=False)["input_ids"]


def calibration_samples(model: Any, token_ids: Sequence[int], seq_len: int) -> list[dict[str, np.ndarray]]:
    """Consecutive windows of ``seq_len`` tokens, each a fresh sequence for the stateful IR's inputs."""
    names = {name for port in model.inputs for name in port.get_names()}
    count = len(token_ids) // seq_len
    if count < 1:
        raise EdgeError(f"calibration text has {len(token_ids)} tokens, fewer than one sample of {seq_len}")
    samples = []
    for window in range(count):
        ids = np.asarray(token_ids[window * seq_len : (window + 1) * seq_len], dtype=np.int64)[None, :]
        sample = {"input_ids": ids}
        if "attention_mask" in names:
            sample["attention_mask"] = np.ones_like(ids)
        if "position_ids" in names:
            sample["position_ids"] = np.arange(seq_len, dtype=np.int64)[None, :]
        if "beam_idx" in names:
            sample["beam_idx"] = np.zeros(1, dtype=np.int32)
        samples.append(sample)
    return samples


def calibration_data(model: Any, precision: str, options: Mapping[str, Any], calibration: Any,
                     tokenizer_folder: Path) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """The windows ``precision`` with ``options`` reads (none for a data-free method), and what they record."""
    if precision != PTQ_PRECISION and not needs_data(options):
        return [], {}
    if calibration is None:
        raise EdgeError(f"{precision} with these options reads calibration text; none was given")
    seq_len = int(options.get("calibration_tokens", 128))
    if seq_len < 8:
        raise EdgeError(f"calibration_tokens must be at least 8, got {seq_len}")
    samples = calibration_samples(model, token_ids(calibration, tokenizer_folder), seq_len)
    return samples, {"calibration_tokens": seq_len, "calib.dataset": calibration.label,
                     "calib.sha256": calibration.sha256}


def inverse_perplexity(compiled_model: Any, validation_data: Any) -> tuple[float, list[float]]:
    """``1 / perplexity`` of the next tokens over all validation windows, and per window (higher is better)."""
    request = compiled_model.create_infer_request()
    sums, counts = [], []
    for item in validation_data:
        request.reset_state()
        logits = np.asarray(request.infer(item)[compiled_model.output(0)], dtype=np.float64)[0, :-1]
        targets = item["input_ids"][0, 1:]
        peak = logits.max(axis=-1, keepdims=True)
        log_z = (peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=-1)))
        logprobs = logits[np.arange(len(targets)), targets] - log_z
        sums.append(float(logprobs.sum()))
        counts.append(len(targets))
    per_window = [float(np.exp(s / c)) for s, c in zip(sums, counts)]
    return float(np.exp(sum(sums) / sum(counts))), per_window
