"""The search's remaining-time estimate and a timeout that holds within about one trial (a real Optuna study)."""

from __future__ import annotations

import time

import optuna

from mlflow_edge.search.workers import TimeLeft


def _slow(trial: optuna.Trial) -> float:
    time.sleep(0.4)
    return trial.suggest_float("x", 0.0, 1.0)


def test_each_trial_says_how_long_the_rest_takes(capsys):
    study = optuna.create_study()
    study.optimize(_slow, n_trials=3, callbacks=[TimeLeft(budget=5, timeout=None)])
    lines = [line for line in capsys.readouterr().err.splitlines() if "left at" in line]
    assert len(lines) == 3
    assert "1 of 5 trial(s) measured; about 0.0 min left at 0 s a trial" in lines[0]  # 4 × 0.4 s
    assert "3 of 5 trial(s) measured" in lines[2]


def test_no_trial_starts_that_would_end_past_the_timeout(capsys):
    study = optuna.create_study()
    started = time.monotonic()
    study.optimize(_slow, n_trials=20, callbacks=[TimeLeft(budget=20, timeout=1.0)])
    assert len(study.trials) == 2 and time.monotonic() - started < 1.0 + 0.4  # optuna alone would start a third
    assert "so no further trial starts" in capsys.readouterr().err
