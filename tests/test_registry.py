"""Promotion policy and candidate selection on a real sqlite store."""

from __future__ import annotations

import math

import mlflow
import pytest

from mlflow_edge import registry
from mlflow_edge.errors import EdgeError
from mlflow_edge.gates import parse_gates


def test_policy_orders_by_direction():
    fast = registry.parse_policy("max:decode_tok_s")
    small = registry.parse_policy("min:size_mb")
    a, b = {"decode_tok_s": 100.0, "size_mb": 90.0}, {"decode_tok_s": 80.0, "size_mb": 70.0}
    assert fast.scores([a, b]) == [100.0, 80.0] and small.scores([a, b]) == [-90.0, -70.0]
    assert fast.scores([{}]) == [-math.inf] and small.scores([{"size_mb": math.nan}]) == [-math.inf]
    assert str(fast) == "max:decode_tok_s" and fast.metrics == ("decode_tok_s",)


def test_weighted_policy_scales_each_metric_over_the_pool():
    policy = registry.parse_policy("weighted:max:decode_tok_s=0.5,min:size_mb=0.25,max:accuracy_retention=0.25")
    fast_big = {"decode_tok_s": 200.0, "size_mb": 140.0, "accuracy_retention": 0.99}
    slow_small = {"decode_tok_s": 100.0, "size_mb": 90.0, "accuracy_retention": 0.95}
    middle = {"decode_tok_s": 150.0, "size_mb": 100.0, "accuracy_retention": 0.97}
    scores = policy.scores([fast_big, slow_small, middle])
    assert scores[0] == pytest.approx(0.5 + 0.0 + 0.25)
    assert scores[1] == pytest.approx(0.0 + 0.25 + 0.0)
    assert scores[2] == pytest.approx(0.25 + 0.25 * 0.8 + 0.125)
    assert scores[0] > scores[2] > scores[1]
    speed_only = registry.parse_policy("weighted:max:decode_tok_s=1,min:size_mb=0.01")
    assert max(range(3), key=speed_only.scores([fast_big, slow_small, middle]).__getitem__) == 0
    size_first = registry.parse_policy("weighted:max:decode_tok_s=0.01,min:size_mb=1")
    assert max(range(3), key=size_first.scores([fast_big, slow_small, middle]).__getitem__) == 1
    assert policy.scores([fast_big, {"decode_tok_s": 1.0}])[1] == -math.inf
    assert registry.parse_policy(str(policy)) == policy


@pytest.mark.parametrize("spec", ["decode_tok_s", "fastest:decode_tok_s", "max:vibes", "max:", "weighted:",
                                  "weighted:max:decode_tok_s", "weighted:max:decode_tok_s=-1",
                                  "weighted:max:decode_tok_s=x", "weighted:max:size_mb=1,min:size_mb=1"])
def test_bad_policies_are_refused(spec):
    with pytest.raises(EdgeError, match="bad promotion policy"):
        registry.parse_policy(spec)


def test_only_finished_evaluated_candidates_of_the_target_compete(tracking_uri):
    experiment = mlflow.set_experiment("edge")
    def make(role, target, status="FINISHED", model=True, evaluated=True):
        with mlflow.start_run() as run:
            tags = {"mlflow_edge.role": role, "mlflow_edge.target": target}
            if model:
                tags[registry.MODEL_URI_TAG] = "models:/m-none"
            if evaluated:
                tags[registry.EVALUATED_TAG] = "pass"
            mlflow.set_tags(tags)
            mlflow.log_metric("size_mb", 1.0)
        if status != "FINISHED":
            mlflow.MlflowClient().set_terminated(run.info.run_id, status)
        return run.info.run_id

    keep = make("candidate", "cpu")
    make("candidate", "arm-cpu")
    make("reference", "cpu")
    make("candidate", "cpu", status="FAILED")
    unlogged = make("candidate", "cpu", model=False)  # measured, its model files not logged (off a search's front)
    make("candidate", "cpu", evaluated=False)  # a logged model never measured (a standalone convert) is no candidate
    found = registry.candidate_runs([experiment.experiment_id], "cpu")
    assert [run.info.run_id for run in found] == [unlogged, keep]
    with pytest.raises(EdgeError, match="1 candidate.s. passed the gates size_mb<=0.5 but none has its model files "
                                        "logged .*mlflow_edge.rebuild"):
        mlflow.MlflowClient().log_metric(unlogged, "size_mb", 0.4)
        registry.promote([experiment.experiment_id], "cpu", parse_gates("size_mb<=0.5"), "min:size_mb", "m")


def test_nothing_to_promote_is_an_error_and_registers_nothing(tracking_uri):
    experiment = mlflow.set_experiment("edge")
    with pytest.raises(EdgeError, match="no evaluated candidate runs for target 'cpu'"):
        registry.promote([experiment.experiment_id], "cpu", parse_gates(None), "min:size_mb", "nothing-edge")
    assert mlflow.MlflowClient().search_registered_models() == []


def test_a_study_name_matches_only_itself_whatever_its_quotes(tracking_uri):
    experiment = mlflow.set_experiment("edge")
    studies = ["a'b", "a", "b", "a''b", "a\\'b", 'say "hi"', "it's \"both\"", "ends\\", "A'B"]
    run_ids = {}
    for study in studies:
        with mlflow.start_run() as run:
            mlflow.set_tags({"mlflow_edge.role": "candidate", "mlflow_edge.target": "cpu",
                             "mlflow_edge.study": study, registry.MODEL_URI_TAG: "models:/m-none",
                             "gates.result": "pass"})
        run_ids[study] = run.info.run_id
    for study in studies:
        found = registry.candidate_runs([experiment.experiment_id], "cpu", study)
        assert [run.info.run_id for run in found] == [run_ids[study]], study


def test_a_tie_on_the_policy_goes_to_fidelity_then_speed_then_size():
    small = registry.parse_policy("min:size_mb")
    plain = {"size_mb": 102.79, "kld_mean": 0.031, "accuracy_retention": 0.97, "decode_tok_s": 85.6}
    with_imatrix = {"size_mb": 102.79, "kld_mean": 0.012, "accuracy_retention": 0.99, "decode_tok_s": 107.7}
    assert small.pick([plain, with_imatrix]) == 1 and small.pick([with_imatrix, plain]) == 0
    same_fidelity_faster = {**plain, "decode_tok_s": 90.0}
    assert small.pick([plain, same_fidelity_faster]) == 1
    assert small.pick([plain, dict(plain)]) == 0  # an exact tie goes to the earlier one


def test_a_dominated_candidate_never_wins_whatever_the_policy():
    front = {"size_mb": 100.0, "kld_mean": 0.02, "accuracy_retention": 0.98, "decode_tok_s": 100.0,
             "peak_rss_mb": 300.0}
    dominated = {"size_mb": 110.0, "kld_mean": 0.03, "accuracy_retention": 0.97, "decode_tok_s": 90.0,
                 "peak_rss_mb": 300.0}
    assert registry.dominates(front, dominated) and not registry.dominates(dominated, front)
    assert not registry.dominates(front, dict(front))
    for spec in ("min:size_mb", "max:fidelity", "max:decode_tok_s", "min:peak_rss_mb",
                 "weighted:max:decode_tok_s=1,min:size_mb=1", "max:top1_agreement"):
        assert registry.parse_policy(spec).pick([dominated, front]) == 1, spec
    # a better value of the policy's own metric is a reason to win: lower memory is not dominated
    lean = {**dominated, "peak_rss_mb": 200.0}
    assert registry.parse_policy("min:peak_rss_mb").pick([front, lean]) == 1
    assert registry.undominated([front, dominated, lean], registry.parse_policy("min:peak_rss_mb").objectives) == [0, 2]


def test_max_fidelity_ranks_by_mean_kld_then_retention():
    policy = registry.parse_policy("max:fidelity")
    assert str(policy) == "max:fidelity" and policy.metrics == ("kld_mean", "accuracy_retention")
    assert registry.parse_policy(str(policy)) == policy
    small_loose = {"size_mb": 80.0, "kld_mean": 0.04, "accuracy_retention": 0.96, "decode_tok_s": 120.0}
    big_faithful = {"size_mb": 140.0, "kld_mean": 0.008, "accuracy_retention": 0.99, "decode_tok_s": 90.0}
    tie_on_kld = {**big_faithful, "accuracy_retention": 0.995, "size_mb": 150.0}
    assert policy.pick([small_loose, big_faithful]) == 1
    assert policy.pick([small_loose, big_faithful, tie_on_kld]) == 2
    assert registry.parse_policy("min:size_mb").pick([small_loose, big_faithful]) == 0
