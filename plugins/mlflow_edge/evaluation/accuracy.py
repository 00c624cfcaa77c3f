"""Accuracy from logits: perplexity, KL divergence and top-1 agreement against the reference (numpy only).

Every window of ``W`` tokens is scored on its second half (llama-perplexity style): the logits at positions
``W//2 … W-2`` predict tokens ``W//2+1 … W-1``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np


def scored_positions(window: int) -> slice:
    return slice(window // 2, window - 1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float32, copy=False)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclasses.dataclass
class ReferenceLogprobs:
    """The reference's scored log-probabilities, one float16 array ``[windows, positions, vocab]`` on disk."""

    path: Path
    argmax_path: Path

    def open(self) -> tuple[np.ndarray, np.ndarray]:
        return np.load(self.path, mmap_mode="r"), np.load(self.argmax_path)


class AccuracyAccumulator:
    """Feeds windows one at a time; keeps negative log-likelihoods, KLDs and top-1 matches."""

    def __init__(self, window: int, reference: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.window = window
        self.reference = reference
        self.nll: list[np.ndarray] = []
        self.kld: list[np.ndarray] = []
        self.top1: list[np.ndarray] = []
        self.reference_nll: list[np.ndarray] = []
        self.kept_logprobs: list[np.ndarray] = []
        self.kept_argmax: list[np.ndarray] = []

    def add(self, index: int, tokens: np.ndarray, logits: np.ndarray, keep: bool = False) -> None:
        span = scored_positions(self.window)
        logprobs = log_softmax(logits[span])
        targets = np.asarray(tokens)[span.start + 1 : span.stop + 1]
        self.nll.append(-logprobs[np.arange(len(targets)), targets])
        argmax = logprobs.argmax(axis=-1)
        if keep:
            self.kept_logprobs.append(logprobs.astype(np.float16))
            self.kept_argmax.append(argmax.astype(np.int32))
        if self.reference is not None:
            ref_logprobs = np.asarray(self.reference[0][index], dtype=np.float32)
            vocab = min(ref_logprobs.shape[-1], logprobs.shape[-1])
            ref_p = np.exp(ref_logprobs[:, :vocab])
            self.kld.append(np.maximum((ref_p * (ref_logprobs[:, :vocab] - logprobs[:, :vocab])).sum(axis=-1), 0.0))
            self.top1.append(argmax == self.reference[1][index])
            self.reference_nll.append(-ref_logprobs[np.arange(len(targets)), targets])

    def save_reference(self, path: Path, argmax_path: Path) -> ReferenceLogprobs:
        np.save(path, np.stack(self.kept_logprobs))
        np.save(argmax_path, np.stack(self.kept_argmax))
        return ReferenceLogprobs(path, argmax_path)

    def metrics(self) -> dict[str, float]:
        nll = np.concatenate(self.nll)
        result = {"perplexity": float(np.exp(nll.mean()))}
        if self.kld:
            kld = np.concatenate(self.kld)
            result["kld_mean"] = float(kld.mean())
            result["kld_p99"] = float(np.percentile(kld, 99))
            result["top1_agreement"] = float(np.concatenate(self.top1).mean())
            result["reference_perplexity"] = float(np.exp(np.concatenate(self.reference_nll).mean()))
        return result
