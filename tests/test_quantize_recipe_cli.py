"""`mlflow-edge quantize --target-bpw / --recipe` end to end on a real sqlite store: the recipe a budget chose is
logged beside the model, re-applied from that file alone (it records its importance matrix) bit-identically, and bad
input leaves nothing behind."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from mlflow_edge import cache, recipes
from mlflow_edge.cli import main
from mlflow_edge.flavors import artifact_from_model

pytest.importorskip("llama_cpp")


def _quantize(*args: str) -> str:
    result = CliRunner().invoke(main, ["quantize", *args])
    assert result.exit_code == 0, result.output
    return re.findall(r"models:/\S+", result.output)[-1]  # the last line (a progress bar may share it)


@pytest.mark.slow
def test_a_budgeted_recipe_is_logged_and_reapplied_bit_identically(tracking_uri, tiny_source, tmp_path):
    model = str(tiny_source.path)
    first_uri = _quantize("--model", model, "--target-bpw", "4.8",
                          "--options", "imatrix=true,recipe_types=Q4_K,Q6_K,Q8_0,imatrix_chunks=1")
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "recipe")}
    assert logged == {"recipe/recipe.json", "recipe/sensitivity.csv", "recipe/sensitivity.png"}
    recipe = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="recipe/recipe.json",
                                                      dst_path=str(tmp_path)))
    assert recipes.load_recipe(recipe).sensitivity["types"] == ["Q4_K", "Q6_K", "Q8_0"]
    second_uri = _quantize("--model", model, "--recipe", str(recipe))  # the recipe brings its importance matrix
    first = artifact_from_model(first_uri, str(tmp_path / "first"))
    second = artifact_from_model(second_uri, str(tmp_path / "second"))
    assert first.precision == second.precision == "MIXED"
    assert cache.sha256_file(first.path) == cache.sha256_file(second.path)


def test_two_mixed_precision_flags_are_refused_and_nothing_is_logged(tracking_uri, tiny_source, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text("{}")
    result = CliRunner().invoke(main, ["quantize", "--model", str(tiny_source.path), "--recipe", str(recipe),
                                       "--target-bpw", "4.5"])
    assert result.exit_code == 1
    assert result.output.strip() == "mlflow-edge: error: give one of --recipe, --target-bpw and --target-size-mb"
    missing = CliRunner().invoke(main, ["quantize", "--model", str(tiny_source.path)])
    assert missing.output.strip().startswith("mlflow-edge: error: give --precision")
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
