"""The memory and disk plan, on the tiny model's real headers and a real search: estimates, the reference dtype it
picks, backends left out and runs refused before any work when a stage cannot fit."""

from __future__ import annotations

import mlflow
import pytest

from mlflow_edge import plan
from mlflow_edge.errors import EdgeError
from mlflow_edge.search import SearchConfig, backends_for, run_search


@pytest.fixture()
def memory_gb(monkeypatch):
    def set_budget(value: float) -> None:
        monkeypatch.setenv(plan.MEMORY_ENV, str(value))
    return set_budget


def test_facts_come_from_the_headers(tiny_source):
    facts = plan.source_facts(tiny_source)
    assert facts.parameters == tiny_source.num_parameters and facts.dtype == "float32"
    assert facts.disk_bytes == 4 * facts.parameters and facts.vocab == 49152
    assert facts.largest_tensor == 49152 * 256  # the embedding


def test_the_reference_drops_to_16_bits_only_when_fp32_does_not_fit(tiny_source, memory_gb):
    facts = plan.source_facts(tiny_source)
    fp32 = plan.reference_need(facts, "float32", 64).rss_bytes
    bf16 = plan.reference_need(facts, "bfloat16", 64).rss_bytes
    assert bf16 < fp32 and fp32 - bf16 == 2 * facts.parameters
    assert plan.reference_dtype("auto", facts, 64, memory=fp32) == "float32"
    assert plan.reference_dtype("auto", facts, 64, memory=fp32 - 1) == "bfloat16"
    assert plan.reference_dtype("float16", facts, 64, memory=1) == "float16"  # asked for: taken as given
    with pytest.raises(EdgeError, match="unknown reference dtype 'int8'"):
        plan.reference_dtype("int8", facts, 64)
    memory_gb(fp32 / 1e9)
    assert plan.memory_budget() == int(fp32 / 1e9 * 1e9)
    memory_gb("lots")
    with pytest.raises(EdgeError, match="MLFLOW_EDGE_MEMORY_GB must be a positive number of GB, got 'lots'"):
        plan.memory_budget()


def test_a_backend_whose_conversion_does_not_fit_is_left_out(tiny_source):
    backends = backends_for("cpu")
    facts = plan.source_facts(tiny_source)
    needs = {b: max(n.rss_bytes for n in plan.backend_needs(b, facts)) for b in backends}
    heavy = max(needs, key=needs.get)
    if len(set(needs.values())) == 1:
        pytest.skip("every installed backend needs the same")
    budget = (needs[heavy] + max(v for b, v in needs.items() if needs[b] < needs[heavy])) // 2
    budget = max(budget, plan.reference_need(facts, "float32", 64).rss_bytes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(plan.MEMORY_ENV, str(budget / 1e9))
        chosen = plan.planned(tiny_source, backends, 64, "auto", chosen=False)
        assert heavy not in chosen.backends and chosen.backends
        assert any(note.startswith(f"leaving out {heavy}: ") and "GB of memory" in note for note in chosen.notes)
        assert chosen.params["reference.dtype"] == "float32" and "plan.memory_gb" in chosen.params
        with pytest.raises(EdgeError, match=f"{heavy} .* needs about .* GB of memory; .* GB are available"):
            plan.planned(tiny_source, [heavy], 64, "auto", chosen=True)  # named by the user: refused


def test_a_search_that_cannot_fit_is_refused_before_any_work(tiny_source, tiny_settings, tracking_uri, memory_gb):
    memory_gb(0.3)
    with pytest.raises(EdgeError) as refused:
        run_search(SearchConfig(str(tiny_source.path), trials=1, gates="accuracy_retention>=0.5",
                                settings=tiny_settings, registered_model="tiny-plan-edge"))
    message = str(refused.value)
    assert "\n" not in message and "needs about" in message and "0.30 GB are available" in message
    runs = mlflow.search_runs(experiment_names=["mlflow-edge"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]  # the parent alone, with the reason
    assert runs[0].data.tags["mlflow_edge.error"].startswith(message[:40])
    assert mlflow.MlflowClient().search_registered_models() == []


def test_a_search_logs_its_plan_and_reference_dtype(tiny_source, tiny_settings, tracking_uri, memory_gb):
    facts = plan.source_facts(tiny_source)
    fp32 = plan.reference_need(facts, "float32", tiny_settings.window).rss_bytes
    llama = max(n.rss_bytes for n in plan.backend_needs("llamacpp", facts))
    bf16 = plan.reference_need(facts, "bfloat16", tiny_settings.window).rss_bytes
    memory_gb(max(fp32 - 10_000, llama + 1, bf16) / 1e9)
    if plan.memory_budget() >= fp32:
        pytest.skip("llama.cpp's stages need more than an fp32 reference of the tiny model")
    result = run_search(SearchConfig(str(tiny_source.path), trials=1, gates="accuracy_retention>=0.5",
                                     settings=tiny_settings, registered_model="tiny-plan-edge", backends=["llamacpp"]))
    parent = mlflow.get_run(result["run_id"])
    assert parent.data.params["reference.dtype"] == "bfloat16"
    assert {"plan.memory_gb", "plan.disk_free_gb", "plan.the_reference_bfloat16.rss_gb"} <= set(parent.data.params)
    reference = mlflow.search_runs(experiment_names=["mlflow-edge"], output_format="list",
                                   filter_string="tags.`mlflow_edge.role` = 'reference'")[0]
    assert reference.data.params["reference.dtype"] == "bfloat16" and reference.data.params["precision"] == "bf16"
