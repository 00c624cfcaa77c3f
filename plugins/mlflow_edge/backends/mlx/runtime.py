"""An MLX folder loaded by mlx-lm (with its adapter) as the :class:`~mlflow_edge.backends.base.Runner` the
evaluation harness drives: per-position logits, prefill, mlx-lm's own greedy generation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mlflow_edge.backends.base import Generation
from mlflow_edge.backends.mlx.adapters import check_adapter
from mlflow_edge.backends.mlx.folder import ADAPTER_DIR, check_folder, legacy_rope_keys
from mlflow_edge.backends.mlx.framework import mlx_call, require_mlx_lm
from mlflow_edge.errors import EdgeError


def load_mlx_model(path: Path, adapter_dir: Path | None = None) -> Any:
    """The mlx-lm model of the MLX folder ``path`` (checked first), with its ``adapters/`` or ``adapter_dir``."""
    require_mlx_lm()
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    folder = Path(path)
    config = check_folder(folder)
    model, _ = mlx_call(f"load {folder}", lambda: load_model(folder, model_config=legacy_rope_keys(config)))
    adapter = adapter_dir or (folder / ADAPTER_DIR if (folder / ADAPTER_DIR).is_dir() else None)
    if adapter is not None:
        check_adapter(Path(adapter), folder)
        model = mlx_call(f"apply adapter {Path(adapter).name}", lambda: load_adapters(model, str(adapter)))
        model.eval()
    return model


class MLXRunner:
    """An mlx-lm model: one sequence with mlx-lm's KV cache, logits per position, greedy generation.

    ``reset()`` starts a fresh sequence (a new ``make_prompt_cache``) and ``forward(tokens)`` appends ``tokens``,
    returning their logits; ``generate`` is mlx-lm's own ``generate_step`` loop. ``threads`` is not applied: MLX has
    no thread setting (its CPU backend runs a stream on one thread).
    """

    def __init__(self, path: Path, threads: int, context_tokens: int, adapter_dir: Path | None = None) -> None:
        self._model = load_mlx_model(Path(path), adapter_dir)
        self.threads = int(threads)
        self._n_ctx = int(context_tokens)
        self._cache: list[Any] | None = None
        self._position = 0

    @property
    def context_tokens(self) -> int:
        return self._n_ctx

    def _live_model(self, length: int) -> Any:
        if self._model is None:
            raise EdgeError("this MLX runner is closed")
        if length > self._n_ctx:
            raise EdgeError(f"sequence of {length} tokens exceeds the context of {self._n_ctx}")
        return self._model

    def reset(self) -> None:
        """Start a fresh sequence."""
        from mlx_lm.models.cache import make_prompt_cache

        self._cache = make_prompt_cache(self._live_model(0))
        self._position = 0

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Append ``tokens`` to the sequence; their logits, float32 ``[len(tokens), vocab]``."""
        import mlx.core as mx

        model = self._live_model(self._position + len(tokens))
        if self._cache is None:
            self.reset()
        logits = model(mx.array(np.asarray(tokens, dtype=np.int32))[None], cache=self._cache)
        self._position += len(tokens)
        return np.array(logits[0].astype(mx.float32))

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        import mlx.core as mx

        model = self._live_model(len(tokens))
        return np.array(model(mx.array(np.asarray(tokens, dtype=np.int32))[None])[0].astype(mx.float32))

    def prefill(self, tokens: Sequence[int]) -> float:
        import mlx.core as mx

        self.reset()
        model = self._live_model(len(tokens))
        start = time.perf_counter()
        logits = model(mx.array(np.asarray(tokens, dtype=np.int32))[None], cache=self._cache)
        mx.eval(logits[:, -1], [c.state for c in self._cache])
        self._position = len(tokens)
        return time.perf_counter() - start

    def generate(self, tokens: Sequence[int], max_new_tokens: int) -> Generation:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        self._live_model(len(tokens) + max_new_tokens - 1)
        self.reset()
        steps = generate_step(mx.array(np.asarray(tokens, dtype=np.int32)), self._model, max_tokens=max_new_tokens,
                              prompt_cache=self._cache)
        start = time.perf_counter()
        ttft = 0.0
        for count, _ in enumerate(steps, start=1):  # greedy: mlx-lm's default sampler is the argmax
            if count == 1:
                ttft = time.perf_counter() - start
            if count == max_new_tokens:
                break
        total = time.perf_counter() - start
        steps.close()
        self._cache = None  # generate_step ran one step ahead: this sequence is done
        return Generation(len(tokens), max_new_tokens, ttft, total)

    def close(self) -> None:
        if self._model is not None:
            import mlx.core as mx

            self._model = None
            self._cache = None
            mx.clear_cache()
