"""The memory and disk plan: every stage's peak memory and disk, estimated before any work and checked against this
machine, so that a model too large for it is refused in one line instead of running out of memory an hour in.

From the source's safetensors headers and config (:class:`SourceFacts`: parameters, their dtype, the largest tensor,
the vocabulary) each stage's need is estimated (:class:`~mlflow_edge.backends.base.StageNeed`): the reference (the
source in ``transformers`` at the reference dtype), the evaluation child (an artifact the size of the backend's base
loaded in its runtime), and what each backend declares for its base conversion and a quantization
(``Backend.resource_needs``). The machine's figure is the memory available now (or ``$MLFLOW_EDGE_MEMORY_GB``, to
plan for less than the whole machine) and the free disk under the cache root. A stage that does not fit is refused
with its estimate, the machine's figure and the way out (a lighter reference, fewer backends); the estimates are
logged as ``plan.*`` params on the run. Knows no framework: the backends' declarations are all it reads of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from mlflow_edge import cache
from mlflow_edge.backends import optional_method
from mlflow_edge.backends.base import StageNeed
from mlflow_edge.errors import EdgeError
from mlflow_edge.sources import SAFETENSORS_BITS, SourceModel, safetensors_tensors

GIB = 1 << 30
MEMORY_ENV = "MLFLOW_EDGE_MEMORY_GB"
"""Plan for at most this many GB of memory (default: what the machine has available now)."""
RUNTIME_BYTES = int(0.8 * GIB)
"""A Python process with torch and transformers (or a framework runtime) imported, before any model."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per parameter of the reference dtypes."""
REFERENCE_DTYPES = ("auto", *DTYPE_BYTES)
_SAFETENSORS_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclasses.dataclass(frozen=True)
class SourceFacts:
    """What the plan reads of a source: its parameters and their bytes on disk, the dtype holding most of them,
    its largest tensor (parameters) and its vocabulary."""

    parameters: int
    disk_bytes: int
    dtype: str
    largest_tensor: int
    vocab: int

    def bytes_at(self, dtype: str) -> int:
        """The parameters' bytes in ``dtype`` (``float32``, ``bfloat16``, ``float16``)."""
        return self.parameters * DTYPE_BYTES[dtype]


def source_facts(source: SourceModel) -> SourceFacts:
    """:class:`SourceFacts` of ``source`` from its safetensors headers and ``config.json`` (no weight is read)."""
    by_dtype: dict[str, int] = {}
    largest = disk = 0
    for path in sorted(Path(source.path).glob("*.safetensors")):
        for dtype, shape in safetensors_tensors(path).values():
            count = math.prod(shape)
            by_dtype[dtype] = by_dtype.get(dtype, 0) + count
            largest = max(largest, count)
            disk += count * SAFETENSORS_BITS[dtype] // 8
    dominant = max(by_dtype, key=by_dtype.get) if by_dtype else "F32"
    config = _config(Path(source.path))
    vocab = int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 32000)
    return SourceFacts(parameters=sum(by_dtype.values()), disk_bytes=disk,
                       dtype=_SAFETENSORS_DTYPE.get(dominant, "float32"), largest_tensor=largest, vocab=vocab)


def _config(folder: Path) -> Mapping[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


# -- the harness's own stages --------------------------------------------------------------------------------------
def reference_need(facts: SourceFacts, dtype: str, window: int) -> StageNeed:
    """The reference in ``transformers`` at ``dtype``: the weights, the runtime, a window's logits thrice (fp32
    logits, their log-softmax, the copy handed back)."""
    logits = 3 * window * facts.vocab * 4
    return StageNeed(f"the reference ({dtype})", facts.bytes_at(dtype) + RUNTIME_BYTES + logits,
                     way_out="--reference-dtype bfloat16 loads the source in 2 bytes a weight" if dtype == "float32"
                     else "no lighter reference: use a smaller model or a machine with more memory")


def evaluation_need(backend: str, artifact_bytes: int, facts: SourceFacts, window: int) -> StageNeed:
    """An artifact of ``artifact_bytes`` measured in the evaluation child: its weights, the runtime, the logits."""
    logits = 2 * window * facts.vocab * 4
    return StageNeed(f"the evaluation of {backend}'s base", artifact_bytes + RUNTIME_BYTES + logits,
                     way_out=f"leave {backend} out (--backends)")


def reference_dtype(requested: str, facts: SourceFacts, window: int, memory: int | None = None) -> str:
    """The reference dtype in force: ``requested``, or for ``auto`` fp32 when it fits the machine's memory, else the
    source's own 16-bit dtype (``bfloat16`` for an fp32 source)."""
    if requested not in REFERENCE_DTYPES:
        raise EdgeError(f"unknown reference dtype '{requested}' (choose from {', '.join(REFERENCE_DTYPES)})")
    if requested != "auto":
        return requested
    if reference_need(facts, "float32", window).rss_bytes <= (memory if memory is not None else memory_budget()):
        return "float32"
    return facts.dtype if facts.dtype != "float32" else "bfloat16"


# -- the machine -------------------------------------------------------------------------------------------------
def memory_budget() -> int:
    """Bytes of memory a run may plan for: ``$MLFLOW_EDGE_MEMORY_GB``, else what the machine has available now."""
    text = os.environ.get(MEMORY_ENV, "").strip()
    if text:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise EdgeError(f"{MEMORY_ENV} must be a positive number of GB, got {text!r}")
        return int(value * 1e9)
    import psutil

    return int(psutil.virtual_memory().available)


def disk_free(folder: Path | None = None) -> int:
    """Free bytes on the file system of ``folder`` (default: the cache root)."""
    folder = folder or cache.cache_root()
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(folder).free


# -- the plan ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """The stages' needs beside the machine's memory and free disk."""

    needs: tuple[StageNeed, ...]
    memory_bytes: int
    disk_free_bytes: int

    def misfits(self) -> list[str]:
        """One line per stage that does not fit: its estimate, the machine's figure, the way out."""
        lines = [f"{n.stage} needs about {_gb(n.rss_bytes)} GB of memory; {_gb(self.memory_bytes)} GB are available "
                 f"({n.way_out})" for n in self.needs if n.rss_bytes > self.memory_bytes]
        written = sum(n.disk_bytes for n in self.needs)
        if written > self.disk_free_bytes:
            lines.append(f"the conversions and quantizations need about {_gb(written)} GB of disk; "
                         f"{_gb(self.disk_free_bytes)} GB are free under {cache.cache_root()} (set MLFLOW_EDGE_CACHE "
                         "to a larger disk, or leave backends out with --backends)")
        return lines

    def check(self) -> None:
        """:class:`EdgeError` naming the first stage that does not fit."""
        if misfits := self.misfits():
            raise EdgeError(misfits[0])

    def params(self) -> dict[str, str]:
        """``plan.<stage>.rss_gb`` / ``.disk_gb`` per stage, and the machine's figures, as MLflow params."""
        values = {"plan.memory_gb": _gb(self.memory_bytes), "plan.disk_free_gb": _gb(self.disk_free_bytes)}
        for need in self.needs:
            slug = re.sub(r"[^a-z0-9]+", "_", need.stage.lower()).strip("_")
            values[f"plan.{slug}.rss_gb"] = _gb(need.rss_bytes)
            if need.disk_bytes:
                values[f"plan.{slug}.disk_gb"] = _gb(need.disk_bytes)
        return values


def backend_needs(backend: str, facts: SourceFacts) -> list[StageNeed]:
    """What ``backend`` declares for its conversion and a quantization (nothing for a backend that does not)."""
    declare = optional_method(backend, "resource_needs")
    return list(declare(facts)) if declare is not None else []


def search_plan(source: SourceModel, backends: Sequence[str], window: int,
                requested_dtype: str = "auto") -> tuple[Plan, str, dict[str, str]]:
    """The plan of measuring ``source`` with ``backends``: the plan, the reference dtype in force, and the backends
    whose own stages do not fit (with the first reason): those are left out, the rest planned together."""
    facts = source_facts(source)
    memory, free = memory_budget(), disk_free()
    dtype = reference_dtype(requested_dtype, facts, window, memory)
    needs: list[StageNeed] = [reference_need(facts, dtype, window)]
    left_out: dict[str, str] = {}
    for backend in backends:
        own = backend_needs(backend, facts)
        if own:
            own.append(evaluation_need(backend, max(n.disk_bytes for n in own), facts, window))
        misfits = Plan(tuple(own), memory, free).misfits()
        if misfits:
            left_out[backend] = misfits[0]
        else:
            needs += own
    return Plan(tuple(needs), memory, free), dtype, left_out


@dataclasses.dataclass(frozen=True)
class Planned:
    """What can run after the plan: the backends, the reference dtype in force, the params to log and the lines to
    tell the user (backends left out, a lighter reference)."""

    backends: tuple[str, ...]
    reference_dtype: str
    params: Mapping[str, str]
    notes: tuple[str, ...]


def planned(source: SourceModel, backends: Sequence[str], window: int, requested_dtype: str,
            chosen: bool) -> Planned:
    """Plan before any work and refuse what cannot fit: backends whose own stages do not fit are left out (refused
    when the user ``chosen`` them, or when none is left), then the reference and the disk of the rest must fit."""
    plan, dtype, left_out = search_plan(source, backends, window, requested_dtype)
    if left_out and (chosen or len(left_out) == len(backends)):
        raise EdgeError(next(iter(left_out.values())))
    plan.check()
    notes = [f"leaving out {backend}: {reason}" for backend, reason in left_out.items()]
    if dtype != "float32" and requested_dtype == "auto":
        fp32 = reference_need(source_facts(source), "float32", window).rss_bytes
        notes.append(f"the reference runs in {dtype}: fp32 would need {_gb(fp32)} GB, "
                     f"{_gb(plan.memory_bytes)} GB are available")
    return Planned(tuple(b for b in backends if b not in left_out), dtype,
                   {**plan.params(), "reference.dtype": dtype}, tuple(notes))


def _gb(value: int) -> str:
    return f"{value / 1e9:.2f}"
