"""Quality gates: parsing, defaults, OR groups, missing/NaN metrics, bad specs, and valid MLflow tag keys."""

from __future__ import annotations

import math

import mlflow
import pytest

from mlflow_edge.errors import EdgeError
from mlflow_edge.gates import DEFAULT_GATES, Gate, GateGroup, Gates, parse_gates
from mlflow_edge.metrics import METRICS

GOOD = {"accuracy_retention": 0.97, "speedup": 2.4, "compression_ratio": 1.1, "latency_cv": 0.03}


def test_parse_single_gate() -> None:
    assert Gate.parse("accuracy_retention>=0.95") == Gate("accuracy_retention", ">=", 0.95)
    assert Gate.parse(" size_mb <= 100 ") == Gate("size_mb", "<=", 100.0)
    assert Gate.parse("latency_cv≤0.1") == Gate("latency_cv", "<=", 0.1)


def test_none_gives_the_defaults() -> None:
    gates = parse_gates(None)
    assert gates is DEFAULT_GATES
    assert str(gates) == "accuracy_retention>=0.95,speedup>=2.0|compression_ratio>=2.0,latency_cv<=0.1"
    assert parse_gates("accuracy_retention>=0.95,speedup>=2.0|compression_ratio>=2.0,latency_cv<=0.10") == gates
    assert gates.metrics == ("accuracy_retention", "speedup", "compression_ratio", "latency_cv")


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
        "gate.speedup_ge_2.0_or_compression_ratio_ge_2.0": "pass",
        "gate.latency_cv_le_0.1": "pass",
        "gates.spec": str(DEFAULT_GATES),
        "gates.result": "pass",
    }
    report = DEFAULT_GATES.check({**GOOD, "latency_cv": 0.2})
    assert not report.passed
    assert [g.status for g in report.groups] == ["pass", "pass", "fail"]
    assert report.describe().startswith("FAIL 2/3: ") and "latency_cv=0.2" in report.describe()


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
    assert "\n" not in line and line.startswith("FAIL 0/3")


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
    assert tags["gate.kld_mean_le_1e-05"] == "missing"
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
    assert str(kept) == "accuracy_retention>=0.95,compression_ratio>=2.0"
    assert dropped == ["speedup>=2.0", "latency_cv<=0.1"]
    assert parse_gates("speedup>=2.0").restricted_to(ACCURACY_SIZE_METRICS) == (None, ["speedup>=2.0"])
