"""The conditional search space on real Optuna trials."""

from __future__ import annotations

import optuna
import pytest

from mlflow_edge.backends import backend_names, get_backend
from mlflow_edge.errors import EdgeError
from mlflow_edge.search import backends_for, suggest

INSTALLED = backends_for("cpu")


@pytest.mark.parametrize("backend", INSTALLED)
def test_suggest_samples_backend_then_its_own_space(backend):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    precisions = set()
    for _ in range(12):
        trial = study.ask()
        chosen, precision, options = suggest(trial, (backend,))
        assert chosen == backend and trial.params["backend"] == backend
        assert all(name == "backend" or name.startswith(f"{backend}.") for name in trial.params)
        assert precision in get_backend(backend).quantize_precisions()
        assert set(options) <= {spec.name for spec in get_backend(backend).option_specs()}
        precisions.add(precision)
        study.tell(trial, 0.0)
    assert len(precisions) > 1


def test_backends_for_a_target_are_the_installed_ones_primary_first():
    for target in ("cpu", "intel-cpu", "arm-cpu"):
        found = backends_for(target)
        declared = [get_backend(b).targets.get(target) for b in found]
        assert None not in declared and declared == sorted(declared, key=("primary", "secondary").index)
    assert set(INSTALLED) == {b for b in backend_names() if "cpu" in get_backend(b).targets and _installed(b)}


def _installed(name: str) -> bool:
    try:
        get_backend(name).versions()
    except EdgeError:
        return False
    return True


def test_a_search_spans_every_installed_backends_space():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(8 * len(INSTALLED)):
        trial = study.ask()
        backend, precision, options = suggest(trial, INSTALLED)
        seen.add(backend)
        assert all(name == "backend" or name.startswith(f"{backend}.") for name in trial.params)
        assert precision in get_backend(backend).quantize_precisions()
        study.tell(trial, 0.0)
    assert seen == set(INSTALLED)


def test_unknown_target_is_one_line_error():
    with pytest.raises(EdgeError) as info:
        backends_for("mars")
    assert "unknown target 'mars'" in str(info.value) and "\n" not in str(info.value)


def test_backends_that_cannot_convert_the_architecture_are_left_out(tiny_source):
    import dataclasses

    from mlflow_edge import artifacts
    from mlflow_edge.search.space import backends_for_model

    assert backends_for_model(INSTALLED, tiny_source) == (INSTALLED, {})
    alien = dataclasses.replace(tiny_source, architecture="MadeUpForCausalLM", path=tiny_source.path)
    kept, reasons = backends_for_model(("llamacpp",), alien)
    assert kept == () and "cannot convert MadeUpForCausalLM" in reasons["llamacpp"]
    with pytest.raises(EdgeError, match="^unsupported architecture: .*MadeUpForCausalLM$"):
        artifacts.convert(alien, "llamacpp", "f16")
