"""Evaluation and calibration text: named, hashed, disjoint slices of a corpus.

The package ships the head of the WikiText-2 test split (CC BY-SA 3.0, see ``data/README.md``). By default the
evaluation scores its first 40,000 characters and calibration (importance matrices and other data-aware methods)
reads the rest, so no artifact is scored on the text it was tuned on; :func:`check_disjoint` refuses a pair that
overlaps.
"""

from __future__ import annotations

import dataclasses
import hashlib
from importlib import resources
from pathlib import Path

from mlflow_edge.errors import EdgeError

BUILTIN_DATASET = "wikitext-2"
_BUILTIN_FILE = "wikitext2_test_head.txt"
_EVAL_CHARS = 40_000


@dataclasses.dataclass(frozen=True)
class TextSlice:
    """Characters ``[start, end)`` of a text file (``end=None``: to the end)."""

    dataset: str
    path: Path
    start: int = 0
    end: int | None = None

    def text(self) -> str:
        try:
            content = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise EdgeError(f"cannot read text {self.path}: {exc.strerror}") from exc
        piece = content[self.start : self.end]
        if not piece.strip():
            raise EdgeError(f"text slice [{self.start}:{self.end}] of {self.path} is empty")
        return piece

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text().encode("utf-8")).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.dataset}[{self.start}:{'' if self.end is None else self.end}]"


def builtin_path() -> Path:
    return Path(str(resources.files("mlflow_edge") / "data" / _BUILTIN_FILE))


def evaluation_text(path: str | Path | None = None) -> TextSlice:
    """The evaluation slice: the built-in corpus head, or the whole of a user's file."""
    if path is None:
        return TextSlice(BUILTIN_DATASET, builtin_path(), 0, _EVAL_CHARS)
    file = Path(path)
    if not file.is_file():
        raise EdgeError(f"evaluation text not found: {path}")
    return TextSlice(file.stem, file.resolve())


def calibration_text(path: str | Path | None = None) -> TextSlice:
    """The calibration slice: the built-in corpus after the evaluation part, or the whole of a user's file."""
    if path is None:
        return TextSlice(BUILTIN_DATASET, builtin_path(), _EVAL_CHARS, None)
    file = Path(path)
    if not file.is_file():
        raise EdgeError(f"calibration text not found: {path}")
    return TextSlice(file.stem, file.resolve())


def check_disjoint(evaluation: TextSlice, calibration: TextSlice) -> None:
    """Refuse a calibration slice that overlaps the evaluation slice."""
    if evaluation.path.resolve() == calibration.path.resolve():
        size = len(evaluation.path.read_text(encoding="utf-8"))
        a0, a1 = evaluation.start, evaluation.end if evaluation.end is not None else size
        b0, b1 = calibration.start, calibration.end if calibration.end is not None else size
        if a0 < b1 and b0 < a1:
            raise EdgeError(f"calibration text {calibration.label} overlaps evaluation text {evaluation.label}")
    elif evaluation.sha256 == calibration.sha256:
        raise EdgeError("calibration text is the same as the evaluation text")
