"""The gguf flavor against real llama.cpp (SmolLM2-135M Q4_1) and a real sqlite MLflow store."""

from __future__ import annotations

import dataclasses
import json
import os
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
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from mlflow_edge.backends.base import EdgeError
from mlflow_edge.flavors import gguf

pytest.importorskip("llama_cpp")

PROMPT = "The capital of France is"
METADATA_CONFIG = {
    "precision": "Q4_1", "source_name": "SmolLM2-135M-Instruct", "source_sha256": "0" * 64, "options": {"pure": False},
}


@dataclasses.dataclass(frozen=True)
class Logged:
    tracking_uri: str
    model_uri: str
    pyfunc_model: mlflow.pyfunc.PyFuncModel


@pytest.fixture(scope="module")
def logged(demo_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Logged:
    """One model logged in a run of a module-wide sqlite store (logging copies 98 MB, so once), loaded as pyfunc."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous, cwd = mlflow.get_tracking_uri(), os.getcwd()
    os.chdir(root)  # the default artifact root is ./mlruns
    try:
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run():
            info = gguf.log_model(demo_gguf, name="model", metadata_config=METADATA_CONFIG, n_ctx=512)
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


def test_save_model_writes_flavor_and_only_the_gguf(demo_gguf: Path, tmp_path: Path) -> None:
    path = tmp_path / "model"
    gguf.save_model(demo_gguf, path, metadata_config={**METADATA_CONFIG, "shape": (1, 2)}, n_ctx=1024)

    conf = Model.load(str(path)).flavors[gguf.FLAVOR_NAME]
    assert conf["gguf_file"] == "model.gguf"
    assert conf["n_ctx"] == 1024
    assert conf["llama_cpp_python_version"]
    assert conf["gguf_sha256"] == gguf.cache.sha256_file(demo_gguf)
    assert conf["precision"] == "Q4_1" and conf["options"] == {"pure": False} and conf["shape"] == [1, 2]
    pyfunc_conf = Model.load(str(path)).flavors["python_function"]
    assert pyfunc_conf["loader_module"] == "mlflow_edge.flavors.gguf" and pyfunc_conf["data"] == "model.gguf"
    environment_files = {"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt"}
    assert {p.name for p in path.iterdir()} == environment_files | {"model.gguf"}
    assert (path / "model.gguf").stat().st_size == demo_gguf.stat().st_size


def test_save_model_refuses_non_empty_dir(demo_gguf: Path, tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.mkdir()
    (path / "keep.txt").write_text("x")
    with pytest.raises(MlflowException, match="already exists and is not empty"):
        gguf.save_model(demo_gguf, path)
    assert [p.name for p in path.iterdir()] == ["keep.txt"]


def test_save_model_refuses_bad_metadata_config(demo_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(MlflowException, match="JSON-serializable"):
        gguf.save_model(demo_gguf, tmp_path / "a", metadata_config={"path": Path("x")})
    with pytest.raises(MlflowException, match="reserved"):
        gguf.save_model(demo_gguf, tmp_path / "b", metadata_config={"n_ctx": 4})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_corrupt_gguf_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(1024))
    with pytest.raises(EdgeError, match="not a valid GGUF"):
        gguf.save_model(junk, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_truncated_gguf_is_refused(demo_gguf: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with open(demo_gguf, "rb") as src:
        truncated.write_bytes(src.read(10 * 1024 * 1024))
    with pytest.raises(EdgeError, match="GGUF"):
        gguf.save_model(truncated, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_logged_model_has_signature_and_requirements(store: Logged) -> None:
    local = Path(mlflow.artifacts.download_artifacts(store.model_uri))
    model = Model.load(str(local))
    params = {p.name: p.default for p in model.signature.params}
    assert params == {
        "max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "top_k": 40, "repeat_penalty": 1.0, "seed": 0,
        "chat": False,
    }
    assert model.signature.inputs.to_dict() == [{"type": "string", "required": True}]
    assert model.flavors[gguf.FLAVOR_NAME]["n_ctx"] == 512
    assert model.flavors[gguf.FLAVOR_NAME]["source_name"] == "SmolLM2-135M-Instruct"
    requirements = (local / "requirements.txt").read_text().splitlines()
    assert any(r.startswith("llama-cpp-python==") for r in requirements)
    assert any(r.startswith("mlflow-edge==") for r in requirements)
    assert any(r.startswith("mlflow==") for r in requirements)


def test_pyfunc_predict_is_greedy_and_deterministic(logged: Logged) -> None:
    first = logged.pyfunc_model.predict([PROMPT], params={"max_tokens": 8})
    assert isinstance(first, list) and len(first) == 1
    assert isinstance(first[0], str) and first[0].strip()
    assert logged.pyfunc_model.predict([PROMPT], params={"max_tokens": 8}) == first
    assert logged.pyfunc_model.predict(PROMPT, params={"max_tokens": 8}) == first
    assert logged.pyfunc_model.predict({"prompt": PROMPT}, params={"max_tokens": 8}) == first


def test_pyfunc_predict_dataframe_and_chat(logged: Logged) -> None:
    frame = pd.DataFrame({"prompt": [PROMPT, "One, two, three,"]})
    outputs = logged.pyfunc_model.predict(frame, params={"max_tokens": 4})
    assert len(outputs) == 2 and all(isinstance(o, str) and o for o in outputs)
    assert logged.pyfunc_model.predict({"prompt": [PROMPT, "One, two, three,"]}, params={"max_tokens": 4}) == outputs
    chat = logged.pyfunc_model.predict([PROMPT], params={"max_tokens": 8, "chat": True})
    assert len(chat) == 1 and isinstance(chat[0], str) and chat[0].strip()


def test_pyfunc_input_forms_without_schema(logged: Logged) -> None:
    """The loader's own input handling (what a signature-less caller sees)."""
    wrapper = gguf._GGUFModelWrapper(logged.pyfunc_model.get_raw_model())
    expected = wrapper.predict([PROMPT], {"max_tokens": 2})
    assert wrapper.predict(PROMPT, {"max_tokens": 2}) == expected
    assert wrapper.predict({"prompt": PROMPT}, {"max_tokens": 2}) == expected
    assert wrapper.predict(pd.DataFrame({"text": [PROMPT]}), {"max_tokens": 2}) == expected
    with pytest.raises(MlflowException, match="strings"):
        wrapper.predict([1, 2])


def test_load_model_returns_llama(store: Logged) -> None:
    import llama_cpp

    llm = gguf.load_model(store.model_uri, n_ctx=256)
    assert isinstance(llm, llama_cpp.Llama)
    assert llm.n_ctx() == 256
    assert isinstance(llm.create_completion(PROMPT, max_tokens=2, temperature=0.0)["choices"][0]["text"], str)
    # pyfunc's model_config overrides the saved n_ctx
    assert mlflow.pyfunc.load_model(store.model_uri, model_config={"n_ctx": 256}).get_raw_model().n_ctx() == 256


def test_log_model_in_fixture_store(tracking_uri: str, demo_gguf: Path) -> None:
    with mlflow.start_run() as run:
        info = gguf.log_model(demo_gguf, name="model", registered_model_name="edge-gguf")
    assert info.run_id == run.info.run_id
    assert info.flavors[gguf.FLAVOR_NAME]["gguf_file"] == "model.gguf"
    assert mlflow.MlflowClient().get_registered_model("edge-gguf").name == "edge-gguf"


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

        status, body = _post(f"{base}/invocations", {"inputs": [PROMPT], "params": {"max_tokens": 8}})
        assert status == 200
        assert isinstance(body["predictions"], list) and len(body["predictions"]) == 1
        assert isinstance(body["predictions"][0], str) and body["predictions"][0].strip()

        status, records = _post(
            f"{base}/invocations", {"dataframe_records": [{"prompt": PROMPT}], "params": {"max_tokens": 8}}
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
