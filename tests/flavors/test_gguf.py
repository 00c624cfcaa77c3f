"""The gguf flavor against real llama.cpp (the tiny Llama converted to an F16 GGUF) and a real sqlite MLflow store."""

from __future__ import annotations

import math
import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from mlflow_edge import flavors, workflow
from mlflow_edge.backends.base import Artifact
from mlflow_edge.errors import EdgeError
from mlflow_edge.flavors import _common, gguf

pytest.importorskip("llama_cpp")

PROMPT = "The capital of France is"
PROVENANCE = {"mlflow_edge": {"precision": "F16", "source_name": "tiny", "source_sha256": "0" * 64, "shape": (1, 2)}}
SKELETON_FILES = {"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "code"}


@pytest.fixture(scope="module")
def tiny_gguf(tiny_source) -> Artifact:
    """The tiny Llama as an F16 GGUF (cached conversion; about 26 MB)."""
    return workflow.convert(tiny_source, "llamacpp", "f16")


@pytest.fixture(scope="module")
def logged(tiny_gguf: Artifact, tmp_path_factory: pytest.TempPathFactory, log_in_new_store):
    """One model logged in a run of a module-wide sqlite store, loaded as pyfunc."""
    return log_in_new_store(tmp_path_factory.mktemp("store"), tiny_gguf, n_ctx=256)


def test_save_model_writes_flavor_code_metadata_and_environment(tiny_gguf: Artifact, tmp_path: Path) -> None:
    path = tmp_path / "model"
    gguf.save_model(tiny_gguf.path, path, metadata=PROVENANCE, n_ctx=1024)

    model = Model.load(str(path))
    conf = model.flavors[gguf.FLAVOR_NAME]
    assert conf["data"] == "model.gguf" and conf["n_ctx"] == 1024 and conf["code"] == "code"
    assert conf["sha256"] == gguf.cache.sha256_file(tiny_gguf.path) and conf["llama_cpp_python_version"]
    assert model.metadata == {"mlflow_edge": {**PROVENANCE["mlflow_edge"], "shape": [1, 2]}}
    pyfunc_conf = model.flavors["python_function"]
    assert pyfunc_conf["loader_module"] == "mlflow_edge.flavors.gguf" and pyfunc_conf["data"] == "model.gguf"
    assert pyfunc_conf["code"] == "code" and pyfunc_conf["config"] == {"n_ctx": 1024}
    assert {p.name for p in path.iterdir()} == SKELETON_FILES | {"model.gguf"}
    assert (path / "model.gguf").stat().st_size == tiny_gguf.path.stat().st_size
    # the loader travels with the model: the package under code/, without bytecode
    assert (path / "code" / "mlflow_edge" / "flavors" / "gguf.py").read_text() == Path(gguf.__file__).read_text()
    assert not list((path / "code").rglob("__pycache__"))
    requirements = (path / "requirements.txt").read_text().splitlines()
    for package in ("mlflow==", "llama-cpp-python==", "numpy==", "pandas=="):
        assert any(r.startswith(package) for r in requirements), requirements
    assert not any("mlflow-edge" in r or "mlflow_edge" in r for r in requirements)


def test_save_model_refuses_non_empty_dir(tiny_gguf: Artifact, tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.mkdir()
    (path / "keep.txt").write_text("x")
    with pytest.raises(MlflowException, match="already exists and is not empty"):
        gguf.save_model(tiny_gguf.path, path)
    assert [p.name for p in path.iterdir()] == ["keep.txt"]


def test_save_model_refuses_bad_metadata_and_settings(tiny_gguf: Artifact, tmp_path: Path) -> None:
    with pytest.raises(MlflowException, match="metadata must be JSON-serializable"):
        gguf.save_model(tiny_gguf.path, tmp_path / "a", metadata={"mlflow_edge": {"path": Path("x")}})
    with pytest.raises(MlflowException, match="n_ctx must be positive"):
        gguf.save_model(tiny_gguf.path, tmp_path / "b", n_ctx=0)
    with pytest.raises(TypeError, match="metadata_config"):  # the old keyword is gone, not ignored
        gguf.save_model(tiny_gguf.path, tmp_path / "c", metadata_config={"precision": "F16"})
    assert not any((tmp_path / name).exists() for name in "abc")


def test_corrupt_gguf_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(1024))
    with pytest.raises(EdgeError, match="not a valid GGUF"):
        gguf.save_model(junk, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_truncated_gguf_is_refused(tiny_gguf: Artifact, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with open(tiny_gguf.path, "rb") as src:
        truncated.write_bytes(src.read(tiny_gguf.path.stat().st_size // 2))
    with pytest.raises(EdgeError, match="GGUF"):
        gguf.save_model(truncated, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_logged_model_has_contract_provenance_and_reads_back_as_artifact(logged, use_store, tiny_gguf) -> None:
    use_store(logged)
    local = Path(mlflow.artifacts.download_artifacts(logged.model_uri))
    model = Model.load(str(local))
    assert {p.name: p.default for p in model.signature.params} == {s.name: s.default for s in _common.CONTRACT}
    assert model.signature.inputs.to_dict() == [{"type": "string", "required": True}]
    assert model.flavors[gguf.FLAVOR_NAME]["n_ctx"] == 256
    assert model.metadata["mlflow_edge"] == flavors.provenance(tiny_gguf)
    artifact = flavors.artifact_from_model(logged.model_uri)
    assert (artifact.backend, artifact.format, artifact.precision) == ("llamacpp", "gguf", tiny_gguf.precision)
    assert artifact.path.name == "model.gguf" and artifact.files == (artifact.path,)
    assert artifact.size_bytes == tiny_gguf.size_bytes and artifact.source_sha256 == tiny_gguf.source_sha256


def test_pyfunc_predict_is_greedy_and_takes_every_input_form(logged) -> None:
    model = logged.pyfunc_model
    first = model.predict([PROMPT], params={"max_tokens": 8})
    assert isinstance(first, list) and len(first) == 1 and isinstance(first[0], str) and first[0]
    assert model.predict([PROMPT], params={"max_tokens": 8}) == first
    assert model.predict(PROMPT, params={"max_tokens": 8}) == first
    assert model.predict({"prompt": PROMPT}, params={"max_tokens": 8}) == first
    frame = pd.DataFrame({"prompt": [PROMPT, "One, two, three,"]})
    outputs = model.predict(frame, params={"max_tokens": 4})
    assert len(outputs) == 2 and outputs[0] == model.predict([PROMPT], params={"max_tokens": 4})[0]
    wrapper = gguf._GGUFModelWrapper(model.get_raw_model())  # the loader alone, as a signature-less caller sees it
    assert wrapper.predict(pd.DataFrame({"text": [PROMPT]}), {"max_tokens": 8}) == first
    with pytest.raises(MlflowException, match="strings"):
        wrapper.predict([1, 2])


def test_pyfunc_stop_sampling_and_chat(logged) -> None:
    model = logged.pyfunc_model
    text = model.predict([PROMPT], params={"max_tokens": 12})[0]
    stop = text[len(text) // 2:].strip()[:2]
    assert len(stop) == 2, text
    cut = model.predict([PROMPT], params={"max_tokens": 12, "stop": [stop]})[0]
    assert cut == text[: text.find(stop)]
    sampling = {"max_tokens": 8, "temperature": 1.5, "top_k": 100, "top_p": 0.95, "repetition_penalty": 1.3}
    a = model.predict([PROMPT], params={**sampling, "seed": 1})
    assert model.predict([PROMPT], params={**sampling, "seed": 1}) == a  # seeded: reproducible
    assert model.predict([PROMPT], params={**sampling, "seed": 2}) != a
    chat = model.predict([PROMPT], params={"max_tokens": 8, "chat": True})
    assert len(chat) == 1 and isinstance(chat[0], str)


@pytest.mark.parametrize(("params", "reason"), [
    ({"max_tokens": -1}, "max_tokens must be from 1 to 256"),
    ({"max_tokens": 10**6}, "max_tokens must be from 1 to 256 (the model's context)"),
    ({"bogus": 1}, "unknown param 'bogus'"),
    ({"repeat_penalty": 1.1}, "unknown param 'repeat_penalty'"),
    ({"temperature": math.nan}, "temperature must be a finite number >= 0"),
    ({"top_p": 0.0}, "top_p must be"),
    ({"stop": "\n"}, "Value must be a 1D array"),  # MLflow's own type check of the declared ParamSpec
])
def test_pyfunc_refuses_params_outside_the_contract(logged, params, reason) -> None:
    with pytest.raises(MlflowException) as caught:
        logged.pyfunc_model.predict([PROMPT], params=params)
    assert caught.value.get_http_status_code() == 400 and reason in caught.value.message


def test_prompt_longer_than_the_context_is_refused(logged) -> None:
    with pytest.raises(MlflowException, match="does not fit the context of 256") as caught:
        logged.pyfunc_model.predict(["word " * 400], params={"max_tokens": 2})
    assert caught.value.get_http_status_code() == 400


def test_load_model_returns_llama(logged, use_store) -> None:
    import llama_cpp

    use_store(logged)
    llm = gguf.load_model(logged.model_uri, n_ctx=512)
    assert isinstance(llm, llama_cpp.Llama) and llm.n_ctx() == 512
    assert isinstance(llm.create_completion(PROMPT, max_tokens=2, temperature=0.0)["choices"][0]["text"], str)
    # pyfunc's model_config overrides the saved n_ctx
    assert mlflow.pyfunc.load_model(logged.model_uri, model_config={"n_ctx": 512}).get_raw_model().n_ctx() == 512


def test_log_model_in_fixture_store(tracking_uri: str, tiny_gguf: Artifact) -> None:
    with mlflow.start_run() as run:
        info = gguf.log_model(tiny_gguf.path, name="model", registered_model_name="edge-gguf", metadata=PROVENANCE)
    assert info.run_id == run.info.run_id and info.metadata["mlflow_edge"]["shape"] == [1, 2]
    assert info.flavors[gguf.FLAVOR_NAME]["data"] == "model.gguf"
    assert mlflow.MlflowClient().get_registered_model("edge-gguf").name == "edge-gguf"
    with pytest.raises(EdgeError, match="not a model logged by mlflow-edge"):
        flavors.artifact_from_model(info.model_uri)  # no backend/format in its metadata
