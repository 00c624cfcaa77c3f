"""The GenAI runtime: a model folder loaded by ``onnxruntime_genai`` on an execution provider, and the
:class:`ONNXRuntimeGenAIRunner` the harness drives (logits of every position from the model's ``logits`` output,
greedy decoding that reuses the KV cache)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mlflow_edge.backends.base import SequenceRunner
from mlflow_edge.backends.onnxruntime.folder import GENAI_CONFIG, MODEL_FILE, genai_config, model_folder, read_graph
from mlflow_edge.backends.onnxruntime.framework import check_execution_provider, require_genai
from mlflow_edge.errors import EdgeError, first_line


def genai_model(folder: Path, threads: int, execution_provider: str = "cpu") -> Any:
    """The GenAI model folder loaded by ``onnxruntime_genai`` on ``execution_provider`` (checked), its session on
    ``threads`` intra-op threads (0: ONNX Runtime's default)."""
    og = require_genai()
    provider = check_execution_provider(execution_provider)
    try:
        config = og.Config(str(folder))
        if threads > 0:
            session = {"intra_op_num_threads": int(threads)}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        config.clear_providers()
        if provider != "cpu":
            config.append_provider(provider)
        return og.Model(config)
    except Exception as exc:  # onnxruntime_genai raises RuntimeError with ONNX Runtime's message
        raise EdgeError(f"ONNX Runtime GenAI cannot load {folder}: {first_line(exc)}") from exc


class ONNXRuntimeGenAIRunner(SequenceRunner):
    """A GenAI model folder on ``onnxruntime_genai``: one sequence, logits per position, greedy generation.

    ``reset()`` starts a fresh sequence and ``forward(tokens)`` appends ``tokens`` to it, returning their logits (the
    model's ``logits`` output, every position); the Runner protocol methods are built on those two.
    """

    def __init__(self, path: Path, threads: int, context_tokens: int, execution_provider: str = "cpu") -> None:
        folder = model_folder(Path(path))
        if folder is None:
            raise EdgeError(f"no ONNX Runtime GenAI model folder ({GENAI_CONFIG} and {MODEL_FILE}) at {path}")
        read_graph(folder)  # a corrupt or truncated model is refused before the runtime maps it
        self.execution_provider = check_execution_provider(execution_provider)
        limit = int(genai_config(folder)["model"].get("context_length") or context_tokens)
        if not 0 < context_tokens <= limit:
            raise EdgeError(f"context of {context_tokens} tokens is outside the model's context length of {limit}")
        self.session_options = {"intra_op_num_threads": int(threads)} if threads > 0 else {}
        self._model = genai_model(folder, threads, self.execution_provider)
        try:
            params = require_genai().GeneratorParams(self._model)
            params.set_search_options(max_length=int(context_tokens))
            self._generator = require_genai().Generator(self._model, params)
        except Exception as exc:  # onnxruntime_genai raises RuntimeError with ONNX Runtime's message
            raise EdgeError(f"ONNX Runtime GenAI cannot run {folder}: {first_line(exc)}") from exc
        self._n_ctx = int(context_tokens)
        self._position = 0

    @property
    def genai_model(self) -> Any:
        """The ``onnxruntime_genai.Model`` this runner drives."""
        self._live()
        return self._model

    def _live(self) -> Any:
        if self._generator is None:
            raise EdgeError("this ONNX Runtime GenAI runner is closed")
        return self._generator

    def reset(self) -> None:
        """Start a fresh sequence."""
        generator = self._live()
        if self._position:
            generator.rewind_to(0)
        self._position = 0

    def _append(self, tokens: Sequence[int]) -> Any:
        generator = self._live()
        end = self._position + len(tokens)
        if not tokens:
            raise EdgeError("no tokens to process")
        if end > self._n_ctx:
            raise EdgeError(f"sequence of {end} tokens exceeds the context of {self._n_ctx}")
        try:
            generator.append_tokens(np.asarray(tokens, dtype=np.int32))
        except Exception as exc:
            raise EdgeError(f"ONNX Runtime GenAI failed: {first_line(exc)}") from exc
        self._position = end
        return generator

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Append ``tokens`` to the sequence; their logits ``[len(tokens), vocab]`` (one decoding step reads the last
        position's logits, a quarter of the cost of the model output per token)."""
        generator = self._append(tokens)
        return generator.get_logits()[0] if len(tokens) == 1 else generator.get_output("logits")[0]

    def append(self, tokens: Sequence[int]) -> None:
        self._append(tokens)

    def next_token(self, tokens: Sequence[int]) -> int:
        return int(np.argmax(self._append(tokens).get_logits()[0, -1]))

    def close(self) -> None:
        self._generator = None
        self._model = None
