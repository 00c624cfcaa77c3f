"""The readiness report of a promotion, on a real sqlite store with real logged models (a tiny GGUF: no conversion)."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlflow_edge import readiness, registry, runs
from mlflow_edge.backends.base import Artifact
from mlflow_edge.gates import parse_gates
from mlflow_edge.tags import GATES_TAG

NAME = "tiny-edge"
STUDY = "study-1"
HARDWARE = {"hw.cpu_model": "Test CPU 9000", "hw.cpu_flags": "avx2,avx512", "hw.cores": "16", "hw.memory_gb": "64.0",
            "hw.accelerator": "none", "hw.os": "Linux-test"}
VERSIONS = {"version.llama_cpp_python": "0.0.1", "version.mlflow": mlflow.__version__}
DATA = {"eval.dataset": "wikitext-2", "eval.sha256": "e" * 64, "calib.dataset": "c4", "calib.sha256": "c" * 64}
REFERENCE = {"size_mb": 490.0, "perplexity": 10.0, "decode_tok_s": 20.0}
FIRST = {"size_mb": 140.0, "compression_ratio": 3.5, "accuracy_retention": 0.97, "speedup": 1.5, "latency_cv": 0.05,
         "perplexity": 10.3, "decode_tok_s": 30.0, "kld_mean": 0.0123}
SMALLER = {**FIRST, "size_mb": 100.0, "compression_ratio": 4.9}


def _run(role: str, study: str, metrics: dict[str, float], params: dict[str, str]) -> str:
    tags = {"mlflow_edge.role": role, "mlflow_edge.target": "cpu", "mlflow_edge.study": study, **HARDWARE, **VERSIONS}
    with mlflow.start_run(tags=tags) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
    return run.info.run_id


def _candidate(artifact: Artifact, metrics: dict[str, float], study: str = STUDY) -> str:
    run_id = _run("candidate", study, {}, {**runs.artifact_params(artifact, "cpu"), **DATA})
    with mlflow.start_run(run_id=run_id):
        runs.log_model_with_metrics(artifact, metrics)
        mlflow.set_tags(parse_gates(None).check(metrics).as_tags())  # evaluated, as the flows do
    return run_id


def _promote(policy: str = "min:size_mb") -> registry.Promotion:
    experiment = mlflow.get_experiment_by_name("edge")
    return registry.promote([experiment.experiment_id], "cpu", parse_gates(None), policy, NAME, STUDY)


def _run_report(run_id: str) -> dict:
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/readiness/readiness.json")


def test_promotion_describes_the_version_with_gates_comparison_hardware_and_serve_commands(tracking_uri, stub_gguf):
    mlflow.set_experiment("edge")
    reference_id = _run("reference", STUDY, REFERENCE, {"backend": "transformers"})
    _run("reference", "other-study", {**REFERENCE, "perplexity": 99.0}, {"backend": "transformers"})
    run_id = _candidate(stub_gguf, FIRST)

    promotion = _promote()

    client = MlflowClient()
    version = client.get_model_version(NAME, promotion.version)
    text = version.description
    for row in ("| accuracy_retention | 0.97 | ≥ 0.95 | pass |", "| speedup | 1.5 | ≥ 2 | fail |",
                "| compression_ratio | 3.5 | ≥ 2 | pass |", "| latency_cv | 0.05 | ≤ 0.1 | pass |"):
        assert row in text
    assert "| perplexity | - | lower | 10.3 | 10 | – |" in text and "| size_mb | MB | lower | 140 | 490 | – |" in text
    assert "| `hw.cpu_model` | Test CPU 9000 |" in text and f"| `eval.sha256` | {'e' * 64} |" in text
    for command in ("mlflow-edge serve models:/tiny-edge@cpu-champion --host 127.0.0.1 --port 8080",
                    "mlflow models serve -m models:/tiny-edge@cpu-champion --env-manager local",
                    "mlflow artifacts download -u models:/tiny-edge/1 -d tiny-edge-v1",
                    "llama-server -m tiny-edge-v1/model.gguf --host 127.0.0.1 --port 8080"):
        assert command in text
    assert parse_gates(version.tags[GATES_TAG]) == parse_gates(None)

    facts = _run_report(run_id)
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/readiness/readiness.md") == text
    assert facts["gates"]["spec"] == str(parse_gates(None)) and facts["gates"]["passed"] is True
    observed = [(g["metric"], g["value"], g["status"]) for group in facts["gates"]["groups"] for g in group["gates"]]
    assert observed == [("accuracy_retention", 0.97, "pass"), ("kld_mean", 0.0123, "pass"), ("speedup", 1.5, "fail"),
                        ("compression_ratio", 3.5, "pass"), ("latency_cv", 0.05, "pass")]
    assert facts["comparison"]["reference"] == {"run_id": reference_id}
    assert facts["comparison"]["previous_champion"] is None
    assert facts["hardware"] == HARDWARE and facts["data"] == DATA
    assert VERSIONS.items() <= facts["versions"].items()  # beside those the run context provider adds
    assert facts["source"] == {"source": "tiny", "source.sha256": "ab" * 32}


def test_second_promotion_names_the_previous_champion(tracking_uri, stub_gguf):
    mlflow.set_experiment("edge")
    _run("reference", STUDY, REFERENCE, {"backend": "transformers"})
    first_id = _candidate(stub_gguf, FIRST)
    assert _promote().version == "1"
    second_id = _candidate(stub_gguf, SMALLER)

    promotion = _promote()

    assert (promotion.version, promotion.run_id, promotion.kept_champion) == ("2", second_id, False)
    text = MlflowClient().get_model_version(NAME, "2").description
    assert "previous champion (version 1)" in text and "| size_mb | MB | lower | 100 | 490 | 140 |" in text
    assert _run_report(second_id)["comparison"]["previous_champion"] == {"version": "1", "run_id": first_id}


def test_a_failed_description_leaves_no_new_version_and_the_alias_in_place(tracking_uri, stub_gguf, monkeypatch):
    mlflow.set_experiment("edge")
    _candidate(stub_gguf, FIRST)
    _promote()
    second_id = _candidate(stub_gguf, SMALLER)

    def refuse(self, *args, **kwargs):
        raise MlflowException("description refused")

    monkeypatch.setattr(MlflowClient, "update_model_version", refuse)
    with pytest.raises(MlflowException, match="description refused"):
        _promote()

    client = MlflowClient()
    assert [str(v.version) for v in client.search_model_versions(f"name='{NAME}'")] == ["1"]
    assert str(client.get_model_version_by_alias(NAME, "cpu-champion").version) == "1"
    assert client.list_artifacts(second_id, "readiness") == []


def test_a_report_that_cannot_be_logged_keeps_the_promotion_and_warns_once(tracking_uri, stub_gguf, monkeypatch,
                                                                           capsys):
    mlflow.set_experiment("edge")
    run_id = _candidate(stub_gguf, FIRST)

    def refuse(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(MlflowClient, "log_dict", refuse)
    promotion = _promote()

    client = MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "cpu-champion").version) == promotion.version == "1"
    assert "## Gates: PASS 4/4" in client.get_model_version(NAME, "1").description
    warned = [line for line in capsys.readouterr().err.splitlines() if "readiness report" in line]
    assert len(warned) == 1 and "disk full" in warned[0] and run_id in warned[0]


def test_a_backend_without_a_server_of_its_own_gets_the_mlflow_servers_only():
    servers = readiness.serve_commands("my model", "3", "cpu-champion", "onnxruntime")
    assert [s["server"] for s in servers] == ["mlflow-edge (OpenAI-compatible)", "MLflow pyfunc (/invocations)"]
    assert servers[0]["commands"] == ["mlflow-edge serve 'models:/my model@cpu-champion' --host 127.0.0.1 --port 8080"]
    assert len(readiness.serve_commands("m", "1", "cpu-champion", "no-such-backend")) == 2


def test_a_long_report_is_cut_at_a_section_to_fit_the_registry():
    text = "# Title\n\nsummary\n\n## Gates\n\n" + "g" * 300 + "\n\n## Serve\n\n" + "s" * 300 + "\n"
    assert readiness.description(text, limit=1000) == text
    cut = readiness.description(text, limit=500)
    assert len(text) > 500 and len(cut) <= 500
    assert cut.startswith("# Title\n\nsummary\n\n## Gates") and "## Serve" not in cut
    assert cut.rstrip().endswith("the full report is the run artifact `readiness/readiness.md`.*")


def test_of_two_candidates_of_the_same_bytes_the_more_faithful_faster_one_is_promoted(tracking_uri, stub_gguf):
    mlflow.set_experiment("edge")
    plain = _candidate(stub_gguf, {**FIRST, "kld_mean": 0.031, "decode_tok_s": 85.6})
    twin = _candidate(stub_gguf, {**FIRST, "kld_mean": 0.012, "decode_tok_s": 107.7})
    dominated = _candidate(stub_gguf, {**FIRST, "size_mb": 150.0, "kld_mean": 0.04, "decode_tok_s": 80.0,
                                       "accuracy_retention": 0.96})
    promotion = _promote("min:size_mb")
    assert promotion.run_id == twin and not promotion.kept_champion and twin not in (plain, dominated)
    again = _promote("max:fidelity")  # the most faithful is the same candidate: the champion stays
    assert again.kept_champion and again.run_id == twin and again.version == promotion.version
    choice = _run_report(twin)["choice"]
    assert choice["dominated_by"] == [] and choice["feasible"] == 3 and choice["front"] == 1
    best = {row["metric"]: row["best_run_id"] for row in choice["best_by_objective"]}
    assert best == {"kld_mean": twin, "accuracy_retention": twin, "decode_tok_s": twin, "size_mb": twin}
    text = MlflowClient().get_model_version(NAME, promotion.version).description
    assert "## Why this candidate" in text and "No feasible candidate dominates it" in text
    assert ("Chosen by `min:size_mb` among 3 feasible candidate(s), 1 of them on the feasible Pareto front; 2 tied on "
            "it, broken by kld_mean, accuracy_retention, decode_tok_s." in text)


def test_a_champion_tied_on_the_policy_gives_way_to_a_candidate_that_dominates_it(tracking_uri, stub_gguf):
    mlflow.set_experiment("edge")
    first = _candidate(stub_gguf, {**FIRST, "kld_mean": 0.031})
    assert _promote().run_id == first
    kept = _promote()
    assert kept.kept_champion and kept.version == "1"  # promoting the same runs again changes nothing
    better = _candidate(stub_gguf, {**FIRST, "kld_mean": 0.012})
    promotion = _promote()
    assert not promotion.kept_champion and promotion.run_id == better and promotion.version == "2"
    choice = _run_report(better)["choice"]
    assert choice["tied"] == 2 and choice["ties_broken_by"][0] == "kld_mean"
