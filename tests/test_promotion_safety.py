"""Promotion under kills, repeats and races, on a real sqlite store with real logged models and real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_edge import registry
from mlflow_edge.errors import EdgeError
from mlflow_edge.gates import parse_gates
from tests.test_readiness import FIRST, NAME, SMALLER, STUDY, _candidate

ALIAS = "cpu-champion"


def _promote(gates: str | None = None, study: str | None = STUDY, source: str | None = None) -> registry.Promotion:
    experiment = mlflow.get_experiment_by_name("edge")
    return registry.promote([experiment.experiment_id], "cpu", parse_gates(gates), "min:size_mb", NAME, study,
                            source)


def _versions() -> list:
    return MlflowClient().search_model_versions(f"name = '{NAME}'")


def _champion_run() -> str:
    return MlflowClient().get_model_version_by_alias(NAME, ALIAS).tags["mlflow_edge.run_id"]


PROMOTE_IN_CHILD = textwrap.dedent("""
    import os, signal, sys
    import mlflow
    from mlflow import MlflowClient
    from mlflow_edge import registry
    from mlflow_edge.gates import parse_gates

    mlflow.set_tracking_uri(sys.argv[1])
    if sys.argv[3] == "kill-before-alias":  # the process dies between registering and aliasing
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        MlflowClient.set_registered_model_alias = die
    experiment = mlflow.get_experiment_by_name("edge")
    result = registry.promote([experiment.experiment_id], "cpu", parse_gates(None), "min:size_mb", sys.argv[2],
                              sys.argv[4] if len(sys.argv) > 4 else None)
    print(result.version)
""")


def _promote_in_child(tracking_uri: str, mode: str, study: str | None = None) -> subprocess.Popen:
    args = [sys.executable, "-c", PROMOTE_IN_CHILD, tracking_uri, NAME, mode] + ([study] if study else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_promoting_the_same_run_twice_registers_one_version(tracking_uri, stub_gguf) -> None:
    mlflow.set_experiment("edge")
    run_id = _candidate(stub_gguf, FIRST)
    first, second = _promote(), _promote()
    assert not first.kept_champion and second.kept_champion and second.version == first.version
    assert len(_versions()) == 1 and _champion_run() == run_id


def test_a_promotion_killed_before_the_alias_is_adopted_by_the_next(tracking_uri, stub_gguf) -> None:
    mlflow.set_experiment("edge")
    run_id = _candidate(stub_gguf, FIRST)
    child = _promote_in_child(tracking_uri, "kill-before-alias")
    child.communicate(timeout=120)
    assert child.returncode == -9  # SIGKILL, for real
    (orphan,) = _versions()
    assert orphan.tags[registry.PROMOTION_TAG] == "pending" and not orphan.aliases

    promotion = _promote()
    assert promotion.version == str(orphan.version) and len(_versions()) == 1  # adopted, not registered again
    version = MlflowClient().get_model_version(NAME, promotion.version)
    assert version.aliases == [ALIAS] and version.tags[registry.PROMOTION_TAG] == "done"
    assert version.description.startswith("# Readiness") and _champion_run() == run_id


def test_an_interrupted_version_of_a_losing_run_is_removed(tracking_uri, stub_gguf) -> None:
    mlflow.set_experiment("edge")
    _candidate(stub_gguf, FIRST, study="old")
    child = _promote_in_child(tracking_uri, "kill-before-alias", "old")
    child.communicate(timeout=120)
    (orphan,) = _versions()
    smaller = _candidate(stub_gguf, SMALLER)
    promotion = _promote()
    assert [str(v.version) for v in _versions()] == [promotion.version] != [str(orphan.version)]
    assert _champion_run() == smaller


def test_two_promoters_at_once_leave_the_alias_on_the_better_candidate(tracking_uri, stub_gguf) -> None:
    mlflow.set_experiment("edge")
    _candidate(stub_gguf, FIRST, study="big")
    smaller = _candidate(stub_gguf, SMALLER, study="small")
    children = [_promote_in_child(tracking_uri, "normal", study) for study in ("small", "big", "small", "big")]
    outputs = [child.communicate(timeout=180) for child in children]
    assert all(child.returncode == 0 for child in children), [err[-2000:] for _, err in outputs]
    assert _champion_run() == smaller
    assert {v.tags[registry.PROMOTION_TAG] for v in _versions()} == {"done"}
    assert len({v.tags["mlflow_edge.run_id"] for v in _versions()}) == len(_versions())  # one version per run


def test_a_champion_that_fails_the_gates_in_force_is_replaced(tracking_uri, stub_gguf) -> None:
    mlflow.set_experiment("edge")
    small = _candidate(stub_gguf, SMALLER)
    assert not _promote().kept_champion and _champion_run() == small
    faithful = _candidate(stub_gguf, {**FIRST, "accuracy_retention": 0.995})  # bigger, but more faithful
    assert _promote().kept_champion  # under the default gates the smaller champion stays
    promotion = _promote("accuracy_retention>=0.99")  # stricter gates: the champion no longer passes
    assert not promotion.kept_champion and _champion_run() == faithful


def test_without_a_study_only_candidates_of_one_source_compete(tracking_uri, stub_gguf) -> None:
    from dataclasses import replace

    mlflow.set_experiment("edge")
    other = replace(stub_gguf, source_name="other", source_sha256="cd" * 32)
    _candidate(stub_gguf, FIRST)
    smaller_other = _candidate(other, SMALLER)
    with pytest.raises(EdgeError, match=r"come from 2 source models \(other, tiny\); name one with --model"):
        _promote(study=None)
    assert _versions() == []
    first = _promote(study=None, source="tiny")
    assert first.run_id != smaller_other
    # with a champion, its source decides: the smaller model of another source does not compete
    assert _promote(study=None).kept_champion and _champion_run() == first.run_id


def test_promote_cli_names_the_source_model(tracking_uri, stub_gguf, tmp_path: Path) -> None:
    mlflow.set_experiment("edge")
    _candidate(stub_gguf, FIRST)
    proc = subprocess.run([sys.executable, "-m", "mlflow_edge.cli", "promote", "--experiment", "edge",
                           "--registered-model", NAME, "--model", "tiny"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "promoted run" in proc.stdout and _champion_run()
