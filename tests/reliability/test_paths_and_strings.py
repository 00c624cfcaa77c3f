"""Paths read from records stay inside their folder; names and secrets cannot leak into HTML, tags or messages."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.models import Model

from mlflow_edge.artifacts import read_artifact_record
from mlflow_edge.errors import EdgeError
from mlflow_edge.flavors import METADATA_KEY, artifact_from_model, flavor_module
from mlflow_edge.report import write_report
from mlflow_edge.search import SearchConfig, run_search, write_search_report
from mlflow_edge.search.storage import open_storage, redacted

SCRIPT = "<script>alert('x')</script>"


@pytest.fixture()
def outside(tmp_path: Path) -> Path:
    secret = tmp_path / "secret.gguf"
    secret.write_bytes(b"GGUF not yours")
    return secret


def escapes(folder: Path, outside: Path) -> dict[str, str]:
    """Relative paths that lead out of ``folder``: climbing, absolute, and through a symlink."""
    (folder / "link.gguf").symlink_to(outside)
    (folder / "linked-dir").symlink_to(outside.parent, target_is_directory=True)
    return {"dotdot": "../secret.gguf", "absolute": str(outside), "symlink": "link.gguf",
            "symlinked-folder": "linked-dir/secret.gguf"}


def write_record(folder: Path, path: str, files: list[str]) -> None:
    (folder / "artifact.json").write_text(json.dumps({
        "path": path, "files": files, "backend": "b", "format": "f", "precision": "p", "source_name": "s",
        "source_sha256": "", "num_parameters": 1, "options": {}}))


@pytest.mark.parametrize("field", ["path", "files"])
def test_artifact_record_paths_stay_in_their_cache_entry(tmp_path: Path, outside: Path, field: str) -> None:
    folder = tmp_path / "entry"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF")
    for kind, escape in escapes(folder, outside).items():
        path, files = (escape, ["model.gguf"]) if field == "path" else ("model.gguf", ["model.gguf", escape])
        write_record(folder, path, files)
        with pytest.raises(EdgeError) as info:
            read_artifact_record(folder)
        assert "artifact.json" in str(info.value) and "\n" not in str(info.value), kind
    write_record(folder, "model.gguf", ["model.gguf"])
    assert read_artifact_record(folder).path == folder / "model.gguf"


def logged_model(folder: Path, data: str, model_files: list[str] | None = None) -> None:
    model = Model(metadata={METADATA_KEY: {"backend": "llamacpp", "format": "gguf", "precision": "Q4_0"}})
    conf = {"data": data, **({"model_files": model_files} if model_files else {})}
    model.add_flavor(flavor_module("gguf").FLAVOR_NAME, **conf)
    model.save(str(folder / "MLmodel"))


@pytest.mark.parametrize("field", ["data", "model_files"])
def test_mlmodel_paths_stay_in_the_model_folder(tmp_path: Path, outside: Path, field: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights").mkdir()
    (folder / "weights" / "model.gguf").write_bytes(b"GGUF")
    for kind, escape in escapes(folder, outside).items():
        if field == "data":
            logged_model(folder, escape)
        else:
            (folder / "weights" / "link.gguf").unlink(missing_ok=True)
            (folder / "weights" / "link.gguf").symlink_to(outside)
            logged_model(folder, "weights", ["model.gguf", escape.replace("linked-dir", "../linked-dir")])
        with pytest.raises(EdgeError) as info:
            artifact_from_model(str(folder))
        assert "MLmodel" in str(info.value) and "\n" not in str(info.value), kind
    logged_model(folder, "weights", ["model.gguf"])
    assert artifact_from_model(str(folder)).files == (folder / "weights" / "model.gguf",)


def test_study_name_is_escaped_in_the_pareto_page(tmp_path: Path) -> None:
    study = optuna.create_study(study_name=SCRIPT, directions=["minimize", "maximize"])
    write_search_report(study, (("size_mb", "minimize"), ("accuracy_retention", "maximize")), tmp_path)
    page = (tmp_path / "pareto.html").read_text()
    assert SCRIPT not in page and "&lt;script&gt;" in page


def test_names_are_escaped_in_the_comparison_page(tmp_path: Path) -> None:
    table = pd.DataFrame([{"name": SCRIPT, "backend": SCRIPT, "precision": "q4", "role": "candidate", "size_mb": 1.0,
                           "perplexity": 2.0, "decode_tok_s": 3.0}])
    write_report(table, tmp_path, title=f"study {SCRIPT}")
    page = (tmp_path / "comparison.html").read_text()
    assert SCRIPT not in page and page.count("&lt;script&gt;") == 4  # <title>, <h1>, two cells


def test_storage_password_is_redacted() -> None:
    assert redacted("postgresql://user:s3cret@db.example:5432/optuna") == "postgresql://user:***@db.example:5432/optuna"
    assert redacted("sqlite:////tmp/a b/optuna.db") == "sqlite:////tmp/a b/optuna.db"
    with pytest.raises(EdgeError, match="not a database URL"):
        redacted("s3cret")


def test_an_unreachable_storage_fails_fast_in_one_line_without_the_password() -> None:
    start = time.monotonic()
    with pytest.raises(EdgeError) as info:
        open_storage("postgresql://u:s3cret@127.0.0.1:1/x")
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert message.startswith("cannot open the Optuna storage postgresql://u:***@127.0.0.1:1/x: ")
    assert "s3cret" not in message and "\n" not in message


def test_a_search_on_an_unreachable_storage_starts_nothing(tracking_uri, tiny_source, capfd) -> None:
    start = time.monotonic()
    with pytest.raises(EdgeError) as info:
        run_search(SearchConfig(str(tiny_source.path), trials=1, storage="postgresql://u:s3cret@127.0.0.1:1/x"))
    assert time.monotonic() - start < 20
    assert "s3cret" not in str(info.value) + "".join(capfd.readouterr())
    assert mlflow.search_runs(search_all_experiments=True).empty

