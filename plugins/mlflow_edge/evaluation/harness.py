"""The evaluation harness: the same metrics for every artifact of every backend.

An :class:`Evaluator` belongs to one study (one source model, one evaluation text, one machine). It tokenizes the
evaluation text once with the source tokenizer, so every runtime scores the very same token ids, and measures the
reference (the unquantized source in ``transformers``) once; its scored log-probabilities are cached on disk for the
KL divergence of every candidate. Each artifact is measured in a fresh child process
(:mod:`mlflow_edge.evaluation.worker`), so ``peak_rss_mb`` is that process's own peak and nothing leaks between
artifacts. Metric names are those of the project's conventions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mlflow_edge import cache, procs
from mlflow_edge.backends.base import Artifact
from mlflow_edge.errors import EdgeError
from mlflow_edge.evaluation.accuracy import DEFAULT_CONFIDENCE, REFERENCE_FILES
from mlflow_edge.evaluation.data import TextSlice, evaluation_text
from mlflow_edge.metrics import ACCURACY_SIZE_METRICS, BOUNDS
from mlflow_edge.plan import REFERENCE_DTYPES, reference_dtype, source_facts
from mlflow_edge.sources import SourceModel

REFERENCE = "reference"
BOUNDED = tuple(name for pair in BOUNDS.values() for name in pair)
"""The interval bounds the harness logs beside their point values."""


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What is measured and how: windows for accuracy, prompt sizes and repeats for speed."""

    text: TextSlice = dataclasses.field(default_factory=evaluation_text)
    window: int = 256
    windows: int = 16
    threads: int = dataclasses.field(default_factory=default_threads)
    repeats: int = 5
    prefill_tokens: int = 256
    prompt_tokens: int = 32
    decode_tokens: int = 32
    confidence: float = DEFAULT_CONFIDENCE
    """Level of the ``_lo``/``_hi`` intervals of ``accuracy_retention`` and ``kld_mean`` (paired bootstrap)."""
    speed: bool = True
    """``False``: the accuracy/size-only mode for a target whose hardware is absent (no timed runs)."""
    reference_dtype: str = "auto"
    """The reference's dtype: ``auto`` (fp32 when it fits this machine's memory, else the source's own 16-bit dtype),
    ``float32``, ``bfloat16`` or ``float16`` (:func:`mlflow_edge.plan.reference_dtype`)."""

    def __post_init__(self) -> None:
        for name in ("window", "windows", "threads", "repeats", "prefill_tokens", "prompt_tokens", "decode_tokens"):
            if getattr(self, name) < 1:
                raise EdgeError(f"evaluation setting {name} must be positive, got {getattr(self, name)}")
        if self.window < 8:
            raise EdgeError(f"evaluation window must be at least 8 tokens, got {self.window}")
        if self.decode_tokens < 2:
            raise EdgeError("evaluation needs at least 2 decode tokens to time decoding")
        if not 0.5 <= self.confidence < 1.0:
            raise EdgeError(f"confidence must be at least 0.5 and below 1, got {self.confidence}")
        if self.reference_dtype not in REFERENCE_DTYPES:
            raise EdgeError(f"unknown reference dtype '{self.reference_dtype}' "
                            f"(choose from {', '.join(REFERENCE_DTYPES)})")

    @property
    def context_tokens(self) -> int:
        return max(self.window, self.prefill_tokens, self.prompt_tokens + self.decode_tokens)

    def params(self) -> dict[str, str]:
        return {
            "eval.dataset": self.text.label,
            "eval.window": str(self.window),
            "eval.windows": str(self.windows),
            "eval.threads": str(self.threads),
            "eval.repeats": str(self.repeats),
            "eval.sha256": self.text.sha256,
            "eval.confidence": str(self.confidence),
            "eval.speed": str(self.speed).lower(),
        }


def settings_record(settings: EvalSettings) -> dict[str, Any]:
    """``settings`` as JSON-able fields for :func:`settings_from_record` (the evaluation text by file and hash)."""
    record = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name != "text"}
    builtin = settings.text == evaluation_text()
    record["text"] = {"path": None if builtin else str(settings.text.path), "sha256": settings.text.sha256}
    return record


def settings_from_record(record: Mapping[str, Any]) -> EvalSettings:
    """The :class:`EvalSettings` a :func:`settings_record` describes, on this machine; :class:`EdgeError` when the
    evaluation text here is not the very text recorded."""
    fields = {k: v for k, v in record.items() if k != "text"}
    text = evaluation_text(record["text"]["path"])
    if text.sha256 != record["text"]["sha256"]:
        raise EdgeError(f"the evaluation text {text.label} here differs from the study's (sha256 "
                        f"{record['text']['sha256'][:12]}…): workers must score the same text")
    return EvalSettings(text=text, **fields)


class Evaluator:
    """Measures the reference once, then any number of artifacts, against one source and one text."""

    def __init__(self, source: SourceModel, settings: EvalSettings | None = None, workdir: Path | None = None) -> None:
        self.source = source
        self.settings = settings or EvalSettings()
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="mlflow-edge-eval-")
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tokens_path = self.workdir / "tokens.npy"
        self.prompt_path = self.workdir / "prompt.npy"
        windows, prompt = self._tokenize()
        np.save(self.tokens_path, windows)
        np.save(self.prompt_path, prompt)
        facts = source_facts(source)
        self.reference_dtype = reference_dtype(self.settings.reference_dtype, facts, self.settings.window)
        """The reference dtype in force (``auto`` resolved on this machine)."""
        key = {"source": source.sha256, "eval": self.settings.text.sha256, "window": self.settings.window,
               "windows": self.settings.windows,
               **({"dtype": self.reference_dtype} if self.reference_dtype != "float32" else {})}
        self._reference_dir = cache.cache_root() / "reference" / cache.key_digest(key)
        self.reference_metrics: dict[str, float] | None = None
        self.reference_reused = False
        """Whether :meth:`evaluate_reference` took an earlier measurement on this machine instead of measuring."""
        self._base_decode: dict[str, float] = {}

    def _tokenize(self) -> tuple[np.ndarray, np.ndarray]:
        """Accuracy windows ``[windows, window]`` and the prompt stream for the speed runs."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.source.path)
        ids = tokenizer(self.settings.text.text(), add_special_tokens=False)["input_ids"]
        s = self.settings
        needed = s.window * s.windows
        if len(ids) < max(needed, s.prefill_tokens, s.prompt_tokens):
            raise EdgeError(f"evaluation text {s.text.label} has {len(ids)} tokens; {needed} are needed "
                            f"({s.windows} windows of {s.window})")
        windows = np.asarray(ids[:needed], dtype=np.int32).reshape(s.windows, s.window)
        return windows, np.asarray(ids[: max(s.prefill_tokens, s.prompt_tokens)], dtype=np.int32)

    @property
    def reference_dir(self) -> Path:
        """Where the reference's scored log-probabilities are cached (``logprobs.npy``, ``argmax.npy``)."""
        return self._reference_dir

    def evaluate_reference(self) -> dict[str, float]:
        """Measure the source model itself; its metrics are the baseline of every ratio. The measurement is made once
        per machine and settings: a later study of the same source, text and settings on this machine takes it from
        the cache (:attr:`reference_reused`), its scored log-probabilities with it."""
        folder = cache.subfolder("reference", self._reference_dir.name)
        recorded = folder / f"metrics-{self._measurement_key()}.json"
        measured = self._recorded_reference(recorded)
        self.reference_reused = measured is not None
        if measured is None:
            measured = self._run_child({
                "kind": REFERENCE,
                "source_path": str(self.source.path),
                "reference_dtype": self.reference_dtype,
                "save_reference": str(self._reference_dir),
            })
            partial = recorded.with_suffix(".partial")
            partial.write_text(json.dumps(measured, sort_keys=True))
            os.replace(partial, recorded)
        size_bytes = sum(f.stat().st_size for f in self.source.path.glob("*.safetensors"))
        metrics = {**measured, **_size_metrics(size_bytes, self.source.num_parameters)}
        metrics.update(kld_mean=0.0, kld_p99=0.0, top1_agreement=1.0, kld_mean_lo=0.0, kld_mean_hi=0.0,
                       accuracy_retention_lo=1.0, accuracy_retention_hi=1.0)
        metrics.update(relative_metrics(metrics, metrics))
        if "speedup" in metrics:
            metrics["speedup_vs_base"] = 1.0  # the reference is its own unquantized base
        self.reference_metrics = metrics
        return self._measured(metrics)

    def _measurement_key(self) -> str:
        """What the reference's timed and scored runs depend on besides its cache folder: this machine, the runtime's
        versions and every setting the worker reads."""
        from importlib.metadata import version

        from mlflow_edge.targets import hardware_fingerprint

        s = self.settings
        return cache.key_digest({
            "hardware": hardware_fingerprint(), "torch": version("torch"), "transformers": version("transformers"),
            "speed": s.speed, "threads": s.threads, "repeats": s.repeats, "prefill_tokens": s.prefill_tokens,
            "prompt_tokens": s.prompt_tokens, "decode_tokens": s.decode_tokens, "context_tokens": s.context_tokens,
            "confidence": s.confidence, "prompt": self.settings.text.sha256})

    def _recorded_reference(self, recorded: Path) -> dict[str, float] | None:
        """The reference's metrics measured earlier with these settings, where both they and the scored
        log-probabilities are on disk (a run stopped before either was written left nothing that is trusted)."""
        if not recorded.is_file() or not self.reference_complete():
            return None
        try:
            return {k: float(v) for k, v in json.loads(recorded.read_text()).items()}
        except (ValueError, TypeError, AttributeError):
            return None

    def reference_complete(self) -> bool:
        """Whether the reference's scored log-probabilities are on disk (:data:`~mlflow_edge.evaluation.accuracy.
        REFERENCE_FILES`)."""
        return all((self._reference_dir / name).is_file() for name in REFERENCE_FILES)

    def accuracy_key(self) -> str:
        """What makes two accuracy measurements of one artifact the same: the source, the text, the windows and the
        interval level. Equal keys and equal content hashes give equal accuracy on any machine (up to kernels)."""
        s = self.settings
        return cache.key_digest({"source": self.source.sha256, "text": s.text.sha256, "window": s.window,
                                 "windows": s.windows, "confidence": s.confidence})

    def evaluate(self, artifact: Artifact, base: Artifact | None = None,
                 known_accuracy: Mapping[str, float] | None = None) -> dict[str, float]:
        """Measure ``artifact``: size, speed, memory, accuracy, and the ratios against the reference (and
        ``speedup_vs_base`` against ``base``, the same backend's unquantized artifact, when speed is measured).

        ``known_accuracy``: the accuracy and size metrics measured earlier for this very artifact (same content hash,
        same :meth:`accuracy_key`), perhaps on another machine: they are taken as they are and only speed is measured.
        """
        if known_accuracy is not None and not self.settings.speed:
            return dict(known_accuracy)
        if self.reference_metrics is None:
            self.evaluate_reference()
        measured = self._run_child({
            "kind": "artifact",
            "artifact": artifact.to_json(),
            "reference": str(self._reference_dir),
            "accuracy": known_accuracy is None,
        })
        measured.pop("reference_perplexity", None)
        metrics = {**measured, **(known_accuracy or {}), **_size_metrics(artifact.size_bytes, artifact.num_parameters)}
        metrics.update(relative_metrics(metrics, self.reference_metrics))
        metrics.update(known_accuracy or {})  # the retention measured with the accuracy, not re-derived here
        if base is not None and "decode_tok_s" in metrics:
            metrics["speedup_vs_base"] = metrics["decode_tok_s"] / self.base_decode_tok_s(base)
        return self._measured(metrics)

    def base_decode_tok_s(self, base: Artifact) -> float:
        """``decode_tok_s`` of ``base`` (timed once per evaluator, no accuracy pass): the denominator of
        ``speedup_vs_base``."""
        key = str(base.path)
        if key not in self._base_decode:
            measured = self._run_child({"kind": "artifact", "artifact": base.to_json(), "accuracy": False})
            self._base_decode[key] = measured["decode_tok_s"]
        return self._base_decode[key]

    def _measured(self, metrics: dict[str, float]) -> dict[str, float]:
        """All metrics, or only accuracy and size when speed is off (load time and memory of this machine say
        nothing about the absent target hardware)."""
        return metrics if self.settings.speed else {k: v for k, v in metrics.items() if k in ACCURACY_SIZE_METRICS}

    def screen(self, artifact: Artifact, windows: int) -> dict[str, float]:
        """The cheap first look: accuracy on the first ``windows`` windows only, no timed runs.

        ``accuracy_retention`` compares with the reference's perplexity on the same windows, so a trial that already
        fails an accuracy gate can be pruned before the costly speed runs and logging.
        """
        if self.reference_metrics is None:
            self.evaluate_reference()
        windows = max(1, min(windows, self.settings.windows))
        measured = self._run_child({
            "kind": "artifact",
            "artifact": artifact.to_json(),
            "reference": str(self._reference_dir),
            "speed": False,
            "windows": windows,
        })
        metrics = {k: measured[k] for k in ("perplexity", "kld_mean", "kld_p99", "top1_agreement", *BOUNDED)}
        metrics["accuracy_retention"] = measured["reference_perplexity"] / measured["perplexity"]
        metrics.update(_size_metrics(artifact.size_bytes, artifact.num_parameters))
        metrics["compression_ratio"] = self.reference_metrics["size_mb"] / metrics["size_mb"]
        return metrics

    def _run_child(self, job: Mapping[str, Any]) -> dict[str, float]:
        s = self.settings
        spec = {
            "speed": s.speed,
            **job,
            "tokens": str(self.tokens_path),
            "prompt": str(self.prompt_path),
            "window": s.window,
            "threads": s.threads,
            "repeats": s.repeats,
            "prefill_tokens": s.prefill_tokens,
            "prompt_tokens": s.prompt_tokens,
            "decode_tokens": s.decode_tokens,
            "context_tokens": s.context_tokens,
            "confidence": s.confidence,
        }
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
            spec_path.write_text(json.dumps(spec))
            proc = procs.run(
                [sys.executable, "-m", "mlflow_edge.evaluation.worker", str(spec_path), str(result_path)],
                capture_output=True, text=True,
            )
            result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        if proc.returncode != 0 or "error" in result or "metrics" not in result:
            reason = result.get("error") or _last_line(proc.stderr) or f"exit code {proc.returncode}"
            raise EdgeError(f"evaluation failed: {reason}")
        return result["metrics"]

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _size_metrics(size_bytes: int, num_parameters: int) -> dict[str, float]:
    return {"size_mb": size_bytes / 1e6, "bits_per_weight": 8.0 * size_bytes / max(num_parameters, 1)}


def relative_metrics(metrics: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """The ratios against the reference measured in the same study (``speedup`` only where speed was measured)."""
    ratios = {
        "compression_ratio": reference["size_mb"] / metrics["size_mb"],
        "accuracy_retention": reference["perplexity"] / metrics["perplexity"],
        "memory_reduction": 1.0 - metrics["peak_rss_mb"] / reference["peak_rss_mb"],
    }
    if "decode_tok_s" in metrics and "decode_tok_s" in reference:
        ratios["speedup"] = metrics["decode_tok_s"] / reference["decode_tok_s"]
    return ratios


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
