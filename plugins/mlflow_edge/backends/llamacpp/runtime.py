"""A GGUF model on llama.cpp's C API (through llama-cpp-python's bindings), as the evaluation harness drives it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mlflow_edge.backends.base import Generation
from mlflow_edge.backends.llamacpp.ggml import require_llama_cpp
from mlflow_edge.errors import EdgeError


class LlamaCppRunner:
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

    def _reset(self) -> None:
        if self._llm is None:  # the context is freed: using it would crash the process
            raise EdgeError("this llama.cpp runner is closed")
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)

    def _decode(self, tokens: Sequence[int], start: int, all_logits: bool) -> None:
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

    def _last_argmax(self) -> int:
        row = self._lib.llama_get_logits_ith(self._ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(self._n_vocab,))))

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        self._reset()
        self._decode(tokens, 0, all_logits=True)
        data = self._lib.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(data, shape=(len(tokens), self._n_vocab)).copy()

    def prefill(self, tokens: Sequence[int]) -> float:
        self._reset()
        start = time.perf_counter()
        self._decode(tokens, 0, all_logits=False)
        return time.perf_counter() - start

    def generate(self, tokens: Sequence[int], max_new_tokens: int) -> Generation:
        self._reset()
        start = time.perf_counter()
        self._decode(tokens, 0, all_logits=False)
        token = self._last_argmax()
        ttft = time.perf_counter() - start
        position = len(tokens)
        for _ in range(max_new_tokens - 1):
            self._decode([token], position, all_logits=False)
            position += 1
            token = self._last_argmax()
        total = time.perf_counter() - start
        return Generation(len(tokens), max_new_tokens, ttft, total)

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_llm", None) is not None:
            self._llm.close()
            self._llm = None
