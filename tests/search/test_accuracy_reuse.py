"""Accuracy measured once per artifact: a later search of the same experiment (another study, another target, another
machine) that builds a byte-identical artifact takes its accuracy from the run that measured it, and times it anew."""

from __future__ import annotations

import mlflow
import pytest

from mlflow_edge.evaluation.harness import EvalSettings
from mlflow_edge.metrics import ACCURACY_SIZE_METRICS
from mlflow_edge.runs import ACCURACY_FROM_TAG, ACCURACY_KEY_TAG, DIGEST_TAG
from mlflow_edge.search import SearchConfig, run_search

QUICK = EvalSettings(window=64, windows=2, threads=2, repeats=2, prefill_tokens=64, prompt_tokens=16, decode_tokens=8)


def _trial_runs(study: str):
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`mlflow_edge.study` = '{study}' AND "
                                            "tags.`mlflow_edge.role` = 'candidate'")
    return sorted(runs, key=lambda r: r.info.start_time)


COMMON = dict(trials=1, objectives="min:size_mb", gates="accuracy_retention>=0.5", backends=["llamacpp"],
              screen_windows=0, registered_model="tiny-reuse-edge")


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory, tiny_source, use_sqlite_store):
    """Two studies with the same settings in one store; the store stays current for the module's tests."""
    folder = tmp_path_factory.mktemp("reuse")
    with pytest.MonkeyPatch.context() as patch:
        use_sqlite_store(folder, patch)
        run_search(SearchConfig(str(tiny_source.path), study_name="first", settings=QUICK, **COMMON))
        run_search(SearchConfig(str(tiny_source.path), study_name="second", settings=QUICK, **COMMON))
        yield _trial_runs("first"), _trial_runs("second")
        mlflow.end_run()


def test_the_second_study_reuses_the_accuracy_and_times_the_artifact_again(two_studies):
    (first,), (second,) = two_studies
    assert first.data.tags[DIGEST_TAG] == second.data.tags[DIGEST_TAG]
    assert first.data.tags[ACCURACY_KEY_TAG] == second.data.tags[ACCURACY_KEY_TAG]
    assert ACCURACY_FROM_TAG not in first.data.tags
    assert second.data.tags[ACCURACY_FROM_TAG] == first.info.run_id
    reused = {k: v for k, v in first.data.metrics.items() if k in ACCURACY_SIZE_METRICS}
    assert {"kld_mean", "perplexity", "accuracy_retention", "kld_mean_hi"} <= reused.keys()
    assert {k: second.data.metrics[k] for k in reused} == reused
    assert second.data.metrics["decode_tok_s"] > 0 and "decode_tok_s" in first.data.metrics


def test_other_evaluation_settings_measure_accuracy_again(two_studies, tiny_source):
    (two,), _ = two_studies  # measured with two windows, in the store this search runs in
    three = EvalSettings(**{**QUICK.__dict__, "windows": 3})
    run_search(SearchConfig(str(tiny_source.path), study_name="three-windows", settings=three, **COMMON))
    (again,) = _trial_runs("three-windows")
    mlflow.end_run()
    assert two.data.tags[DIGEST_TAG] == again.data.tags[DIGEST_TAG]
    assert ACCURACY_FROM_TAG not in again.data.tags
    assert two.data.tags[ACCURACY_KEY_TAG] != again.data.tags[ACCURACY_KEY_TAG]
