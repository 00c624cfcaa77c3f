"""The harness on real runtimes: the tiny Llama in transformers (reference) and in llama.cpp (candidates)."""

from __future__ import annotations

import dataclasses

import pytest

from mlflow_edge import artifacts
from mlflow_edge.backends.base import Artifact
from mlflow_edge.errors import EdgeError
from mlflow_edge.evaluation.harness import EvalSettings, Evaluator, relative_metrics
from mlflow_edge.metrics import ARTIFACT_METRICS


@pytest.fixture(scope="module")
def evaluated(tiny_source):
    settings = EvalSettings(window=64, windows=2, threads=2, repeats=2, prefill_tokens=64, prompt_tokens=16,
                            decode_tokens=8)
    evaluator = Evaluator(tiny_source, settings)
    base = artifacts.convert(tiny_source, "llamacpp", "f16")
    quantized = {q: artifacts.quantize(tiny_source, base, q) for q in ("Q2_K", "Q8_0")}
    reference = evaluator.evaluate_reference()
    results = {q: evaluator.evaluate(a, base) for q, a in quantized.items()}
    yield evaluator, reference, quantized, results
    evaluator.close()


def test_every_conventions_metric_is_measured(evaluated):
    _, reference, _, results = evaluated
    for metrics in (reference, *results.values()):
        assert set(ARTIFACT_METRICS) <= set(metrics)
        assert all(v == v for v in metrics.values())  # no NaN


def test_reference_ratios_are_identities(evaluated):
    _, reference, _, _ = evaluated
    assert reference["compression_ratio"] == 1.0 and reference["accuracy_retention"] == 1.0
    assert reference["speedup"] == 1.0 and reference["memory_reduction"] == 0.0
    assert reference["kld_mean"] == 0.0 and reference["top1_agreement"] == 1.0
    assert reference["bits_per_weight"] == pytest.approx(32.0, rel=0.01)  # fp32 safetensors


def test_lower_precision_diverges_more(evaluated):
    _, _, _, results = evaluated
    assert results["Q2_K"]["kld_mean"] > results["Q8_0"]["kld_mean"] > 0
    assert results["Q2_K"]["top1_agreement"] <= results["Q8_0"]["top1_agreement"]
    assert results["Q2_K"]["size_mb"] < results["Q8_0"]["size_mb"]
    expected_bits = 8 * results["Q8_0"]["size_mb"] * 1e6 / 13763840
    assert results["Q8_0"]["bits_per_weight"] == pytest.approx(expected_bits, rel=1e-6)


def test_ratios_follow_their_definitions(evaluated):
    evaluator, reference, _, results = evaluated
    metrics = results["Q8_0"]
    assert metrics["compression_ratio"] == pytest.approx(reference["size_mb"] / metrics["size_mb"])
    assert metrics["accuracy_retention"] == pytest.approx(reference["perplexity"] / metrics["perplexity"])
    assert metrics["speedup"] == pytest.approx(metrics["decode_tok_s"] / reference["decode_tok_s"])
    assert metrics["memory_reduction"] == pytest.approx(1 - metrics["peak_rss_mb"] / reference["peak_rss_mb"])
    assert relative_metrics(metrics, reference)["speedup"] == pytest.approx(metrics["speedup"])
    base_decode = evaluator.base_decode_tok_s(artifacts.convert(evaluator.source, "llamacpp", "f16"))
    assert metrics["speedup_vs_base"] == pytest.approx(metrics["decode_tok_s"] / base_decode)


def test_fidelity_comes_with_paired_intervals(evaluated):
    _, reference, _, results = evaluated
    assert reference["accuracy_retention_lo"] == reference["accuracy_retention_hi"] == 1.0
    for metrics in results.values():
        assert metrics["accuracy_retention_lo"] <= metrics["accuracy_retention"] <= metrics["accuracy_retention_hi"]
        assert 0 <= metrics["kld_mean_lo"] <= metrics["kld_mean"] <= metrics["kld_mean_hi"]
    assert results["Q2_K"]["kld_mean_lo"] > results["Q8_0"]["kld_mean_hi"]  # far apart: the intervals say so


def test_memory_is_measured_per_process(evaluated):
    _, reference, _, results = evaluated
    # torch + an fp32 model in the reference process; a small GGUF in llama.cpp's: separate processes, separate peaks
    assert 0 < results["Q2_K"]["peak_rss_mb"] < reference["peak_rss_mb"]
    assert results["Q2_K"]["latency_ms_p50"] <= results["Q2_K"]["latency_ms_p95"]


def test_same_artifact_same_accuracy(evaluated):
    evaluator, _, quantized, results = evaluated
    again = evaluator.evaluate(quantized["Q8_0"])
    for metric in ("perplexity", "kld_mean", "kld_p99", "top1_agreement", "size_mb"):
        assert again[metric] == results["Q8_0"][metric], metric


def test_broken_artifact_fails_with_one_line(evaluated, tmp_path):
    evaluator, _, quantized, _ = evaluated
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\0" * 4096)
    broken = dataclasses.replace(quantized["Q8_0"], path=junk, files=(junk,))
    with pytest.raises(EdgeError, match="evaluation failed: llama.cpp cannot load") as info:
        evaluator.evaluate(broken)
    assert "\n" not in str(info.value)


def test_unknown_backend_in_artifact_fails(evaluated):
    evaluator, _, quantized, _ = evaluated
    alien = dataclasses.replace(quantized["Q8_0"], backend="tensorrt")
    with pytest.raises(EdgeError, match="unknown backend 'tensorrt'"):
        evaluator.evaluate(alien)


@pytest.mark.parametrize("field", ["window", "windows", "threads", "repeats", "decode_tokens"])
def test_bad_settings_are_refused(field):
    with pytest.raises(EdgeError, match=field):
        EvalSettings(**{field: 0})


def test_text_too_short_is_refused(tiny_source, tmp_path):
    from mlflow_edge.evaluation.data import evaluation_text

    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    with pytest.raises(EdgeError, match="tokens;"):
        Evaluator(tiny_source, EvalSettings(text=evaluation_text(short)))


def test_settings_params_name_the_text(tiny_settings):
    params = tiny_settings.params()
    assert params["eval.dataset"] == "wikitext-2[0:40000]"
    assert len(params["eval.sha256"]) == 64
    assert set(params) == {"eval.dataset", "eval.window", "eval.windows", "eval.threads", "eval.repeats", "eval.sha256",
                           "eval.speed", "eval.confidence"}
    assert params["eval.speed"] == "true"


def test_screen_scores_the_first_windows_against_the_same_reference_windows(evaluated):
    evaluator, reference, quantized, results = evaluated
    one = evaluator.screen(quantized["Q2_K"], windows=1)
    both = evaluator.screen(quantized["Q2_K"], windows=5)  # clamped to the 2 windows there are
    assert set(one) == {"perplexity", "kld_mean", "kld_p99", "top1_agreement", "accuracy_retention", "size_mb",
                        "bits_per_weight", "compression_ratio", "accuracy_retention_lo", "accuracy_retention_hi",
                        "kld_mean_lo", "kld_mean_hi"}
    assert both["perplexity"] == pytest.approx(results["Q2_K"]["perplexity"], rel=1e-4)
    assert both["kld_mean"] == pytest.approx(results["Q2_K"]["kld_mean"], rel=1e-4)
    # the reference perplexity comes from its cached float16 log-probabilities: the retention agrees closely
    assert both["accuracy_retention"] == pytest.approx(results["Q2_K"]["accuracy_retention"], rel=1e-3)
    assert one["perplexity"] != pytest.approx(both["perplexity"], rel=1e-6)
    assert one["size_mb"] == results["Q2_K"]["size_mb"]


def test_accuracy_only_settings_measure_no_speed(tiny_source, evaluated):
    _, _, quantized, results = evaluated
    settings = dataclasses.replace(evaluated[0].settings, speed=False)
    evaluator = Evaluator(tiny_source, settings)
    try:
        reference = evaluator.evaluate_reference()
        metrics = evaluator.evaluate(quantized["Q8_0"])
    finally:
        evaluator.close()
    from mlflow_edge.metrics import ACCURACY_SIZE_METRICS

    assert set(metrics) == set(ACCURACY_SIZE_METRICS) and set(reference) == set(ACCURACY_SIZE_METRICS)
    assert metrics["perplexity"] == pytest.approx(results["Q8_0"]["perplexity"], rel=1e-5)
    assert settings.params()["eval.speed"] == "false"


def test_artifact_round_trips_through_json(evaluated):
    _, _, quantized, _ = evaluated
    artifact = quantized["Q2_K"]
    assert Artifact.from_json(artifact.to_json()) == artifact


def test_the_reference_is_measured_once_per_machine_and_settings(tiny_source, tmp_path, monkeypatch):
    """A second study of the same source, text and settings takes the reference's measurement from the cache (no
    child process); other timing settings, or lost log-probabilities, measure it again."""
    monkeypatch.setenv("MLFLOW_EDGE_CACHE", str(tmp_path / "cache"))
    settings = EvalSettings(window=64, windows=2, threads=1, repeats=1, prefill_tokens=64, prompt_tokens=16,
                            decode_tokens=4)
    first = Evaluator(tiny_source, settings)
    measured = first.evaluate_reference()
    assert not first.reference_reused
    children = []
    monkeypatch.setattr(Evaluator, "_run_child", lambda self, job: children.append(job) or pytest.fail("measured"))
    again = Evaluator(tiny_source, settings)
    assert again.evaluate_reference() == measured and again.reference_reused and children == []
    monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_EDGE_CACHE", str(tmp_path / "cache"))
    other = Evaluator(tiny_source, dataclasses.replace(settings, repeats=2))
    other.evaluate_reference()
    assert not other.reference_reused
    (first.reference_dir / "logprobs.npy").unlink()
    lost = Evaluator(tiny_source, settings)
    lost.evaluate_reference()
    assert not lost.reference_reused and (lost.reference_dir / "logprobs.npy").is_file()
    for evaluator in (first, again, other, lost):
        evaluator.close()
