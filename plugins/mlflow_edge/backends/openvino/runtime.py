"""The Runner of an OpenVINO artifact: a stateful causal-LM IR compiled for one device, one sequence at a time
(logits per position of a fresh sequence, timed greedy generation that reuses the KV state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mlflow_edge.backends.base import SequenceRunner
from mlflow_edge.backends.openvino.device import PERFORMANCE_HINTS, check_device
from mlflow_edge.backends.openvino.framework import first_reason, require_openvino
from mlflow_edge.backends.openvino.ir import EXPORT_TASK, model_xml, read_model
from mlflow_edge.errors import EdgeError


class OpenVINORunner(SequenceRunner):
    """A stateful causal-LM IR on the OpenVINO runtime: one sequence, logits per position, greedy generation.

    ``reset()`` starts a fresh sequence (clears the KV state) and ``forward(tokens)`` appends ``tokens`` to it,
    returning their logits; the Runner protocol methods are built on those two.
    """

    def __init__(self, path: Path, threads: int, context_tokens: int, device: str = "CPU",
                 performance_hint: str = "LATENCY", inference_precision: str | None = None) -> None:
        ov = require_openvino()
        core = ov.Core()
        self.device = check_device(core, device)
        hint = str(performance_hint).upper()
        if hint not in PERFORMANCE_HINTS:
            raise EdgeError(f"unknown performance_hint '{performance_hint}' "
                            f"(choose from {', '.join(PERFORMANCE_HINTS)})")
        model = read_model(Path(path))
        names = {name for port in model.inputs for name in port.get_names()}
        if "input_ids" not in names or not model.get_sinks():
            raise EdgeError(f"{model_xml(Path(path))} is not a stateful causal-LM IR "
                            f"(optimum-intel {EXPORT_TASK})")
        self._has_mask, self._has_positions, self._has_beam = (
            "attention_mask" in names, "position_ids" in names, "beam_idx" in names)
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint}
        if self.device.startswith("CPU") and threads > 0:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if inference_precision:
            config["INFERENCE_PRECISION_HINT"] = str(inference_precision).lower()
        try:
            compiled = core.compile_model(model, self.device, config)
        except Exception as exc:
            raise EdgeError(f"OpenVINO cannot compile {model_xml(Path(path))} for {self.device}: "
                            f"{first_reason(exc)}") from exc
        self.config = config
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._output = compiled.output(0)
        self._n_ctx = int(context_tokens)
        self._position = 0
        self._mask = np.ones((1, self._n_ctx), dtype=np.int64)
        self._positions = np.arange(self._n_ctx, dtype=np.int64)[None, :]
        self._beam = np.zeros(1, dtype=np.int32)

    def reset(self) -> None:
        """Start a fresh sequence."""
        if self._request is None:
            raise EdgeError("this OpenVINO runner is closed")
        self._request.reset_state()
        self._position = 0

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Append ``tokens`` to the sequence; their logits ``[len(tokens), vocab]``, valid until the next call."""
        if self._request is None:
            raise EdgeError("this OpenVINO runner is closed")
        start, end = self._position, self._position + len(tokens)
        if end > self._n_ctx:
            raise EdgeError(f"sequence of {end} tokens exceeds the context of {self._n_ctx}")
        inputs: dict[str, np.ndarray] = {"input_ids": np.asarray(tokens, dtype=np.int64).reshape(1, -1)}
        if self._has_mask:
            inputs["attention_mask"] = self._mask[:, :end]
        if self._has_positions:
            inputs["position_ids"] = self._positions[:, start:end]
        if self._has_beam:
            inputs["beam_idx"] = self._beam
        self._request.infer(inputs, share_inputs=True)
        self._position = end
        return self._request.get_tensor(self._output).data[0]

    def close(self) -> None:
        self._request = None
        self._compiled = None
