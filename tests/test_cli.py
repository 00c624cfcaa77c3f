"""CLI helpers: option parsing and one-line errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mlflow_edge.cli import main, parse_options
from mlflow_edge.errors import EdgeError


def test_parse_options_strips_the_backend_prefix():
    assert parse_options("llamacpp.imatrix=true, pure=false,output_tensor_type=Q8_0") == {
        "imatrix": "true", "pure": "false", "output_tensor_type": "Q8_0"}
    assert parse_options("") == {} and parse_options(None) == {}


def test_an_option_value_may_hold_commas():
    assert parse_options("llamacpp.recipe_types=Q4_K,Q6_K , Q8_0,imatrix=true,target_bpw=4.5") == {
        "recipe_types": "Q4_K,Q6_K , Q8_0", "imatrix": "true", "target_bpw": "4.5"}
    assert parse_options("imatrix=true,b") == {"imatrix": "true,b"}  # the backend refuses that value


@pytest.mark.parametrize("spec", ["imatrix", "=true", "=true,a=1", " , imatrix"])
def test_parse_options_refuses_items_without_a_value(spec):
    with pytest.raises(EdgeError, match="key=value"):
        parse_options(spec)


def test_help_lists_every_entry_point():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("convert", "quantize", "evaluate", "promote", "main", "search", "sweep", "targets", "quant-types"):
        assert command in result.output


def test_unknown_backend_is_one_line():
    result = CliRunner().invoke(main, ["quant-types", "--backend", "tensorrt"])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("mlflow-edge: error: unknown backend 'tensorrt' (choose from llamacpp")


def test_targets_lists_the_matrix_and_what_is_measurable_here():
    result = CliRunner().invoke(main, ["targets"])
    assert result.exit_code == 0
    rows = [line for line in result.stdout.strip().splitlines()[1:] if not line.startswith("not yet available")]
    lines = {line.split()[0]: line.split() for line in rows}
    assert set(lines) == {"intel-cpu", "intel-gpu", "intel-npu", "nvidia-gpu", "apple-silicon", "arm-cpu",
                          "arm-mobile", "cpu"}
    assert lines["cpu"][1] == "True"
    assert "llamacpp" in lines["cpu"]  # installed here


def test_targets_for_one_target():
    result = CliRunner().invoke(main, ["targets", "--target", "arm-cpu"])
    assert result.exit_code == 0
    assert "llamacpp > openvino" in result.stdout
    bad = CliRunner().invoke(main, ["targets", "--target", "mars"])
    assert bad.exit_code == 1 and "unknown target 'mars'" in bad.stderr


def test_targets_for_a_model_lists_the_backends_that_convert_it(tiny_source):
    result = CliRunner().invoke(main, ["targets", "--target", "cpu", "--model", str(tiny_source.path)])
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()[:2]
    assert f"for {tiny_source.name}" in header and "llamacpp" in row


@pytest.mark.parametrize("command", [["promote", "--registered-model", "x"], ["convert", "--model", "demo"],
                                     ["monitor", "--url", "http://127.0.0.1:1"]])
def test_an_unreachable_tracking_server_is_one_line_within_seconds(monkeypatch, command):
    import time

    import mlflow

    unreachable = "http://user:s3cret@127.0.0.1:1"  # nothing listens on port 1
    monkeypatch.setenv("MLFLOW_TRACKING_URI", unreachable)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(unreachable)
    started = time.monotonic()
    try:
        result = CliRunner().invoke(main, command)
    finally:
        mlflow.set_tracking_uri(previous)
    assert result.exit_code == 1 and time.monotonic() - started < 20
    assert result.stderr.strip() == ("mlflow-edge: error: cannot reach the MLflow tracking server at "
                                     "http://127.0.0.1:1: [Errno 111] Connection refused")
