"""The flows end to end through the CLI, on the tiny model, real llama.cpp and a real sqlite MLflow store."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from mlflow_edge.cli import main
from mlflow_edge.metrics import ARTIFACT_METRICS as METRICS
from mlflow_edge.targets import HW_KEYS

FAST_EVAL = ["--window", "64", "--windows", "2", "--repeats", "2", "--threads", "2"]
LOOSE_GATES = ["--gates", "accuracy_retention>=0.9,speedup>=2.0|compression_ratio>=2.0"]
MODEL_NAME = "tiny-edge"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("mlflow-edge: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def runs(experiment: str = "mlflow-edge") -> pd.DataFrame:
    return mlflow.search_runs(experiment_names=[experiment])


def run_sweep(tiny_source, *extra: str):
    return invoke("sweep", "--model", str(tiny_source.path), "--registered-model", MODEL_NAME, *FAST_EVAL, *extra)


@pytest.fixture(scope="module")
def studied(tmp_path_factory, tiny_source, use_sqlite_store):
    """One store shared by this module's study tests, after one sweep in which Q4_K_M and Q8_0 pass and an
    unknown type fails on its own. Yields the parent run id."""
    with pytest.MonkeyPatch.context() as patch:
        use_sqlite_store(tmp_path_factory.mktemp("study-store"), patch)
        result = run_sweep(tiny_source, "--types", "Q4_K_M,Q9_X,Q8_0", *LOOSE_GATES)
        assert result.exit_code == 0, result.output
        studies = runs()
        yield studies[studies["tags.mlflow_edge.role"] == "study"].iloc[0]["run_id"]
        mlflow.end_run()


def test_sweep_leaves_parent_nested_runs_report_and_champion(studied):
    table = runs()
    parent = table[table["run_id"] == studied]
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FINISHED"
    parent_id = studied
    children = table[table["tags.mlflow.parentRunId"] == parent_id]
    assert sorted(children["tags.mlflow_edge.role"]) == ["candidate", "candidate", "candidate", "reference"]

    failed = children[children["status"] == "FAILED"]
    assert len(failed) == 1 and "Q9_X" in failed.iloc[0]["tags.mlflow_edge.error"]

    done = children[(children["status"] == "FINISHED") & (children["tags.mlflow_edge.role"] == "candidate")]
    assert sorted(done["params.precision"]) == ["Q4_K_M", "Q8_0"]
    for _, row in done.iterrows():
        for metric in METRICS:
            assert pd.notna(row[f"metrics.{metric}"]), metric
        for key in HW_KEYS + ("mlflow_edge.target", "mlflow_edge.study", "version.llama_cpp_python"):
            assert row[f"tags.{key}"], key
        assert row["tags.mlflow_edge.study"] == parent_id
        for param in ("backend", "format", "target", "eval.dataset", "eval.window", "eval.windows", "eval.threads",
                      "eval.repeats", "eval.sha256"):
            assert row[f"params.{param}"], param
        assert row["params.format"] == "gguf" and row["params.backend"] == "llamacpp"

    reference = children[children["tags.mlflow_edge.role"] == "reference"].iloc[0]
    assert reference["metrics.accuracy_retention"] == 1.0
    q8 = done[done["params.precision"] == "Q8_0"].iloc[0]
    q4 = done[done["params.precision"] == "Q4_K_M"].iloc[0]
    assert q4["metrics.size_mb"] < q8["metrics.size_mb"] < reference["metrics.size_mb"]
    assert q8["metrics.compression_ratio"] == pytest.approx(reference["metrics.size_mb"] / q8["metrics.size_mb"])

    client = MlflowClient()
    report = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert report == {"report/comparison.csv", "report/comparison.html", "report/tradeoffs.png"}
    csv = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path="report/comparison.csv"))
    assert list(csv["name"]) == ["reference", "Q4_K_M", "Q8_0"]

    champion = client.get_model_version_by_alias(MODEL_NAME, "cpu-champion")
    assert champion.tags["precision"] == "Q4_K_M"  # min:size_mb among the feasible ones
    assert champion.tags["mlflow_edge.target"] == "cpu" and champion.tags["backend"] == "llamacpp"
    assert champion.tags["gates.result"] == "pass"
    assert champion.tags["mlflow_edge.study"] == parent_id


def test_logged_models_carry_metrics_and_load_as_pyfunc(studied):
    candidates = runs()
    candidate = candidates[(candidates["params.precision"] == "Q8_0") & (candidates["status"] == "FINISHED")].iloc[0]
    model_uri = candidate["tags.mlflow_edge.model_uri"]
    logged = mlflow.get_logged_model(model_uri.split("/")[-1])
    assert {m.key for m in logged.metrics} >= set(METRICS)
    model = mlflow.pyfunc.load_model(model_uri)
    assert len(model.predict(["Hello"], params={"max_tokens": 4})) == 1


def test_better_champion_is_kept(studied, tiny_source):
    client = MlflowClient()
    before = client.get_model_version_by_alias(MODEL_NAME, "cpu-champion").version
    result = run_sweep(tiny_source, "--types", "Q8_0", *LOOSE_GATES)
    assert result.exit_code == 0, result.output
    assert "kept" in result.output
    assert client.get_model_version_by_alias(MODEL_NAME, "cpu-champion").version == before
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 1
    studies = runs()
    assert studies[studies["tags.mlflow_edge.role"] == "study"]["status"].eq("FINISHED").all()


def test_no_feasible_candidate_registers_nothing_and_fails_the_run(studied, tiny_source):
    client = MlflowClient()
    before = client.get_model_version_by_alias(MODEL_NAME, "cpu-champion").version
    result = run_sweep(tiny_source, "--types", "Q2_K", "--gates", "accuracy_retention>=1.5")
    assert result.exit_code == 1
    assert "passed the gates" in one_line_error(result)
    studies = runs()
    latest = studies[studies["tags.mlflow_edge.role"] == "study"].sort_values("start_time").iloc[-1]
    assert latest["status"] == "FAILED"
    assert "passed the gates" in latest["tags.mlflow_edge.error"]
    assert client.get_model_version_by_alias(MODEL_NAME, "cpu-champion").version == before
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 1


def test_promote_command_uses_the_experiment(studied):
    result = invoke("promote", "--registered-model", "other-edge", "--policy", "max:accuracy_retention",
                    "--study", studied, *LOOSE_GATES)
    assert result.exit_code == 0, result.output
    champion = MlflowClient().get_model_version_by_alias("other-edge", "cpu-champion")
    assert champion.tags["precision"] in {"Q4_K_M", "Q8_0"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["main", "--model", "./no/such/model"], "model path not found: ./no/such/model"),
        (["main", "--model", "demo", "--target", "mars-cpu"], "unknown target 'mars-cpu'"),
        (["main", "--model", "demo", "--gates", "size_mb=>3"], "operator"),
        (["main", "--model", "demo", "--policy", "max:vibes"], "bad promotion policy"),
        (["quantize", "--model", "./missing.gguf", "--precision", "Q4_K_M"], "GGUF file not found"),
    ],
)
def test_bad_input_is_one_line_and_registers_nothing(tracking_uri, args, message):
    result = invoke(*args)
    assert result.exit_code == 1
    assert message in one_line_error(result)
    assert MlflowClient().search_registered_models() == []
    table = runs() if mlflow.get_experiment_by_name("mlflow-edge") else pd.DataFrame()
    if not table.empty:  # a run that was started ends FAILED with the reason
        assert set(table["status"]) == {"FAILED"}
        assert all(message.split(":")[0] in reason for reason in table["tags.mlflow_edge.error"])


def test_corrupt_gguf_source_fails_the_run(tracking_uri, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    result = invoke("convert", "--model", str(junk))
    assert result.exit_code == 1
    assert "not a valid GGUF file" in one_line_error(result)
    run = runs().iloc[0]
    assert run["status"] == "FAILED" and "not a valid GGUF file" in run["tags.mlflow_edge.error"]


def test_quantize_errors_fail_the_run_without_a_model(tracking_uri, tiny_source):
    for precision, message in (("Q9_X", "unknown GGUF quantization type 'Q9_X'"), ("IQ2_XS", "importance matrix")):
        result = invoke("quantize", "--model", str(tiny_source.path), "--precision", precision)
        assert result.exit_code == 1
        assert message in one_line_error(result)
    table = runs()
    assert set(table["status"]) == {"FAILED"}
    assert "tags.mlflow_edge.model_uri" not in table or table["tags.mlflow_edge.model_uri"].isna().all()


def test_unwritable_output_folder_is_refused_before_work(tracking_uri, tiny_source, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = invoke("convert", "--model", str(tiny_source.path), "--output-dir", str(blocker / "out"))
    assert result.exit_code == 1
    assert "output folder is not writable" in one_line_error(result)


def test_convert_quantize_evaluate_commands(tracking_uri, tiny_source, tmp_path):
    out = tmp_path / "out"
    converted = invoke("convert", "--model", str(tiny_source.path), "--precision", "q8_0", "--output-dir", str(out))
    assert converted.exit_code == 0, converted.output
    assert converted.stdout.strip().startswith("models:/")
    assert [p.suffix for p in out.iterdir()] == [".gguf"]

    quantized = invoke("quantize", "--model", str(tiny_source.path), "--precision", "Q4_K_M",
                       "--options", "llamacpp.imatrix=true,imatrix_chunks=1")
    assert quantized.exit_code == 0, quantized.output
    model_uri = quantized.stdout.strip().splitlines()[-1]
    run = runs().sort_values("start_time").iloc[-1]  # no nested runs here
    assert run["params.llamacpp.imatrix"] == "True" and run["params.calib.sha256"]

    evaluated = invoke("evaluate", "--model", str(tiny_source.path), "--artifact", model_uri, *FAST_EVAL)
    assert evaluated.exit_code == 0, evaluated.output
    printed = dict(line.split("\t") for line in evaluated.stdout.strip().splitlines())
    assert set(printed) == set(METRICS)
    table = runs()
    evaluation = table[(table["tags.mlflow_edge.role"] == "candidate") & table["metrics.kld_mean"].notna()]
    assert len(evaluation) == 1 and evaluation.iloc[0]["params.precision"] == "Q4_K_M"
    assert evaluation.iloc[0]["metrics.perplexity"] == pytest.approx(float(printed["perplexity"]))


def test_quant_types_lists_every_llama_cpp_type():
    result = invoke("quant-types")
    assert result.exit_code == 0
    listed = result.stdout.split("quantize: ")[1].split("\n")[0].split()
    assert {"Q2_K", "Q4_K_M", "Q8_0", "IQ2_XS", "IQ4_NL"} <= set(listed)
    assert "llamacpp.imatrix" in result.stdout
