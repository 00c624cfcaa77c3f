"""The onnx format's flavor against the real ONNX Runtime GenAI runtime (the tiny Llama, int4 RTN), a real sqlite
MLflow store and a real ``mlflow models serve``."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from mlflow_edge import artifacts, cache, flavors
from mlflow_edge.backends.base import Artifact
from mlflow_edge.backends.onnxruntime import MODEL_FILE, ONNXRuntimeBackend, ONNXRuntimeGenAIRunner
from mlflow_edge.errors import EdgeError
from mlflow_edge.flavors import _common
from mlflow_edge.flavors import onnx as onnx_flavor
from mlflow_edge.sources import SourceModel

og = pytest.importorskip("onnxruntime_genai")

PROMPT = "The capital of France is"
DATA = MODEL_FILE + ".data"
PROVENANCE = {"mlflow_edge": {"precision": "int4_rtn", "source_name": "tiny", "options": {"block_size": 32},
                              "shape": (1, 2)}}
SKELETON_FILES = {"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "code"}
CONTRACT_PARAMS = {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "stop": [], "seed": 0,
                   "repetition_penalty": 1.0, "chat": False}


@pytest.fixture(scope="module")
def int4(tiny_source: SourceModel) -> Artifact:
    """The tiny Llama as int4 RTN (cached, from the cached fp32 conversion)."""
    base = artifacts.convert(tiny_source, "onnxruntime", "fp32")
    return artifacts.quantize(tiny_source, base, "int4_rtn", {"accuracy_level": 4})


@pytest.fixture(scope="module")
def logged(int4: Artifact, tmp_path_factory: pytest.TempPathFactory, log_in_new_store):
    """One model logged in a run of a module-wide sqlite store, loaded as pyfunc."""
    return log_in_new_store(tmp_path_factory.mktemp("store"), int4, max_context=256)


def test_save_model_writes_flavor_files_code_and_environment(int4: Artifact, tmp_path: Path) -> None:
    path = tmp_path / "model"
    onnx_flavor.save_model(int4.path, path, metadata=PROVENANCE, max_context=512, threads=2)
    model = Model.load(str(path))
    conf = model.flavors[onnx_flavor.FLAVOR_NAME]
    assert "onnx" not in model.flavors  # MLflow's own onnx flavor reads one .onnx file, not this folder
    assert conf["data"] == "model" and conf["model_files"] == [MODEL_FILE, DATA] and conf["code"] == "code"
    sha256 = cache.sha256_file
    assert conf["model_sha256"] == {name: sha256(int4.path / name) for name in (MODEL_FILE, DATA)}
    assert (conf["max_context"], conf["execution_provider"], conf["threads"]) == (512, "cpu", 2)
    assert conf["onnxruntime_genai_version"] == og.__version__
    assert model.metadata == {"mlflow_edge": {**PROVENANCE["mlflow_edge"], "shape": [1, 2]}}
    pyfunc_conf = model.flavors["python_function"]
    assert pyfunc_conf["loader_module"] == "mlflow_edge.flavors.onnx" and pyfunc_conf["data"] == "model"
    assert pyfunc_conf["config"] == {"max_context": 512, "execution_provider": "cpu", "threads": 2}
    assert {p.name for p in path.iterdir()} == SKELETON_FILES | {"model"}
    assert {p.name for p in (path / "model").iterdir()} == {
        MODEL_FILE, DATA, "genai_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
        "quantization.json"}
    assert (path / "code" / "mlflow_edge" / "flavors" / "onnx.py").read_text() == Path(onnx_flavor.__file__).read_text()
    requirements = (path / "requirements.txt").read_text().splitlines()
    for package in ("mlflow==", "onnxruntime-genai==", "onnxruntime==", "onnx==", "numpy==", "pandas=="):
        assert any(r.startswith(package) for r in requirements), requirements
    assert not any(r.startswith(("mlflow-edge", "mlflow_edge", "transformers", "torch")) for r in requirements)
    default = tmp_path / "default"
    onnx_flavor.save_model(int4.path / MODEL_FILE, default)  # the .onnx itself is accepted too
    assert Model.load(str(default)).flavors[onnx_flavor.FLAVOR_NAME]["max_context"] == 1024  # the model's own


def test_save_model_refuses_non_empty_dir_and_bad_settings(int4: Artifact, tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.mkdir()
    (path / "keep.txt").write_text("x")
    with pytest.raises(MlflowException, match="already exists and is not empty"):
        onnx_flavor.save_model(int4.path, path)
    assert [p.name for p in path.iterdir()] == ["keep.txt"]
    for settings, message in (({"max_context": 0}, "max_context must be positive"),
                              ({"max_context": 4096}, "max_context 4096 exceeds the model's context length of 1024"),
                              ({"threads": -1}, "threads must be positive"),
                              ({"execution_provider": "tpu"}, "execution_provider must be one of cpu, cuda, dml")):
        with pytest.raises(MlflowException, match=message):
            onnx_flavor.save_model(int4.path, tmp_path / "bad", **settings)
        assert not (tmp_path / "bad").exists()


def test_damaged_or_incomplete_folders_are_refused(int4: Artifact, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated"
    shutil.copytree(int4.path, truncated)
    (truncated / DATA).write_bytes((truncated / DATA).read_bytes()[:1000])
    with pytest.raises(EdgeError, match="truncated external data file"):
        onnx_flavor.save_model(truncated, tmp_path / "model")
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(int4.path, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(EdgeError, match="no tokenizer.json beside"):
        onnx_flavor.save_model(no_tokenizer, tmp_path / "model")
    with pytest.raises(EdgeError, match="no ONNX Runtime GenAI model folder"):
        onnx_flavor.save_model(tmp_path / "missing", tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_logged_model_has_contract_provenance_and_reads_back_as_artifact(logged, use_store, int4) -> None:
    use_store(logged)
    local = Path(mlflow.artifacts.download_artifacts(logged.model_uri))
    model = Model.load(str(local))
    assert {p.name: p.default for p in model.signature.params} == {s.name: s.default for s in _common.CONTRACT}
    assert model.flavors[onnx_flavor.FLAVOR_NAME]["max_context"] == 256
    assert model.metadata["mlflow_edge"] == flavors.provenance(int4)
    artifact = flavors.artifact_from_model(logged.model_uri)
    assert artifact.backend == "onnxruntime" and artifact.format == "onnx" and artifact.precision == "int4_rtn"
    assert [f.name for f in artifact.files] == [MODEL_FILE, DATA] and artifact.path.name == "model"
    assert artifact.size_bytes == int4.size_bytes and artifact.options == dict(int4.options)
    assert flavors.flavor_module(artifact.format) is onnx_flavor
    runner = ONNXRuntimeBackend().load(artifact, threads=2, context_tokens=32)
    assert runner.logits([1, 2, 3]).shape == (3, 49152)
    runner.close()


def raw_genai_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy generation the way an ONNX Runtime GenAI user writes it (the runtime's own search)."""
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    out: list[int] = []
    while not generator.is_done() and len(out) < new_tokens:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def test_pyfunc_predict_is_greedy_and_matches_raw_genai(logged, use_store) -> None:
    use_store(logged)
    model = logged.pyfunc_model
    first = model.predict([PROMPT], params={"max_tokens": 8})
    assert isinstance(first, list) and len(first) == 1 and isinstance(first[0], str) and first[0].strip()
    assert model.predict([PROMPT], params={"max_tokens": 8}) == first
    assert model.predict(PROMPT, params={"max_tokens": 8}) == first
    assert model.predict({"prompt": PROMPT}, params={"max_tokens": 8}) == first
    # the same greedy tokens as the runtime's own generator on the model load_model returns
    genai_model = onnx_flavor.load_model(logged.model_uri)
    tokenizer = og.Tokenizer(genai_model)
    ids = [int(i) for i in tokenizer.encode(PROMPT)]
    eos = set(tokenizer.eos_token_ids)
    tokens = raw_genai_greedy(genai_model, ids, 8)
    tokens = tokens[: next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]
    assert tokenizer.decode(np.asarray(tokens, dtype=np.int32)) == first[0]
    # the GenAI tokenizer gives the source tokenizer's ids
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(Path(mlflow.artifacts.download_artifacts(logged.model_uri)) / "model")
    assert hf(PROMPT)["input_ids"] == ids
    assert isinstance(model.get_raw_model(), ONNXRuntimeGenAIRunner)


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
    ids = [int(i) for i in wrapper.tokenizer.encode(PROMPT)]
    request = _common.parse_request({"max_tokens": 6}, runner.context_tokens)

    def as_ids(tokens: list[int]) -> str:
        return " ".join(map(str, tokens))

    greedy = [int(t) for t in _common.generate(runner, ids, request, frozenset(), as_ids).split()]
    assert len(greedy) == 6
    stop = greedy[3]  # pretend this token ends the text: generation stops at its first occurrence
    expected = greedy[: greedy.index(stop)]
    eos_wrapper = onnx_flavor._ONNXModelWrapper(runner, wrapper.tokenizer, [stop], wrapper._folder)
    assert eos_wrapper.predict([PROMPT], {"max_tokens": 6}) == [
        wrapper.tokenizer.decode(np.asarray(expected, dtype=np.int32)) if expected else ""]


@pytest.mark.parametrize(("params", "reason"), [
    ({"max_tokens": 0}, "max_tokens must be from 1 to 256 (the model's context), got 0"),
    ({"max_new_tokens": 8}, "unknown param 'max_new_tokens'"),
    ({"ignore_eos": True}, "unknown param 'ignore_eos'"),
    ({"temperature": math.nan}, "temperature must be a finite number >= 0"),
    ({"top_p": 1.5}, "top_p must be a finite number in (0, 1], got 1.5"),
    ({"stop": [1]}, "Failed to validate type and shape for 'stop'"),  # MLflow's own type check
])
def test_pyfunc_refuses_params_outside_the_contract(logged, params, reason) -> None:
    with pytest.raises(MlflowException) as caught:
        logged.pyfunc_model.predict([PROMPT], params=params)
    assert caught.value.get_http_status_code() == 400 and reason in caught.value.message


def test_context_limits_and_provider_errors(logged, use_store, monkeypatch: pytest.MonkeyPatch) -> None:
    use_store(logged)
    small = mlflow.pyfunc.load_model(logged.model_uri, model_config={"max_context": 4, "threads": 1})
    assert small.get_raw_model().session_options == {"intra_op_num_threads": 1}
    with pytest.raises(MlflowException, match="does not fit the context of 4"):
        small.predict(["a prompt that is longer than four tokens for sure"], params={"max_tokens": 2})
    assert len(small.predict(["Hi"], params={"max_tokens": 4})) == 1  # clipped to the room left in the context
    with pytest.raises(EdgeError, match="execution provider 'cuda' is not available here"):
        mlflow.pyfunc.load_model(logged.model_uri, model_config={"execution_provider": "cuda"})
    monkeypatch.setenv("MLFLOW_EDGE_ONNXRUNTIME_EXECUTION_PROVIDER", "dml")  # the environment wins
    with pytest.raises(EdgeError, match="execution provider 'dml' is not available here"):
        mlflow.pyfunc.load_model(logged.model_uri, model_config={"execution_provider": "cpu"})
    with pytest.raises(EdgeError, match="'dml' is not available here"):
        onnx_flavor.load_model(logged.model_uri)


def test_log_model_in_fixture_store(tracking_uri: str, int4: Artifact) -> None:
    with mlflow.start_run() as run:
        info = onnx_flavor.log_model(int4.path, name="model", registered_model_name="edge-onnx", max_context=64)
    assert info.run_id == run.info.run_id
    assert info.flavors[onnx_flavor.FLAVOR_NAME]["data"] == "model"
    assert mlflow.MlflowClient().get_registered_model("edge-onnx").name == "edge-onnx"
    assert mlflow.pyfunc.load_model(info.model_uri).predict([PROMPT], params={"max_tokens": 2})


PROBE = """
import json, sys
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
answer = model.predict([sys.argv[2]], params={"max_tokens": 4})
heavy = sorted(m for m in ("torch", "transformers", "olive") if m in sys.modules)
print(json.dumps({"answer": answer, "heavy": heavy}))
"""


def test_served_model_answers_the_contract_on_the_runtime_alone(logged, serve, use_store) -> None:
    use_store(logged)
    expected = logged.pyfunc_model.predict([PROMPT], params=CONTRACT_PARAMS)
    (server,) = serve(logged)
    status, body = server.invoke({"inputs": [PROMPT], "params": CONTRACT_PARAMS})
    assert status == 200, (body, server.log_tail())
    assert body == {"predictions": expected}
    status, records = server.invoke({"dataframe_records": [{"prompt": PROMPT}], "params": {"max_tokens": 4}})
    assert status == 200 and records == body  # the defaults are the contract's
    for params, reason in (({"max_tokens": 10**9}, "max_tokens must be from 1 to 256 (the model's context)"),
                           ({"bogus": 1}, "unknown param 'bogus'"),
                           ({"temperature": -1.0}, "temperature must be a finite number >= 0")):
        status, error = server.invoke({"inputs": [PROMPT], "params": params})
        assert status == 400 and error["error_code"] == "INVALID_PARAMETER_VALUE", (params, error)
        assert reason in error["message"].splitlines()[-1], error
    # what the server process loads: ONNX Runtime GenAI and the loader, not torch, transformers or Olive
    local = mlflow.artifacts.download_artifacts(logged.model_uri)
    probe = subprocess.run([sys.executable, "-c", PROBE, local, PROMPT], capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result == {"answer": logged.pyfunc_model.predict([PROMPT], params={"max_tokens": 4}), "heavy": []}
