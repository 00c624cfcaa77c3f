"""The openvino flavor against the real OpenVINO runtime (the tiny Llama's IR) and a real sqlite MLflow store."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from mlflow_edge import flavors, workflow
from mlflow_edge.backends.base import Artifact, EdgeError
from mlflow_edge.backends.openvino import MODEL_BIN, MODEL_XML, OpenVINOBackend, OpenVINORunner
from mlflow_edge.flavors import openvino as ov_flavor
from mlflow_edge.sources import SourceModel

PROMPT = "The capital of France is"
METADATA_CONFIG = {"precision": "INT8_ASYM", "source_name": "tiny", "source_sha256": "0" * 64,
                   "options": {"base_precision": "f16"}}
ENVIRONMENT_FILES = {"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt"}


@dataclasses.dataclass(frozen=True)
class Logged:
    tracking_uri: str
    model_uri: str
    pyfunc_model: mlflow.pyfunc.PyFuncModel


@pytest.fixture(scope="module")
def ir(tiny_source: SourceModel, tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    """The tiny Llama as an INT8_ASYM IR (from the cached f16 conversion)."""
    base = workflow.convert(tiny_source, "openvino", "f16")
    return OpenVINOBackend().quantize(base, tmp_path_factory.mktemp("ir"), "INT8_ASYM")


@pytest.fixture(scope="module")
def logged(ir: Artifact, tmp_path_factory: pytest.TempPathFactory) -> Logged:
    """One model logged in a run of a module-wide sqlite store, loaded as pyfunc."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous, cwd = mlflow.get_tracking_uri(), os.getcwd()
    os.chdir(root)  # the default artifact root is ./mlruns
    try:
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run():
            info = flavors.log_artifact_model(ir, name="model", max_context=256)
        model = mlflow.pyfunc.load_model(info.model_uri)
    finally:
        os.chdir(cwd)
        mlflow.set_tracking_uri(previous)
    return Logged(uri, info.model_uri, model)


@pytest.fixture()
def store(logged: Logged, monkeypatch: pytest.MonkeyPatch) -> Iterator[Logged]:
    """The module store as the current tracking URI for one test."""
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.tracking_uri)
    mlflow.set_tracking_uri(logged.tracking_uri)
    yield logged
    mlflow.set_tracking_uri(previous)


def test_save_model_writes_flavor_ir_and_tokenizer(ir: Artifact, tmp_path: Path) -> None:
    path = tmp_path / "model"
    ov_flavor.save_model(ir.path, path, metadata_config={**METADATA_CONFIG, "shape": (1, 2)}, max_context=1024,
                         performance_hint="throughput")
    model = Model.load(str(path))
    conf = model.flavors[ov_flavor.FLAVOR_NAME]
    assert conf["model_dir"] == "model" and conf["model_files"] == [MODEL_XML, MODEL_BIN]
    assert conf["model_sha256"] == {name: ov_flavor.cache.sha256_file(ir.path / name)
                                    for name in (MODEL_XML, MODEL_BIN)}
    assert conf["max_context"] == 1024 and conf["device"] == "CPU" and conf["performance_hint"] == "THROUGHPUT"
    assert conf["openvino_version"].startswith("20")
    assert conf["precision"] == "INT8_ASYM" and conf["options"] == {"base_precision": "f16"} and conf["shape"] == [1, 2]
    pyfunc_conf = model.flavors["python_function"]
    assert pyfunc_conf["loader_module"] == "mlflow_edge.flavors.openvino" and pyfunc_conf["data"] == "model"
    assert pyfunc_conf["config"] == {"max_context": 1024, "device": "CPU", "performance_hint": "THROUGHPUT",
                                     "inference_precision": None, "threads": 0}
    assert conf["threads"] == 0 and conf["inference_precision"] is None
    assert {p.name for p in path.iterdir()} == ENVIRONMENT_FILES | {"model"}
    stored = {p.name for p in (path / "model").iterdir()}
    assert {MODEL_XML, MODEL_BIN, "tokenizer.json", "tokenizer_config.json", "config.json"} <= stored
    assert not {"artifact.json", "key.json"} & stored
    assert (path / "model" / MODEL_BIN).stat().st_size == (ir.path / MODEL_BIN).stat().st_size
    requirements = (path / "requirements.txt").read_text().splitlines()
    for package in ("openvino==", "transformers==", "mlflow-edge==", "mlflow=="):
        assert any(r.startswith(package) for r in requirements)


def test_save_model_refuses_non_empty_dir_and_bad_settings(ir: Artifact, tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.mkdir()
    (path / "keep.txt").write_text("x")
    with pytest.raises(MlflowException, match="already exists and is not empty"):
        ov_flavor.save_model(ir.path, path)
    assert [p.name for p in path.iterdir()] == ["keep.txt"]
    with pytest.raises(MlflowException, match="JSON-serializable"):
        ov_flavor.save_model(ir.path, tmp_path / "a", metadata_config={"path": Path("x")})
    with pytest.raises(MlflowException, match="reserved"):
        ov_flavor.save_model(ir.path, tmp_path / "b", metadata_config={"model_files": []})
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


def test_logged_model_has_signature_and_artifact(store: Logged, ir: Artifact) -> None:
    local = Path(mlflow.artifacts.download_artifacts(store.model_uri))
    model = Model.load(str(local))
    params = {p.name: p.default for p in model.signature.params}
    assert params == {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "top_k": 50,
                      "repetition_penalty": 1.0, "seed": 0, "chat": False, "ignore_eos": False}
    assert model.signature.inputs.to_dict() == [{"type": "string", "required": True}]
    conf = model.flavors[ov_flavor.FLAVOR_NAME]
    assert conf["max_context"] == 256 and conf["backend"] == "openvino" and conf["precision"] == "INT8_ASYM"
    artifact = flavors.artifact_from_model(store.model_uri)  # a logged model back as an artifact to evaluate
    assert artifact.backend == "openvino" and artifact.format == "openvino_ir" and artifact.precision == "INT8_ASYM"
    assert [f.name for f in artifact.files] == [MODEL_XML, MODEL_BIN] and artifact.path.name == "model"
    assert artifact.size_bytes == ir.size_bytes and artifact.options == dict(ir.options)
    loaded = OpenVINOBackend().load(artifact, threads=2, context_tokens=32)
    assert loaded.logits([1, 2, 3]).shape == (3, 49152)
    loaded.close()


def test_pyfunc_predict_is_greedy_and_matches_optimum(logged: Logged, store: Logged) -> None:
    first = logged.pyfunc_model.predict([PROMPT], params={"max_new_tokens": 8})
    assert isinstance(first, list) and len(first) == 1 and isinstance(first[0], str) and first[0].strip()
    assert logged.pyfunc_model.predict([PROMPT], params={"max_new_tokens": 8}) == first
    assert logged.pyfunc_model.predict(PROMPT, params={"max_new_tokens": 8}) == first
    assert logged.pyfunc_model.predict({"prompt": PROMPT}, params={"max_new_tokens": 8}) == first
    # the same greedy tokens as optimum-intel's OVModelForCausalLM.generate on the same IR (load_model)
    ov_model = ov_flavor.load_model(store.model_uri)
    from optimum.intel import OVModelForCausalLM
    from transformers import AutoTokenizer

    assert isinstance(ov_model, OVModelForCausalLM)
    tokenizer = AutoTokenizer.from_pretrained(Path(mlflow.artifacts.download_artifacts(store.model_uri)) / "model")
    inputs = tokenizer([PROMPT], return_tensors="pt")
    output = ov_model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) == first[0]
    assert isinstance(logged.pyfunc_model.get_raw_model(), OpenVINORunner)


def test_pyfunc_predict_dataframe_sampling_and_chat(logged: Logged) -> None:
    model = logged.pyfunc_model
    frame = pd.DataFrame({"prompt": [PROMPT, "One, two, three,"]})
    outputs = model.predict(frame, params={"max_new_tokens": 4})
    assert len(outputs) == 2 and all(isinstance(o, str) and o for o in outputs)
    assert model.predict({"prompt": [PROMPT, "One, two, three,"]}, params={"max_new_tokens": 4}) == outputs
    sampling = {"max_new_tokens": 8, "temperature": 1.5, "top_k": 100, "top_p": 0.95, "repetition_penalty": 1.3}
    a = model.predict([PROMPT], params={**sampling, "seed": 1})
    assert model.predict([PROMPT], params={**sampling, "seed": 1}) == a  # seeded: reproducible
    assert model.predict([PROMPT], params={**sampling, "seed": 2}) != a
    chat = model.predict([PROMPT], params={"max_new_tokens": 8, "chat": True})
    assert len(chat) == 1 and isinstance(chat[0], str)


def test_generation_stops_at_eos_unless_ignored(store: Logged) -> None:
    from transformers import AutoTokenizer

    runner = store.pyfunc_model.get_raw_model()
    local = Path(mlflow.artifacts.download_artifacts(store.model_uri))
    tokenizer = AutoTokenizer.from_pretrained(local / "model")
    options = {name: default for name, _, default in ov_flavor.GENERATION_PARAMS}
    ids = tokenizer(PROMPT)["input_ids"]
    greedy = ov_flavor._OpenVINOModelWrapper(runner, tokenizer, []).generate_ids(ids, {**options, "max_new_tokens": 6},
                                                                                np.random.default_rng(0))
    assert len(greedy) == 6
    stop = greedy[-1]  # pretend the last token ends the text: generation stops at its first occurrence
    stop_at = ov_flavor._OpenVINOModelWrapper(runner, tokenizer, [stop])
    expected = greedy[: greedy.index(stop)]
    assert stop_at.generate_ids(ids, {**options, "max_new_tokens": 6}, np.random.default_rng(0)) == expected
    ignoring = {**options, "max_new_tokens": 6, "ignore_eos": True}
    assert stop_at.generate_ids(ids, ignoring, np.random.default_rng(0)) == greedy


def test_pyfunc_input_errors(logged: Logged, store: Logged) -> None:
    model = logged.pyfunc_model
    with pytest.raises(MlflowException, match="max_new_tokens must be positive"):
        model.predict([PROMPT], params={"max_new_tokens": 0})
    small = mlflow.pyfunc.load_model(store.model_uri, model_config={"max_context": 4})
    with pytest.raises(MlflowException, match="does not fit the context of 4"):
        small.predict(["a prompt that is longer than four tokens for sure"], params={"max_new_tokens": 2})
    assert len(small.predict(["Hi"], params={"max_new_tokens": 50, "ignore_eos": True})) == 1  # clipped to the context
    with pytest.raises(EdgeError, match="'NPU' is not present"):
        mlflow.pyfunc.load_model(store.model_uri, model_config={"device": "NPU"})


def test_runtime_settings_at_load_time(store: Logged, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = mlflow.pyfunc.load_model(store.model_uri, model_config={"threads": 1, "inference_precision": "F32"})
    assert runner.get_raw_model().config == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 1,
                                             "INFERENCE_PRECISION_HINT": "f32"}
    monkeypatch.setenv("MLFLOW_EDGE_OPENVINO_PERFORMANCE_HINT", "THROUGHPUT")  # the environment wins
    runner = mlflow.pyfunc.load_model(store.model_uri, model_config={"performance_hint": "LATENCY"})
    assert runner.get_raw_model().config == {"PERFORMANCE_HINT": "THROUGHPUT"}


def test_log_model_in_fixture_store(tracking_uri: str, ir: Artifact) -> None:
    with mlflow.start_run() as run:
        info = ov_flavor.log_model(ir.path, name="model", registered_model_name="edge-openvino")
    assert info.run_id == run.info.run_id
    assert info.flavors[ov_flavor.FLAVOR_NAME]["model_dir"] == "model"
    assert mlflow.MlflowClient().get_registered_model("edge-openvino").name == "edge-openvino"
    assert mlflow.pyfunc.load_model(info.model_uri).predict([PROMPT], params={"max_new_tokens": 2})


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())


@pytest.mark.slow
def test_models_serve(logged: Logged, tmp_path: Path) -> None:
    uri, model_uri = logged.tracking_uri, logged.model_uri
    port = _free_port()
    loopback = "127.0.0.1,localhost"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "NO_PROXY": loopback, "no_proxy": loopback}
    # the server runs `uvicorn` through bash, found on PATH: put this interpreter's bin folder first
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    log = open(tmp_path / "serve.log", "w")
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-p", str(port), "--host", "127.0.0.1"]
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"server exited with {server.returncode}:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready in 120 s:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)

        status, body = _post(f"{base}/invocations", {"inputs": [PROMPT], "params": {"max_new_tokens": 8}})
        assert status == 200
        assert isinstance(body["predictions"], list) and len(body["predictions"]) == 1
        assert isinstance(body["predictions"][0], str) and body["predictions"][0].strip()
        assert body["predictions"] == logged.pyfunc_model.predict([PROMPT], params={"max_new_tokens": 8})

        status, records = _post(
            f"{base}/invocations", {"dataframe_records": [{"prompt": PROMPT}], "params": {"max_new_tokens": 8}}
        )
        assert status == 200 and records["predictions"] == body["predictions"]
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
        log.close()
