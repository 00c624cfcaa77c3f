"""The order of precision: bits per configuration, the evidence of finished trials, the next step and the gated
starting points, on the real backends' spaces (no model is quantized here)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from optuna.trial import TrialState

from mlflow_edge.gates import resolve_gates
from mlflow_edge.search.precision import (
    BITS_ATTR,
    NOISE_SLOPE,
    Evidence,
    PrecisionOrder,
    gated_starting_points,
)
from mlflow_edge.search.space import backends_for, enumerate_space
from mlflow_edge.search.study import starting_points

BACKENDS = backends_for("cpu")


def _llamacpp(precision: str, imatrix: bool = False) -> dict:
    return {"backend": "llamacpp", "llamacpp.precision": precision, "llamacpp.imatrix": imatrix}


@pytest.fixture(scope="module")
def space():
    if "llamacpp" not in BACKENDS:
        pytest.skip("llama.cpp is not installed")
    return enumerate_space(BACKENDS)


def _order(space, tiny_source, fidelity: str = "balanced") -> PrecisionOrder:
    return PrecisionOrder.of(space, BACKENDS, tiny_source, resolve_gates(None, fidelity))


def _trial(order: PrecisionOrder, number: int, params: dict, kld: float, retention: float = 1.0,
           state: TrialState = TrialState.COMPLETE) -> SimpleNamespace:
    bits = order.configuration_of(params).bits
    metrics = {"kld_mean": kld, "accuracy_retention": retention}
    return SimpleNamespace(number=number, state=state, params=params, user_attrs={
        "backend": params["backend"], BITS_ATTR: {"method": bits.method, "bpw": bits.bpw},
        "metrics" if state == TrialState.COMPLETE else "screen": metrics})


def test_every_configuration_of_the_builtin_backends_declares_its_bits(space, tiny_source):
    order = _order(space, tiny_source)
    for config in order.configurations:
        assert config.bits is not None and config.bits.method and 1.0 < config.bits.bpw < 33.0, config
    bits = {c.params["llamacpp.precision"]: c.bits.bpw for c in order.configurations
            if c.backend == "llamacpp" and c.group == ("llamacpp", "type")}
    ladder = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
    assert [bits[t] for t in ladder] == sorted(bits[t] for t in ladder)  # 256-wide rows: no fallback


def test_the_mean_kld_is_predicted_log_linear_in_the_bits():
    one = Evidence(kld=[(8.0, 0.002)])
    assert one.predict(7.0) == pytest.approx(0.002 * math.exp(NOISE_SLOPE))
    two = Evidence(kld=[(8.0, 0.002), (6.0, 0.02)])  # a slope of ln(10)/2 a bit
    assert two.predict(5.0) == pytest.approx(0.02 * math.sqrt(10.0))
    assert Evidence().predict(4.0) is None


def test_a_fidelity_failure_makes_fewer_bits_of_the_same_method_unlikely(space, tiny_source):
    order = _order(space, tiny_source)
    failed = _trial(order, 0, _llamacpp("Q4_K_M"), kld=0.2, retention=0.9, state=TrialState.PRUNED)
    left = order.plausible(space, [failed])
    names = {(p.get("llamacpp.precision"), p.get("llamacpp.imatrix")) for p in left if p["backend"] == "llamacpp"}
    for lower in ("Q4_K_M", "Q4_0", "Q3_K_L", "Q2_K"):
        assert (lower, False) not in names and (lower, True) in names  # an importance matrix is another method
    assert ("Q5_K_M", False) in names and ("Q8_0", False) in names
    assert any(p["backend"] == "openvino" for p in left)
    unlikely_only = [p for p in space if p == _llamacpp("Q2_K")]
    assert order.plausible(unlikely_only, [failed]) == unlikely_only  # nothing else left: they stay


def test_the_next_step_is_the_smallest_predicted_to_pass_below_a_pass(space, tiny_source):
    order = _order(space, tiny_source, "balanced")  # kld_mean <= 0.05; 256-wide rows: the types' own bits
    passed = _trial(order, 0, _llamacpp("Q8_0"), kld=0.0005)  # 8.5 bits: predicted to cross 0.05 at 5.18 bits
    open_points = [p for p in space if p != passed.params]
    step = order.next_point(open_points, [passed])
    assert step == _llamacpp("Q5_0")  # 5.5 bits, the fewest predicted to pass (Q4_1 at 5.0 is predicted to fail)
    failed = _trial(order, 1, step, kld=0.06, retention=0.96)  # the fit now falls 1.6 per bit, not ln 4
    again = order.next_point([p for p in open_points if p != step], [passed, failed])
    assert again == _llamacpp("Q5_K_M")  # 5.68 bits: predicted 0.045; Q5_K_S (5.52) 0.058
    assert order.predict(order.configuration_of(again), [passed, failed]) == pytest.approx(0.045, abs=0.002)
    closed = _trial(order, 2, again, kld=0.04)
    assert order.next_point([p for p in open_points if p not in (step, again)], [passed, failed, closed]) == \
        _llamacpp("Q5_K_S")  # the last one between the failure at 5.5 and the pass at 5.68
    no_gate = PrecisionOrder(order.configurations, resolve_gates("accuracy_retention>=0.95"))
    assert no_gate.next_point(open_points, [passed]) == _llamacpp("Q6_K")  # no KLD ceiling: the next lower bits


def test_a_sensitivity_estimate_takes_the_fits_place_scaled_by_the_trials(space, tiny_source):
    """A backend's own estimate orders the steps once a measured trial of that backend scales it; without one, the
    fit stays in charge."""
    base = _order(space, tiny_source, "balanced")
    estimates = {"Q6_K": 0.004, "Q5_K_M": 0.012, "Q5_K_S": 0.014, "Q5_1": 0.02, "Q5_0": 0.03, "Q4_1": 0.04,
                 "Q4_K_M": 0.045, "Q4_K_S": 0.05, "Q4_0": 0.07}
    order = PrecisionOrder(base.configurations, base.gates,
                           lambda c: estimates.get(c.precision) if c.backend == "llamacpp" else None)
    passed = _trial(order, 0, _llamacpp("Q8_0"), kld=0.0005)
    open_points = [p for p in space if p != passed.params]
    assert order.estimate_scale("llamacpp", [passed]) is None  # Q8_0 has no estimate: nothing to scale by
    assert order.next_point(open_points, [passed]) == _llamacpp("Q5_0")  # the fit's step
    estimates["Q8_0"] = 0.00025  # the estimates run at half the measured KLD
    assert order.estimate_scale("llamacpp", [passed]) == pytest.approx(2.0)
    assert order.next_point(open_points, [passed]) == _llamacpp("Q5_K_S")  # 0.028 after scaling; Q5_0 0.06
    assert order.predict(order.configuration_of(_llamacpp("Q4_0")), [passed]) == pytest.approx(0.14)
    failing = PrecisionOrder(base.configurations, base.gates, lambda c: 1 / 0)
    assert failing.next_point(open_points, [passed]) == _llamacpp("Q5_0")  # a failing estimate leaves the fit


def test_every_method_gets_its_turn(space, tiny_source):
    order = _order(space, tiny_source, "balanced")
    llama = _trial(order, 0, _llamacpp("Q8_0"), kld=0.002)
    vino = _trial(order, 1, {"backend": "openvino", "openvino.mode": "INT8_ASYM"}, kld=0.004)
    open_points = [p for p in space if p not in (llama.params, vino.params)]
    assert order.next_point(open_points, [llama, vino])["backend"] == "llamacpp"  # its latest trial is the older
    newer_llama = _trial(order, 2, _llamacpp("Q6_K"), kld=0.003)
    assert order.next_point(open_points, [llama, vino, newer_llama])["backend"] == "openvino"


def test_starting_points_follow_the_gates(space, tiny_source):
    declared = starting_points(BACKENDS)
    balanced = _order(space, tiny_source, "balanced")
    assert gated_starting_points(declared, balanced, balanced.gates) == declared
    strict = _order(space, tiny_source, "near-lossless")
    chosen = gated_starting_points(declared, strict, strict.gates)
    assert len(chosen) == len(BACKENDS) and [p["backend"] for p in chosen] == list(BACKENDS)
    assert all(strict.configuration_of(p).bits.bpw >= 8.0 for p in chosen)
    assert _llamacpp("Q8_0") in chosen
    loose = _order(space, tiny_source, "small")
    assert all(4.0 <= loose.configuration_of(p).bits.bpw < 5.0 for p in gated_starting_points(declared, loose,
                                                                                              loose.gates))


def test_a_near_lossless_search_starts_at_8_bits_and_logs_its_predictions(tiny_source, tmp_path, monkeypatch,
                                                                        tracking_uri):
    """A real llama.cpp-only search on the tiny model under near-lossless gates: it starts at Q8_0, every trial
    records its bits, no trial goes at or below bits whose method already failed the fidelity gates, and a trial
    of a method with evidence logs the mean KLD predicted for it and the prediction's error."""
    import dataclasses

    import mlflow

    from mlflow_edge.evaluation.harness import EvalSettings
    from mlflow_edge.search import SearchConfig, run_search

    settings = EvalSettings(window=64, windows=4, threads=2, repeats=2, prefill_tokens=64, prompt_tokens=16,
                            decode_tokens=8)
    result = run_search(SearchConfig(str(tiny_source.path), trials=4, objectives="min:size_mb",
                                     fidelity="near-lossless", gates="accuracy_retention>=0.5",
                                     settings=dataclasses.replace(settings), backends=["llamacpp"],
                                     registered_model="tiny-precision-edge", screen_windows=0))
    import optuna

    trials = optuna.load_study(study_name=result["study"], storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert trials[0].params == _llamacpp("Q8_0")
    failed_bits: dict[str, float] = {}
    for trial in trials:
        bits = trial.user_attrs[BITS_ATTR]
        assert bits["bpw"] > failed_bits.get(bits["method"], -1.0), (trial.number, bits, failed_bits)
        metrics = trial.user_attrs.get("metrics") or trial.user_attrs.get("screen")
        if metrics and not resolve_gates(None, "near-lossless").fidelity_passed(metrics):
            failed_bits[bits["method"]] = max(failed_bits.get(bits["method"], -1.0), bits["bpw"])
    runs = {r.data.tags["mlflow_edge.trial"]: r for r in mlflow.search_runs(
        experiment_names=["mlflow-edge"], filter_string="tags.`mlflow_edge.role` = 'candidate'", output_format="list")}
    assert all("search.nominal_bpw" in r.data.metrics for r in runs.values())
    predicted = [t for t in trials[1:] if "predicted_kld_mean" in t.user_attrs]
    assert predicted, "after the first trial, the next of its method is predicted"
    for trial in predicted:
        logged = runs[str(trial.number)].data.metrics
        assert logged["search.predicted_kld_mean"] == pytest.approx(trial.user_attrs["predicted_kld_mean"])
        measured = (trial.user_attrs.get("metrics") or trial.user_attrs["screen"])["kld_mean"]
        assert logged["search.kld_prediction_error"] == pytest.approx(math.log(measured / logged[
            "search.predicted_kld_mean"]))
