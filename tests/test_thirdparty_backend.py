"""A backend from another distribution: installed next to mlflow-edge, found through the entry-point group
``mlflow_edge.backends``, and driven by the CLI (convert → quantize → evaluate → search) without any edit to the
package. The evaluation worker, a child process, must find it too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from mlflow_edge.backends import backend_names

pytest.importorskip("llama_cpp")

PLUGIN = Path(__file__).parent / "thirdparty" / "edge_pure_gguf"
EVAL = ["--window", "64", "--windows", "2", "--repeats", "2", "--threads", "2"]


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin distribution installed with pip into its own site folder (put on PYTHONPATH for the CLI)."""
    site, project = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("project") / PLUGIN.name
    shutil.copytree(PLUGIN, project)  # the build writes build/ and egg-info beside the sources: not into the checkout
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), str(project)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return site


def cli(site: Path | None, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site or ""), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "mlflow_edge.cli", *args], env=env, capture_output=True, text=True,
                          timeout=900)


def test_the_plugin_is_unknown_until_installed():
    assert "pure_gguf" not in backend_names()
    done = cli(None, "quant-types", "--backend", "pure_gguf")
    assert done.returncode == 1 and done.stderr.startswith("mlflow-edge: error: unknown backend 'pure_gguf'")


@pytest.mark.slow
def test_convert_quantize_evaluate_search_through_a_third_party_backend(plugin_site, tracking_uri, tiny_source):
    listed = cli(plugin_site, "quant-types", "--backend", "pure_gguf")
    assert listed.returncode == 0 and "[pure_gguf] format pure_gguf" in listed.stdout, listed.stderr
    model = str(tiny_source.path)

    converted = cli(plugin_site, "convert", "--model", model, "--backend", "pure_gguf")
    assert converted.returncode == 0, converted.stderr[-2000:]
    quantized = cli(plugin_site, "quantize", "--model", model, "--backend", "pure_gguf", "--precision", "Q8_0")
    assert quantized.returncode == 0, quantized.stderr[-2000:]
    model_uri = quantized.stdout.strip().splitlines()[-1]
    runs = mlflow.search_runs(search_all_experiments=True)
    quantize_run = runs[runs["tags.mlflow.runName"] == "quantize-Q8_0"].iloc[0]
    assert quantize_run["params.backend"] == "pure_gguf" and quantize_run["params.pure_gguf.pure"] == "True"

    evaluated = cli(plugin_site, "evaluate", "--model", model, "--artifact", model_uri, *EVAL)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "accuracy_retention" in evaluated.stdout and "decode_tok_s" in evaluated.stdout

    searched = cli(plugin_site, "search", "--model", model, "--backends", "pure_gguf", "--trials", "2",
                   "--gates", "accuracy_retention>=0.5", "--registered-model", "tiny-pure", *EVAL)
    assert searched.returncode == 0, searched.stderr[-3000:]
    parent = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`mlflow_edge.role` = 'study'")
    study = optuna.load_study(study_name=parent.iloc[0]["tags.optuna.study"],
                              storage=parent.iloc[0]["tags.optuna.storage"])
    assert len(study.trials) == 2 and {t.params["backend"] for t in study.trials} == {"pure_gguf"}
    assert all(set(t.params) <= {"backend", "pure_gguf.precision"} for t in study.trials)
    champion = MlflowClient().get_model_version_by_alias("tiny-pure", "cpu-champion")
    assert champion.tags["backend"] == "pure_gguf"
