"""Issue #19 on real runs: distinct configurations per trial, bounds that decide gates, models stored for the front only
(the rest rebuild bit-identically from their command), labelled fronts on a readable parent run."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import mlflow
import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from mlflow_edge.artifacts import content_digest, read_artifact_record
from mlflow_edge.cli import main
from mlflow_edge.runs import DIGEST_TAG, MODEL_URI_TAG
from mlflow_edge.search import SearchConfig, run_search
from mlflow_edge.search.objective import REBUILD_TAG
from mlflow_edge.search.space import DistinctSampler, enumerate_space, suggest, unmeasured

MODEL_NAME = "tiny-trust-edge"


def test_the_space_lists_every_configuration_once():
    points = enumerate_space(["llamacpp"])
    # (14 uniform types + MIXED at 5 budgets) × imatrix
    assert len(points) == 38 and len({tuple(sorted(p.items())) for p in points}) == 38
    assert {"backend": "llamacpp", "llamacpp.precision": "Q4_K_M", "llamacpp.imatrix": True} in points
    assert {"backend": "llamacpp", "llamacpp.precision": "MIXED", "llamacpp.target_bpw": 6.0,
            "llamacpp.imatrix": False} in points


def test_every_trial_of_the_distinct_sampler_is_new():
    space = enumerate_space(["llamacpp"])
    sampler = DistinctSampler(optuna.samplers.TPESampler(seed=0, n_startup_trials=2), space, seed=0)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: len(suggest(t, ["llamacpp"])[1]), n_trials=len(space))  # TPE alone repeats itself
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == len(space)
    assert unmeasured(space, study.trials) == []


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_source, use_sqlite_store):
    folder = tmp_path_factory.mktemp("trust")
    settings = dataclasses.replace(_quick(), windows=4)
    with pytest.MonkeyPatch.context() as patch:
        use_sqlite_store(folder, patch)
        result = run_search(SearchConfig(str(tiny_source.path), trials=3, objectives="min:size_mb",
                                         gates="accuracy_retention>=0.5", settings=settings, backends=["llamacpp"],
                                         registered_model=MODEL_NAME, screen_windows=0))
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        yield folder, result, runs
        mlflow.end_run()


def _candidates(runs):
    return [r for r in runs if r.data.tags.get("mlflow_edge.role") == "candidate"]


def test_three_trials_measure_three_configurations(searched):
    _, result, runs = searched
    configs = {(r.data.params["precision"], r.data.params.get("llamacpp.imatrix")) for r in _candidates(runs)}
    assert len(_candidates(runs)) == 3 and len(configs) == 3
    assert result["distinct_left"] == 38 - 3


def test_a_budgeted_mixed_recipe_is_tried_early_beside_uniform_types(searched):
    """llama.cpp's second starting point is its per-tensor recipe at 6 bits per weight: measured like any trial,
    rebuilt by its command, its recipe logged with its model when the front keeps it."""
    folder, _, runs = searched
    mixed = next(r for r in _candidates(runs) if r.data.tags["mlflow_edge.trial"] == "1")
    assert mixed.data.params["precision"] == "MIXED" and float(mixed.data.params["llamacpp.target_bpw"]) == 6.0
    assert 5.5 <= float(mixed.data.params["llamacpp.predicted_bpw"]) <= 6.0  # the embedding is 92 % of the weights
    assert "--precision MIXED" in mixed.data.tags[REBUILD_TAG] and "target_bpw=6.0" in mixed.data.tags[REBUILD_TAG]
    assert mixed.info.status == "FINISHED" and mixed.data.metrics["accuracy_retention"] > 0
    logged = {f.path for f in MlflowClient().list_artifacts(mixed.info.run_id, "recipe")}
    assert ("recipe/recipe.json" in logged) == (MODEL_URI_TAG in mixed.data.tags)


def test_models_are_stored_for_the_front_only_and_counted(searched):
    _, result, runs = searched
    stored = [r for r in _candidates(runs) if MODEL_URI_TAG in r.data.tags]
    smallest = min(r.data.metrics["size_mb"] for r in _candidates(runs))
    assert 1 <= len(stored) < 3  # one objective: the front is the smallest trial(s), also the policy's pick
    assert all(r.data.metrics["size_mb"] == smallest for r in stored)
    parent = next(r for r in runs if r.data.tags.get("mlflow_edge.role") == "study")
    assert parent.data.metrics["bytes_logged"] == result["bytes_logged"]
    once = {r.data.tags[DIGEST_TAG]: r.data.metrics["size_mb"] for r in stored}  # logged once per content hash
    assert result["bytes_logged"] == pytest.approx(sum(once.values()) * 1e6, rel=1e-9)
    assert parent.info.run_name == result["study"]  # a readable parent run
    names = {f.path for f in MlflowClient().list_artifacts(parent.info.run_id, "search")}
    assert {"search/front_size_mb_vs_kld_mean.png", "search/front_size_mb_vs_kld_mean.html",
            "search/front_size_mb_vs_decode_tok_s.png"} <= names
    html = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id,
                                                    artifact_path="search/front_size_mb_vs_kld_mean.html"))
    assert "champion" in html.read_text() and stored[0].data.params["precision"] in html.read_text()


def test_bounds_are_logged_beside_every_point_value(searched):
    _, result, runs = searched
    for run in _candidates(runs):
        m = run.data.metrics
        assert m["accuracy_retention_lo"] <= m["accuracy_retention"] <= m["accuracy_retention_hi"]
        assert m["kld_mean_lo"] <= m["kld_mean"] <= m["kld_mean_hi"]
        assert m["speedup_vs_base"] > 0
    assert {"accuracy_retention_lo", "kld_mean_hi"} <= set(result["pareto"][0])


def test_an_unstored_trial_rebuilds_bit_identically_from_its_command(searched, tmp_path, monkeypatch):
    _, _, runs = searched
    unstored = next(r for r in _candidates(runs) if MODEL_URI_TAG not in r.data.tags)
    command = shlex.split(unstored.data.tags[REBUILD_TAG])
    assert command[:2] == ["mlflow-edge", "quantize"]
    fresh = tmp_path / "fresh-cache"
    monkeypatch.setenv("MLFLOW_EDGE_CACHE", str(fresh))  # nothing reused: converted and quantized again
    outcome = CliRunner().invoke(main, command[1:])
    assert outcome.exit_code == 0, outcome.output
    (record,) = fresh.glob("quantize-llamacpp/*/artifact.json")
    assert content_digest(read_artifact_record(record.parent)) == unstored.data.tags[DIGEST_TAG]


def test_a_point_value_that_passes_with_a_failing_lower_bound_is_refused_under_gate_confidence(searched):
    _, _, runs = searched
    stored = next(r for r in _candidates(runs) if MODEL_URI_TAG in r.data.tags)
    point, low = stored.data.metrics["accuracy_retention"], stored.data.metrics["accuracy_retention_lo"]
    assert low < point
    size = stored.data.metrics["size_mb"]  # the stored model is the smallest: larger candidates fail on size
    between = f"accuracy_retention>={(point + low) / 2!r},size_mb<={size!r}"
    args = ["promote", "--experiment", "mlflow-edge", "--target", "cpu", "--gates", between,
            "--registered-model", "tiny-confidence"]
    refused = CliRunner().invoke(main, [*args, "--gate-confidence", "0.95"])
    assert refused.exit_code == 1
    assert "none of 3 candidates passed the gates accuracy_retention_lo>=" in refused.output
    assert MlflowClient().search_registered_models("name = 'tiny-confidence'") == []
    accepted = CliRunner().invoke(main, args)
    assert accepted.exit_code == 0 and "promoted run" in accepted.output


def test_an_exhausted_space_stops_the_search_saying_so(tracking_uri, tiny_source, capsys):
    storage = f"sqlite:///{Path.cwd() / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="exhausted", directions=["minimize"])
    space = enumerate_space(["llamacpp"])
    names = dict.fromkeys(name for p in space for name in p)
    choices = {name: list(dict.fromkeys(p[name] for p in space if name in p)) for name in names}  # backend's order
    for point in space:
        distributions = {k: optuna.distributions.CategoricalDistribution(choices[k]) for k in point}
        study.add_trial(optuna.trial.create_trial(params=point, distributions=distributions, values=[1.0]))
    with pytest.raises(Exception, match="no evaluated candidate runs"):
        run_search(SearchConfig(str(tiny_source.path), trials=50, objectives="min:size_mb", backends=["llamacpp"],
                                study_name="exhausted", storage=storage, registered_model=MODEL_NAME,
                                settings=dataclasses.replace(_quick(), windows=2)))
    err = capsys.readouterr().err
    assert "only 0 of the 38 configurations are not measured yet" in err and "0 to run" in err
    assert len(optuna.load_study(study_name="exhausted", storage=storage).trials) == 38  # nothing measured again


def _quick():
    from mlflow_edge.evaluation.harness import EvalSettings

    return EvalSettings(window=64, windows=2, threads=2, repeats=2, prefill_tokens=64, prompt_tokens=16,
                        decode_tokens=8)


def test_trials_that_fail_before_measuring_cannot_loop_forever():
    from mlflow_edge.search.workers import StopWhenDone

    study = optuna.create_study()
    calls = []

    def broken(trial):
        calls.append(trial.number)
        raise RuntimeError("the backend failed to sample")  # no "error" attribute: it never counts as measured

    study.optimize(broken, n_trials=None, catch=(RuntimeError,), callbacks=[StopWhenDone(budget=3, space=None)])
    assert len(calls) == 6  # stopped by the guard at twice the budget
