"""Evaluation and calibration text: disjoint, hashed slices; overlapping pairs are refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mlflow_edge.errors import EdgeError
from mlflow_edge.evaluation.data import (
    BUILTIN_DATASET,
    TextSlice,
    builtin_path,
    calibration_text,
    check_disjoint,
    evaluation_text,
)


def test_builtin_slices_are_disjoint_and_not_empty() -> None:
    evaluation, calibration = evaluation_text(), calibration_text()
    assert evaluation.path == calibration.path == builtin_path()
    assert builtin_path().is_file()
    assert evaluation.dataset == calibration.dataset == BUILTIN_DATASET
    corpus = builtin_path().read_text(encoding="utf-8")
    eval_text, calib_text = evaluation.text(), calibration.text()
    assert len(eval_text) == 40_000
    assert len(calib_text) > 10_000
    assert eval_text + calib_text == corpus  # adjacent, no shared character
    assert evaluation.end is not None and calibration.start == evaluation.end
    assert evaluation.label == "wikitext-2[0:40000]"
    assert calibration.label == "wikitext-2[40000:]"


def test_sha256_is_the_hash_of_the_slice_and_stable() -> None:
    evaluation = evaluation_text()
    expected = hashlib.sha256(evaluation.text().encode("utf-8")).hexdigest()
    assert evaluation.sha256 == expected
    assert evaluation_text().sha256 == expected
    assert calibration_text().sha256 != expected


def test_defaults_are_accepted() -> None:
    check_disjoint(evaluation_text(), calibration_text())


def test_overlapping_slices_of_one_file_are_refused() -> None:
    path = builtin_path()
    with pytest.raises(EdgeError, match="overlaps"):
        check_disjoint(evaluation_text(), TextSlice(BUILTIN_DATASET, path, 39_999, None))
    with pytest.raises(EdgeError, match=r"wikitext-2\[10000:20000\]"):
        check_disjoint(evaluation_text(), TextSlice(BUILTIN_DATASET, path, 10_000, 20_000))
    with pytest.raises(EdgeError, match="overlaps"):  # the whole corpus given as a user file
        check_disjoint(evaluation_text(), calibration_text(path))
    check_disjoint(TextSlice(BUILTIN_DATASET, path, 0, 1000), TextSlice(BUILTIN_DATASET, path, 1000, 2000))


def test_identical_text_in_two_files_is_refused(tmp_path: Path) -> None:
    text = "The tower is 324 metres tall , about the same height as an 81 @-@ storey building .\n" * 20
    (tmp_path / "eval.txt").write_text(text, encoding="utf-8")
    (tmp_path / "calib.txt").write_text(text, encoding="utf-8")
    evaluation = evaluation_text(tmp_path / "eval.txt")
    calibration = calibration_text(tmp_path / "calib.txt")
    assert evaluation.label == "eval[0:]" and calibration.label == "calib[0:]"
    with pytest.raises(EdgeError, match="same as the evaluation text"):
        check_disjoint(evaluation, calibration)
    (tmp_path / "calib.txt").write_text(text.upper(), encoding="utf-8")
    check_disjoint(evaluation, calibration_text(tmp_path / "calib.txt"))


def test_user_files_are_read_whole(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("some evaluation text\n", encoding="utf-8")
    piece = evaluation_text(file)
    assert piece.text() == "some evaluation text\n"
    assert piece.dataset == "notes" and piece.path == file.resolve()


def test_missing_or_empty_text_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(EdgeError, match="evaluation text not found: .*missing.txt"):
        evaluation_text(tmp_path / "missing.txt")
    with pytest.raises(EdgeError, match="calibration text not found: .*missing.txt"):
        calibration_text(tmp_path / "missing.txt")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n", encoding="utf-8")
    with pytest.raises(EdgeError, match="empty"):
        evaluation_text(blank).text()
    with pytest.raises(EdgeError, match="cannot read text"):
        TextSlice("gone", tmp_path / "gone.txt").text()
