"""The conditional search space on real Optuna trials."""

from __future__ import annotations

import optuna
import pytest

from mlflow_edge.backends import get_backend
from mlflow_edge.backends.base import EdgeError
from mlflow_edge.search import backends_for, suggest

PRECISIONS = {"Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1", "Q5_K_S",
              "Q5_K_M", "Q6_K", "Q8_0"}


def test_suggest_samples_backend_then_its_own_space():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_imatrix = set()
    for _ in range(12):
        trial = study.ask()
        backend, precision, options = suggest(trial, ("llamacpp",))
        assert backend == "llamacpp" and trial.params["backend"] == "llamacpp"
        assert precision in PRECISIONS and trial.params["llamacpp.precision"] == precision
        assert precision in get_backend("llamacpp").quantize_precisions()
        assert options["imatrix"] is trial.params["llamacpp.imatrix"]
        assert options == ({"imatrix": True, "imatrix_chunks": 8} if options["imatrix"] else {"imatrix": False})
        assert set(trial.params) == {"backend", "llamacpp.precision", "llamacpp.imatrix"}
        seen_imatrix.add(options["imatrix"])
        study.tell(trial, 0.0)
    assert seen_imatrix == {False, True}


def test_backends_for_a_target_are_the_installed_ones_in_its_order():
    assert backends_for("cpu") == ("llamacpp", "openvino")  # onnxruntime, olive, mlx: not registered yet
    assert backends_for("intel-cpu") == ("openvino",)
    assert backends_for("arm-cpu") == ("llamacpp", "openvino")


def test_a_search_spans_both_backends_spaces():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(16):
        trial = study.ask()
        backend, precision, options = suggest(trial, backends_for("cpu"))
        seen.add(backend)
        assert all(name == "backend" or name.startswith(f"{backend}.") for name in trial.params)
        assert precision in get_backend(backend).quantize_precisions()
        study.tell(trial, 0.0)
    assert seen == {"llamacpp", "openvino"}


def test_unknown_target_is_one_line_error():
    with pytest.raises(EdgeError) as info:
        backends_for("mars")
    assert "unknown target 'mars'" in str(info.value) and "\n" not in str(info.value)


def test_backends_that_cannot_convert_the_architecture_are_left_out(tiny_source):
    import dataclasses

    from mlflow_edge import workflow
    from mlflow_edge.search.space import backends_for_model

    assert backends_for_model(("llamacpp",), tiny_source) == (("llamacpp",), {})
    alien = dataclasses.replace(tiny_source, architecture="MadeUpForCausalLM")
    kept, reasons = backends_for_model(("llamacpp",), alien)
    assert kept == () and "cannot convert MadeUpForCausalLM" in reasons["llamacpp"]
    with pytest.raises(EdgeError, match="^unsupported architecture: .*MadeUpForCausalLM$"):
        workflow.convert(alien, "llamacpp", "f16")
