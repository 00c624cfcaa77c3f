"""Accuracy from logits: perplexity, KL divergence and top-1 agreement against the reference (numpy only).

Every window of ``W`` tokens is scored on its second half (llama-perplexity style): the logits at positions
``W//2 … W-2`` predict tokens ``W//2+1 … W-1``.

Windows are the unit of uncertainty: ``accuracy_retention`` and ``kld_mean`` come with an interval from a paired
percentile bootstrap over windows (the candidate and the reference resampled together, so what the text makes hard for
both cancels out). Positions inside a window are correlated; windows of distinct text are close to independent.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95
REFERENCE_FILES = ("logprobs.npy", "argmax.npy")
"""The reference's scored log-probabilities and top-1 ids, in its cache folder (:class:`ReferenceLogprobs`)."""


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

    def __init__(self, window: int, reference: tuple[np.ndarray, np.ndarray] | None = None,
                 confidence: float = DEFAULT_CONFIDENCE) -> None:
        self.window = window
        self.confidence = confidence
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
            result.update(self.intervals())
        return result

    def intervals(self) -> dict[str, float]:
        """``accuracy_retention_lo/_hi`` and ``kld_mean_lo/_hi`` at :attr:`confidence` (NaN with one window)."""
        log_ratio = np.array([r.mean() - c.mean() for r, c in zip(self.reference_nll, self.nll)])
        kld = np.array([k.mean() for k in self.kld])
        retention_lo, retention_hi = np.exp(bootstrap_interval(log_ratio, self.confidence))
        kld_lo, kld_hi = bootstrap_interval(kld, self.confidence)
        return {"accuracy_retention_lo": float(retention_lo), "accuracy_retention_hi": float(retention_hi),
                "kld_mean_lo": float(kld_lo), "kld_mean_hi": float(kld_hi)}


def bootstrap_interval(window_means: np.ndarray, confidence: float = DEFAULT_CONFIDENCE,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``window_means`` (equal-sized windows), seeded so the same
    scores give the same bounds; ``(nan, nan)`` for fewer than two windows."""
    if len(window_means) < 2:
        return math.nan, math.nan
    picks = np.random.default_rng(seed).integers(0, len(window_means), size=(resamples, len(window_means)))
    means = window_means[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)
