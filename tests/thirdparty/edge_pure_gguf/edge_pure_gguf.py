"""A backend outside mlflow-edge: llama.cpp quantization with ``pure`` forced on (no k-quant mixtures).

It exists to show that a distribution registering one entry point in ``mlflow_edge.backends`` is converted,
quantized, evaluated (in the harness's child process) and searched without any edit to mlflow-edge.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

from mlflow_edge.backends.llamacpp import LlamaCppBackend

PRECISIONS = ("Q4_0", "Q5_0", "Q8_0")


class PureGGUFBackend(LlamaCppBackend):
    name: ClassVar[str] = "pure_gguf"
    format: ClassVar[str] = "pure_gguf"  # GGUF files, under a format name of its own: one backend per format
    targets: ClassVar[Mapping[str, str]] = {"cpu": "secondary"}
    sweep_types: ClassVar[tuple[str, ...]] = PRECISIONS

    def quantize(self, base, out_dir, precision, options=None, calibration=None, source=None):
        options = {**dict(options or {}), "pure": True}
        artifact = super().quantize(base, out_dir, precision, options, calibration=calibration, source=source)
        return dataclasses.replace(artifact, backend=self.name)

    def convert(self, source, out_dir, precision):
        artifact = super().convert(source, out_dir, precision)
        return dataclasses.replace(artifact, backend=self.name)

    def starting_points(self) -> Sequence[Mapping[str, Any]]:
        return ({"pure_gguf.precision": "Q8_0"},)

    def search_space(self, trial: Any) -> tuple[str, dict[str, Any]]:
        return trial.suggest_categorical("pure_gguf.precision", list(PRECISIONS)), {}
