"""A GGUF model on llama.cpp's C API (through llama-cpp-python's bindings), as the evaluation harness drives it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from mlflow_edge.backends.base import SequenceRunner
from mlflow_edge.backends.llamacpp.ggml import require_llama_cpp
from mlflow_edge.errors import EdgeError


class LlamaCppRunner(SequenceRunner):
    """A GGUF model on llama.cpp's C API: one sequence, logits per position, greedy generation."""

    def __init__(self, path: Path, threads: int, context_tokens: int) -> None:
        llama_cpp = require_llama_cpp()
        self._lib = llama_cpp
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=context_tokens,
                n_batch=context_tokens,
                n_ubatch=context_tokens,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=False,
                verbose=False,
            )
        except Exception as exc:  # llama-cpp-python raises ValueError with a generic text
            raise EdgeError(f"llama.cpp cannot load {path}: {exc}") from exc
        self._ctx = self._llm.ctx
        self._n_vocab = self._llm.n_vocab()
        self._n_ctx = context_tokens
        self._batch = llama_cpp.llama_batch_init(context_tokens, 0, 1)
        self._position = 0

    def reset(self) -> None:
        """Start a fresh sequence."""
        if self._llm is None:  # the context is freed: using it would crash the process
            raise EdgeError("this llama.cpp runner is closed")
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)
        self._position = 0

    def _decode(self, tokens: Sequence[int], all_logits: bool) -> None:
        start = self._position
        if start + len(tokens) > self._n_ctx:
            raise EdgeError(f"sequence of {start + len(tokens)} tokens exceeds the context of {self._n_ctx}")
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = int(token)
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_logits or i == len(tokens) - 1
        rc = self._lib.llama_decode(self._ctx, batch)
        if rc != 0:
            raise EdgeError(f"llama_decode failed with code {rc}")
        self._position = start + len(tokens)

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Append ``tokens`` to the sequence; their logits ``[len(tokens), vocab]``, valid until the next call."""
        self._decode(tokens, all_logits=True)
        return np.ctypeslib.as_array(self._lib.llama_get_logits(self._ctx), shape=(len(tokens), self._n_vocab))

    def append(self, tokens: Sequence[int]) -> None:
        self._decode(tokens, all_logits=False)

    def next_token(self, tokens: Sequence[int]) -> int:
        self._decode(tokens, all_logits=False)
        row = self._lib.llama_get_logits_ith(self._ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(self._n_vocab,))))

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_llm", None) is not None:
            self._llm.close()
            self._llm = None
