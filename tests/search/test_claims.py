"""Two workers that sample the same configuration at the same moment: exactly one measures it, whatever the order in
which they mark, check and claim (the benchmark of issue #18 caught two trials measuring Q3_K_S with an imatrix)."""

from __future__ import annotations

import optuna
import pytest

from mlflow_edge.search.objective import GaveWay, claim


def _two_trials_with_the_same_params():
    study = optuna.create_study()
    for _ in range(2):
        study.enqueue_trial({"x": 1})
    older, newer = study.ask(), study.ask()
    for trial in (older, newer):
        trial.suggest_int("x", 0, 5)
    return older, newer


def test_the_newer_gives_way_when_both_sampled_before_either_checked():
    older, newer = _two_trials_with_the_same_params()
    older.set_user_attr("sampled", True)  # the older one marked itself and has not checked yet
    with pytest.raises(GaveWay, match=f"trial {older.number} of another worker"):
        claim(newer)
    claim(older)  # and the older one, checking after, measures it
    assert newer.study.trials[newer.number].user_attrs["gave_way_to"] == older.number


def test_the_older_gives_way_to_a_newer_one_that_already_claimed():
    older, newer = _two_trials_with_the_same_params()
    claim(newer)  # checked before the older one had marked itself
    with pytest.raises(GaveWay):
        claim(older)


def test_a_configuration_nobody_else_runs_is_claimed():
    study = optuna.create_study()
    first, second = study.ask(), study.ask()
    first.suggest_int("x", 0, 0)
    second.suggest_int("x", 1, 1)
    claim(first)
    claim(second)
    assert all(t.user_attrs.get("claimed") for t in study.trials)
