"""The reference: the unquantized source model in ``transformers`` (PyTorch; fp32, or the source's own 16-bit dtype
when fp32 does not fit), behind the same Runner."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mlflow_edge.backends.base import Generation
from mlflow_edge.errors import EdgeError


class TransformersRunner:
    """An HF causal LM on PyTorch (CPU, ``dtype``: float32, bfloat16 or float16), greedy decoding with its KV
    cache; logits come back as float32 whatever the dtype."""

    def __init__(self, path: Path, threads: int, context_tokens: int, dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self._torch = torch
        torch.set_num_threads(threads)
        try:
            self._model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                               use_safetensors=True)
        except Exception as exc:
            raise EdgeError(f"transformers cannot load {path}: {str(exc).splitlines()[0]}") from exc
        self._model.eval()
        self._context_tokens = context_tokens

    def _ids(self, tokens: Sequence[int]):
        if len(tokens) > self._context_tokens:
            raise EdgeError(f"sequence of {len(tokens)} tokens exceeds the context of {self._context_tokens}")
        return self._torch.tensor([list(tokens)], dtype=self._torch.long)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        with self._torch.inference_mode():
            return self._model(self._ids(tokens), use_cache=False).logits[0].float().numpy()

    def prefill(self, tokens: Sequence[int]) -> float:
        ids = self._ids(tokens)
        with self._torch.inference_mode():
            start = time.perf_counter()
            self._model(ids, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - start

    def generate(self, tokens: Sequence[int], max_new_tokens: int) -> Generation:
        ids = self._ids(tokens)
        with self._torch.inference_mode():
            start = time.perf_counter()
            out = self._model(ids, use_cache=True, logits_to_keep=1)
            token = out.logits[0, -1].argmax().reshape(1, 1)
            ttft = time.perf_counter() - start
            past = out.past_key_values
            for _ in range(max_new_tokens - 1):
                out = self._model(token, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = out.logits[0, -1].argmax().reshape(1, 1)
            total = time.perf_counter() - start
        return Generation(len(tokens), max_new_tokens, ttft, total)

    def close(self) -> None:
        self._model = None
