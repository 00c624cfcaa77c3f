"""The openvino flavor against the real OpenVINO runtime (the tiny Llama's IR) and a real sqlite MLflow store."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from mlflow_edge import cache, flavors, workflow
from mlflow_edge.backends.base import Artifact
from mlflow_edge.backends.openvino import MODEL_BIN, MODEL_XML, OpenVINOBackend, OpenVINORunner
from mlflow_edge.errors import EdgeError
from mlflow_edge.flavors import _common
from mlflow_edge.flavors import openvino as ov_flavor
from mlflow_edge.sources import SourceModel

PROMPT = "The capital of France is"
PROVENANCE = {"mlflow_edge": {"precision": "INT8_ASYM", "source_name": "tiny", "options": {"ratio": 1.0},
                              "shape": (1, 2)}}
SKELETON_FILES = {"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "code"}


@pytest.fixture(scope="module")
def ir(tiny_source: SourceModel) -> Artifact:
    """The tiny Llama as an INT8_ASYM IR (cached, from the cached f16 conversion)."""
    base = workflow.convert(tiny_source, "openvino", "f16")
    return workflow.quantize(tiny_source, base, "INT8_ASYM")


@pytest.fixture(scope="module")
def logged(ir: Artifact, tmp_path_factory: pytest.TempPathFactory, log_in_new_store):
    """One model logged in a run of a module-wide sqlite store, loaded as pyfunc."""
    return log_in_new_store(tmp_path_factory.mktemp("store"), ir, max_context=256)


def test_save_model_writes_flavor_ir_tokenizer_code_and_environment(ir: Artifact, tmp_path: Path) -> None:
    path = tmp_path / "model"
    ov_flavor.save_model(ir.path, path, metadata=PROVENANCE, max_context=1024, performance_hint="throughput")
    model = Model.load(str(path))
    conf = model.flavors[ov_flavor.FLAVOR_NAME]
    assert conf["data"] == "model" and conf["model_files"] == [MODEL_XML, MODEL_BIN] and conf["code"] == "code"
    assert conf["model_sha256"] == {name: cache.sha256_file(ir.path / name)
                                    for name in (MODEL_XML, MODEL_BIN)}
    assert conf["max_context"] == 1024 and conf["device"] == "CPU" and conf["performance_hint"] == "THROUGHPUT"
    assert conf["threads"] == 0 and conf["inference_precision"] is None
    assert conf["openvino_version"].startswith("20")
    assert model.metadata == {"mlflow_edge": {**PROVENANCE["mlflow_edge"], "shape": [1, 2]}}
    pyfunc_conf = model.flavors["python_function"]
    assert pyfunc_conf["loader_module"] == "mlflow_edge.flavors.openvino" and pyfunc_conf["data"] == "model"
    assert pyfunc_conf["code"] == "code"
    assert pyfunc_conf["config"] == {"max_context": 1024, "device": "CPU", "performance_hint": "THROUGHPUT",
                                     "inference_precision": None, "threads": 0}
    assert {p.name for p in path.iterdir()} == SKELETON_FILES | {"model"}
    stored = {p.name for p in (path / "model").iterdir()}
    assert {MODEL_XML, MODEL_BIN, "tokenizer.json", "tokenizer_config.json", "config.json"} <= stored
    assert not {"artifact.json", "key.json"} & stored
    assert (path / "model" / MODEL_BIN).stat().st_size == (ir.path / MODEL_BIN).stat().st_size
    assert (path / "code" / "mlflow_edge" / "flavors" / "openvino.py").is_file()
    requirements = (path / "requirements.txt").read_text().splitlines()
    for package in ("mlflow==", "openvino==", "transformers==", "numpy==", "pandas=="):
        assert any(r.startswith(package) for r in requirements), requirements
    assert not any("mlflow-edge" in r or "mlflow_edge" in r for r in requirements)


def test_save_model_refuses_non_empty_dir_and_bad_settings(ir: Artifact, tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.mkdir()
    (path / "keep.txt").write_text("x")
    with pytest.raises(MlflowException, match="already exists and is not empty"):
        ov_flavor.save_model(ir.path, path)
    assert [p.name for p in path.iterdir()] == ["keep.txt"]
    with pytest.raises(MlflowException, match="metadata must be JSON-serializable"):
        ov_flavor.save_model(ir.path, tmp_path / "a", metadata={"mlflow_edge": {"path": Path("x")}})
    with pytest.raises(MlflowException, match="max_context must be positive"):
        ov_flavor.save_model(ir.path, tmp_path / "b", max_context=0)
    with pytest.raises(MlflowException, match="performance_hint"):
        ov_flavor.save_model(ir.path, tmp_path / "c", performance_hint="fastest")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_corrupt_or_incomplete_ir_is_refused(ir: Artifact, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(ir.path, broken)
    (broken / MODEL_XML).write_bytes(os.urandom(512))
    with pytest.raises(EdgeError, match="not a valid OpenVINO IR") as exc:
        ov_flavor.save_model(broken, tmp_path / "model")
    assert "\n" not in str(exc.value)
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    for name in (MODEL_XML, MODEL_BIN):
        shutil.copyfile(ir.path / name, no_tokenizer / name)
    with pytest.raises(EdgeError, match="no tokenizer beside"):
        ov_flavor.save_model(no_tokenizer / MODEL_XML, tmp_path / "model")  # the .xml itself is accepted too
    with pytest.raises(EdgeError, match="no OpenVINO IR"):
        ov_flavor.save_model(tmp_path / "missing", tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_logged_model_has_contract_provenance_and_reads_back_as_artifact(logged, use_store, ir) -> None:
    use_store(logged)
    local = Path(mlflow.artifacts.download_artifacts(logged.model_uri))
    model = Model.load(str(local))
    assert {p.name: p.default for p in model.signature.params} == {s.name: s.default for s in _common.CONTRACT}
    assert model.signature.inputs.to_dict() == [{"type": "string", "required": True}]
    assert model.flavors[ov_flavor.FLAVOR_NAME]["max_context"] == 256
    assert model.metadata["mlflow_edge"] == flavors.provenance(ir)
    artifact = flavors.artifact_from_model(logged.model_uri)  # a logged model back as an artifact to evaluate
    assert artifact.backend == "openvino" and artifact.format == "openvino_ir" and artifact.precision == "INT8_ASYM"
    assert [f.name for f in artifact.files] == [MODEL_XML, MODEL_BIN] and artifact.path.name == "model"
    assert artifact.size_bytes == ir.size_bytes and artifact.options == dict(ir.options)
    assert flavors.flavor_module(artifact.format) is ov_flavor
    loaded = OpenVINOBackend().load(artifact, threads=2, context_tokens=32)
    assert loaded.logits([1, 2, 3]).shape == (3, 49152)
    loaded.close()


def test_pyfunc_predict_is_greedy_and_matches_optimum(logged, use_store) -> None:
    use_store(logged)
    model = logged.pyfunc_model
    first = model.predict([PROMPT], params={"max_tokens": 8})
    assert isinstance(first, list) and len(first) == 1 and isinstance(first[0], str) and first[0].strip()
    assert model.predict([PROMPT], params={"max_tokens": 8}) == first
    assert model.predict(PROMPT, params={"max_tokens": 8}) == first
    assert model.predict({"prompt": PROMPT}, params={"max_tokens": 8}) == first
    # the same greedy tokens as optimum-intel's OVModelForCausalLM.generate on the same IR (load_model)
    ov_model = ov_flavor.load_model(logged.model_uri)
    from optimum.intel import OVModelForCausalLM
    from transformers import AutoTokenizer

    assert isinstance(ov_model, OVModelForCausalLM)
    tokenizer = AutoTokenizer.from_pretrained(Path(mlflow.artifacts.download_artifacts(logged.model_uri)) / "model")
    inputs = tokenizer([PROMPT], return_tensors="pt")
    output = ov_model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) == first[0]
    assert isinstance(model.get_raw_model(), OpenVINORunner)


def test_pyfunc_predict_dataframe_stop_sampling_and_chat(logged) -> None:
    model = logged.pyfunc_model
    frame = pd.DataFrame({"prompt": [PROMPT, "One, two, three,"]})
    outputs = model.predict(frame, params={"max_tokens": 4})
    assert len(outputs) == 2 and all(isinstance(o, str) and o for o in outputs)
    assert model.predict({"prompt": [PROMPT, "One, two, three,"]}, params={"max_tokens": 4}) == outputs
    text = model.predict([PROMPT], params={"max_tokens": 12})[0]
    stop = text[len(text) // 2:].strip()[:2]
    assert len(stop) == 2, text
    assert model.predict([PROMPT], params={"max_tokens": 12, "stop": [stop]})[0] == text[: text.find(stop)]
    sampling = {"max_tokens": 8, "temperature": 1.5, "top_k": 100, "top_p": 0.95, "repetition_penalty": 1.3}
    a = model.predict([PROMPT], params={**sampling, "seed": 1})
    assert model.predict([PROMPT], params={**sampling, "seed": 1}) == a  # seeded: reproducible
    assert model.predict([PROMPT], params={**sampling, "seed": 2}) != a
    chat = model.predict([PROMPT], params={"max_tokens": 8, "chat": True})
    assert len(chat) == 1 and isinstance(chat[0], str)


def test_generation_stops_at_eos(logged) -> None:
    runner = logged.pyfunc_model.get_raw_model()
    wrapper = logged.pyfunc_model._model_impl
    ids = wrapper.tokenizer(PROMPT)["input_ids"]
    request = _common.parse_request({"max_tokens": 6}, runner.context_tokens)

    def as_ids(tokens: list[int]) -> str:
        return " ".join(map(str, tokens))

    greedy = [int(t) for t in _common.generate(runner, ids, request, frozenset(), as_ids).split()]
    assert len(greedy) == 6
    stop = greedy[3]  # pretend this token ends the text: generation stops at its first occurrence
    expected = greedy[: greedy.index(stop)]
    assert _common.generate(runner, ids, request, frozenset({stop}), as_ids).split() == [str(t) for t in expected]
    eos_wrapper = _common.LogitsModelWrapper(runner, wrapper.tokenizer, [stop])
    assert eos_wrapper.predict([PROMPT], {"max_tokens": 6}) == [wrapper.tokenizer.decode(expected,
                                                                                         skip_special_tokens=True)]


@pytest.mark.parametrize(("params", "reason"), [
    ({"max_tokens": 0}, "max_tokens must be from 1 to 256 (the model's context), got 0"),
    ({"max_new_tokens": 8}, "unknown param 'max_new_tokens'"),
    ({"ignore_eos": True}, "unknown param 'ignore_eos'"),
    ({"temperature": math.nan}, "temperature must be a finite number >= 0"),
    ({"stop": [1]}, "Failed to validate type and shape for 'stop'"),  # MLflow's own type check
])
def test_pyfunc_refuses_params_outside_the_contract(logged, params, reason) -> None:
    with pytest.raises(MlflowException) as caught:
        logged.pyfunc_model.predict([PROMPT], params=params)
    assert caught.value.get_http_status_code() == 400 and reason in caught.value.message


def test_context_limits_and_device_errors(logged, use_store) -> None:
    use_store(logged)
    small = mlflow.pyfunc.load_model(logged.model_uri, model_config={"max_context": 4})
    with pytest.raises(MlflowException, match="does not fit the context of 4"):
        small.predict(["a prompt that is longer than four tokens for sure"], params={"max_tokens": 2})
    assert len(small.predict(["Hi"], params={"max_tokens": 4})) == 1  # clipped to the room left in the context
    with pytest.raises(EdgeError, match="'NPU' is not present"):
        mlflow.pyfunc.load_model(logged.model_uri, model_config={"device": "NPU"})


def test_runtime_settings_at_load_time(logged, use_store, monkeypatch: pytest.MonkeyPatch) -> None:
    use_store(logged)
    runner = mlflow.pyfunc.load_model(logged.model_uri, model_config={"threads": 1, "inference_precision": "F32"})
    assert runner.get_raw_model().config == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 1,
                                             "INFERENCE_PRECISION_HINT": "f32"}
    monkeypatch.setenv("MLFLOW_EDGE_OPENVINO_PERFORMANCE_HINT", "THROUGHPUT")  # the environment wins
    runner = mlflow.pyfunc.load_model(logged.model_uri, model_config={"performance_hint": "LATENCY"})
    assert runner.get_raw_model().config == {"PERFORMANCE_HINT": "THROUGHPUT"}


def test_log_model_in_fixture_store(tracking_uri: str, ir: Artifact) -> None:
    with mlflow.start_run() as run:
        info = ov_flavor.log_model(ir.path, name="model", registered_model_name="edge-openvino")
    assert info.run_id == run.info.run_id
    assert info.flavors[ov_flavor.FLAVOR_NAME]["data"] == "model"
    assert mlflow.MlflowClient().get_registered_model("edge-openvino").name == "edge-openvino"
    assert mlflow.pyfunc.load_model(info.model_uri).predict([PROMPT], params={"max_tokens": 2})
