"""Quality gates: parsing, defaults, OR groups, missing/NaN metrics, bad specs, and valid MLflow tag keys."""

from __future__ import annotations

import math

import mlflow
import pytest

from mlflow_edge.errors import EdgeError
from mlflow_edge.gates import DEFAULT_GATES, Gate, GateGroup, Gates, parse_gates
from mlflow_edge.metrics import METRICS

GOOD = {"accuracy_retention": 0.97, "speedup": 2.4, "compression_ratio": 1.1, "latency_cv": 0.03, "kld_mean": 0.02}


def test_parse_single_gate() -> None:
    assert Gate.parse("accuracy_retention>=0.95") == Gate("accuracy_retention", ">=", 0.95)
    assert Gate.parse(" size_mb <= 100 ") == Gate("size_mb", "<=", 100.0)
    assert Gate.parse("latency_cv≤0.1") == Gate("latency_cv", "<=", 0.1)


def test_none_gives_the_defaults() -> None:
    gates = parse_gates(None)
    assert gates is DEFAULT_GATES
    spec = "accuracy_retention>=0.95,kld_mean<=0.05,speedup>=2.0|compression_ratio>=2.0,latency_cv<=0.1"
    assert str(gates) == spec
    assert parse_gates(spec.replace("0.1", "0.10")) == gates
    assert gates.metrics == ("accuracy_retention", "kld_mean", "speedup", "compression_ratio", "latency_cv")


@pytest.mark.parametrize(
    "spec",
    [
        "accuracy_retention>=0.95",
        "size_mb<=100.0,perplexity<=12.5",
        "speedup>=2.0|compression_ratio>=2.0,kld_mean<=1e-05",
    ],
)
def test_str_round_trips(spec: str) -> None:
    gates = parse_gates(spec)
    assert str(gates) == spec
    assert parse_gates(str(gates)) == gates


def test_sequence_is_anded() -> None:
    gates = parse_gates(["accuracy_retention>=0.95", "speedup>=2.0|compression_ratio>=2.0"])
    assert gates == parse_gates("accuracy_retention>=0.95,speedup>=2.0|compression_ratio>=2.0")
    assert len(gates.groups) == 2 and len(gates.groups[1].gates) == 2
    assert parse_gates(gates) is gates


def test_defaults_pass_and_fail() -> None:
    report = DEFAULT_GATES.check(GOOD)
    assert report.passed
    assert report.values == GOOD
    assert report.as_tags() == {
        "gate.accuracy_retention_ge_0.95": "pass",
        "gate.kld_mean_le_0.05": "pass",
        "gate.speedup_ge_2.0_or_compression_ratio_ge_2.0": "pass",
        "gate.latency_cv_le_0.1": "pass",
        "gates.spec": str(DEFAULT_GATES),
        "gates.result": "pass",
    }
    report = DEFAULT_GATES.check({**GOOD, "latency_cv": 0.2})
    assert not report.passed
    assert [g.status for g in report.groups] == ["pass", "pass", "pass", "fail"]
    assert report.describe().startswith("FAIL 3/4: ") and "latency_cv=0.2" in report.describe()


def test_or_group_passes_on_either_gate() -> None:
    gates = parse_gates("speedup>=2.0|compression_ratio>=2.0")
    assert gates.check({"speedup": 2.5, "compression_ratio": 1.0}).passed
    assert gates.check({"speedup": 1.0, "compression_ratio": 3.0}).passed
    assert gates.check({"speedup": 2.0, "compression_ratio": 2.0}).passed  # thresholds are inclusive
    assert not gates.check({"speedup": 1.9, "compression_ratio": 1.9}).passed
    # one gate passing is enough even when the other metric is missing
    assert gates.check({"compression_ratio": 3.0}).passed


@pytest.mark.parametrize("bad", [None, math.nan, "n/a"])
def test_missing_or_nan_fails_as_missing(bad: object) -> None:
    metrics = {**GOOD, "accuracy_retention": bad}
    report = DEFAULT_GATES.check(metrics)
    assert not report.passed
    assert report.groups[0].status == "missing"
    assert report.values["accuracy_retention"] is None
    assert report.as_tags()["gate.accuracy_retention_ge_0.95"] == "missing"
    assert "accuracy_retention=missing" in report.describe()
    absent = DEFAULT_GATES.check({k: v for k, v in GOOD.items() if k != "latency_cv"})
    assert not absent.passed and absent.as_tags()["gate.latency_cv_le_0.1"] == "missing"


def test_describe_is_one_line() -> None:
    line = DEFAULT_GATES.check({}).describe()
    assert "\n" not in line and line.startswith("FAIL 0/4")


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ([], "no gates"),
        ("size_mb<10", "unknown operator"),
        ("size_mb==10", "unknown operator"),
        ("size_mb=>10", "unknown operator"),
        ("size_mb>=ten", "not a number"),
        ("size_mb>=", "not a number"),
        ("size_mb>=nan", "finite"),
        ("accuracy>=0.9", "unknown metric 'accuracy'"),
        ("size_mb 10", "cannot read"),
        ("size_mb<=10,,speedup>=2", "empty gate group"),
        ("speedup>=2|", "empty gate"),
        ("size_mb<=10,size_mb>=20", "contradictory"),
        (["size_mb>=20", "speedup>=2|compression_ratio>=2", "size_mb<=10"], "contradictory"),
    ],
)
def test_bad_specs_raise_one_line(spec: object, words: str) -> None:
    with pytest.raises(EdgeError, match=words) as info:
        parse_gates(spec)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_consistent_bounds_are_fine() -> None:
    assert parse_gates("size_mb>=10,size_mb<=10").check({"size_mb": 10}).passed
    assert parse_gates("size_mb>=10,size_mb>=20").check({"size_mb": 25}).passed
    # bounds inside OR groups are alternatives, not contradictions
    parse_gates("size_mb<=10|speedup>=2,size_mb>=20|speedup>=2")


def test_gate_constructor_validates() -> None:
    with pytest.raises(EdgeError, match="unknown metric"):
        Gate("bogus", ">=", 1.0)
    with pytest.raises(EdgeError, match="unknown operator"):
        Gate("size_mb", "<", 1.0)
    with pytest.raises(EdgeError, match="no gates"):
        Gates(())
    assert str(GateGroup((Gate("speedup", ">=", 2.0),))) == "speedup>=2.0"


def test_every_conventions_metric_can_be_gated() -> None:
    for metric in METRICS:
        assert parse_gates(f"{metric}>=0").metrics == (metric,)


def test_tags_are_valid_mlflow_tag_keys(tracking_uri: str) -> None:
    report = parse_gates("accuracy_retention>=0.95,speedup>=2.0|compression_ratio>=2.0,kld_mean<=1e-05").check(GOOD)
    with mlflow.start_run() as run:
        mlflow.set_tags(report.as_tags())
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["gate.speedup_ge_2.0_or_compression_ratio_ge_2.0"] == "pass"
    assert tags["gate.kld_mean_le_1e-05"] == "fail"
    assert parse_gates(tags["gates.spec"]) == report.gates


def test_violations_are_zero_for_passing_groups_and_relative_shortfalls_otherwise() -> None:
    gates = parse_gates("accuracy_retention>=0.9,speedup>=2.0|compression_ratio>=2.0")
    keys = [g.tag_key() for g in gates.groups]
    assert gates.violations({"accuracy_retention": 0.95, "speedup": 1.0, "compression_ratio": 3.0}) == {
        keys[0]: 0.0, keys[1]: 0.0}
    low = gates.violations({"accuracy_retention": 0.45, "speedup": 1.0, "compression_ratio": 1.5})
    assert low[keys[0]] == pytest.approx(0.5) and low[keys[1]] == pytest.approx(0.25)
    assert gates.violations({"speedup": 3.0})[keys[0]] == 1e6


def test_certain_failures_need_every_gate_of_a_group_known_and_missed_beyond_the_margin() -> None:
    gates = parse_gates("accuracy_retention>=0.95,speedup>=2.0|compression_ratio>=2.0")
    early = {"accuracy_retention": 0.90, "compression_ratio": 1.5}  # speedup not measured yet
    failed = gates.certain_failures(early)
    assert [str(g.group) for g in failed] == ["accuracy_retention>=0.95"]
    assert gates.certain_failures(early, margin=0.06) == []  # 0.90 misses 0.95 by 5.3 %
    assert gates.certain_failures({"accuracy_retention": 0.97}) == []
    assert gates.certain_failures({}) == []


def test_restricted_to_keeps_the_measurable_gates() -> None:
    from mlflow_edge.metrics import ACCURACY_SIZE_METRICS

    kept, dropped = DEFAULT_GATES.restricted_to(ACCURACY_SIZE_METRICS)
    assert str(kept) == "accuracy_retention>=0.95,kld_mean<=0.05,compression_ratio>=2.0"
    assert dropped == ["speedup>=2.0", "latency_cv<=0.1"]
    assert parse_gates("speedup>=2.0").restricted_to(ACCURACY_SIZE_METRICS) == (None, ["speedup>=2.0"])


def test_default_gates_carry_a_distribution_level_gate() -> None:
    faithful_by_perplexity_only = {**GOOD, "accuracy_retention": 1.007, "kld_mean": 0.061}  # issue #19's Q4_1
    report = DEFAULT_GATES.check(faithful_by_perplexity_only)
    assert not report.passed
    assert "kld_mean<=0.05 fail (kld_mean=0.061)" in report.describe()


def test_fidelity_presets_replace_only_the_fidelity_groups() -> None:
    from mlflow_edge.gates import FIDELITY_PRESETS, default_gates, resolve_gates

    assert str(resolve_gates(None)) == str(DEFAULT_GATES) == str(default_gates("balanced"))
    assert str(resolve_gates(None, "near-lossless")).startswith("accuracy_retention>=0.99,kld_mean<=0.01,speedup")
    mixed = resolve_gates("top1_agreement>=0.9,size_mb<=100|compression_ratio>=3", "small")
    assert str(mixed) == "accuracy_retention>=0.9,kld_mean<=0.15,size_mb<=100.0|compression_ratio>=3.0"
    assert str(resolve_gates("size_mb<=100")) == "size_mb<=100.0"  # no preset named: the spec as given
    thresholds = [parse_gates(FIDELITY_PRESETS[name]) for name in ("near-lossless", "balanced", "small")]
    kld = [next(g.threshold for group in t.groups for g in group.gates if g.metric == "kld_mean") for t in thresholds]
    assert kld == sorted(kld)  # each preset admits more distribution shift than the one before
    with pytest.raises(EdgeError, match="unknown fidelity 'lossy'.*near-lossless, balanced, small"):
        resolve_gates(None, "lossy")


def test_gate_confidence_decides_on_the_pessimistic_bound() -> None:
    from mlflow_edge.gates import resolve_gates

    near_the_gate = {**GOOD, "accuracy_retention": 0.953, "accuracy_retention_lo": 0.941,
                     "accuracy_retention_hi": 0.966, "kld_mean_lo": 0.01, "kld_mean_hi": 0.03}
    assert DEFAULT_GATES.check(near_the_gate).passed  # the point value passes
    bounded = resolve_gates(None, confidence=0.95)
    report = bounded.check(near_the_gate)
    assert not report.passed  # its lower bound does not
    assert report.as_tags()["gate.accuracy_retention_lo_ge_0.95"] == "fail"  # the tag says it was a bound
    assert report.as_tags()["gate.kld_mean_hi_le_0.05"] == "pass"
    with pytest.raises(EdgeError, match="gate confidence"):
        resolve_gates(None, confidence=1.5)


def test_screening_prunes_only_when_the_optimistic_bound_fails() -> None:
    unlucky_first_windows = {"accuracy_retention": 0.90, "accuracy_retention_lo": 0.80, "accuracy_retention_hi": 0.97}
    assert DEFAULT_GATES.certain_failures(unlucky_first_windows, margin=0.0) == []  # it may still pass
    hopeless = {**unlucky_first_windows, "accuracy_retention_hi": 0.91}
    assert [str(g.group) for g in DEFAULT_GATES.certain_failures(hopeless)] == ["accuracy_retention>=0.95"]
    one_window = {"kld_mean": 0.5, "kld_mean_lo": float("nan"), "kld_mean_hi": float("nan")}
    assert DEFAULT_GATES.certain_failures(one_window) == []  # no interval from one window: undecided
    shifted = {"kld_mean": 0.5, "kld_mean_lo": 0.3, "kld_mean_hi": 0.7}
    bounded = DEFAULT_GATES.on_bounds()
    assert [str(g.group) for g in bounded.certain_failures(shifted)] == ["kld_mean_hi<=0.05"]
