"""The mlx flavor against real mlx-lm (the tiny Llama as a 4-bit MLX folder) and a real sqlite MLflow store."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from mlflow_edge import artifacts, cache, flavors
from mlflow_edge.backends.base import Artifact
from mlflow_edge.backends.mlx import MLXBackend, MLXRunner
from mlflow_edge.errors import EdgeError
from mlflow_edge.flavors import _common
from mlflow_edge.flavors import mlx as mlx_flavor
from mlflow_edge.sources import SourceModel

pytest.importorskip("mlx_lm")

PROMPT = "The capital of France is"
PROVENANCE = {"mlflow_edge": {"precision": "q4_g64", "source_name": "tiny", "options": {"q_bits": 4}, "shape": (1, 2)}}
SKELETON_FILES = {"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "code"}
CONTRACT_PARAMS = {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "stop": [], "seed": 0,
                   "repetition_penalty": 1.0, "chat": False}


def as_ids(tokens: list[int]) -> str:
    return " ".join(map(str, tokens))


def make_adapter(model_folder: Path, out: Path, num_layers: int) -> Path:
    """A LoRA adapter as ``mlx_lm.lora`` saves one (trainable parameters and config), non-zero so it shows."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(model_folder)
    model.freeze()
    lora = {"rank": 4, "dropout": 0.0, "scale": 10.0}
    linear_to_lora_layers(model, num_layers, lora)
    mx.random.seed(0)
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), {
        name: mx.random.normal(value.shape) * 0.05 if name.endswith("lora_b") else value
        for name, value in tree_flatten(model.trainable_parameters())})
    (out / "adapter_config.json").write_text(json.dumps({"num_layers": num_layers, "lora_parameters": lora}))
    return out


@pytest.fixture(scope="module")
def q4(tiny_source: SourceModel) -> Artifact:
    """The tiny Llama as a 4-bit MLX folder (cached, from the cached float32 conversion)."""
    return artifacts.quantize(tiny_source, artifacts.convert(tiny_source, "mlx", "float32"), "q4_g64")


@pytest.fixture(scope="module")
def logged(q4: Artifact, tmp_path_factory: pytest.TempPathFactory, log_in_new_store):
    """One model logged in a run of a module-wide sqlite store, loaded as pyfunc."""
    return log_in_new_store(tmp_path_factory.mktemp("store"), q4, max_context=256)


@pytest.fixture(scope="module")
def adapter(q4: Artifact, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(q4.path, tmp_path_factory.mktemp("lora") / "adapters", num_layers=2)


def test_save_model_writes_flavor_folder_code_and_environment(q4: Artifact, tmp_path: Path) -> None:
    path = tmp_path / "model"
    mlx_flavor.save_model(q4.path, path, metadata=PROVENANCE, max_context=1024)
    model = Model.load(str(path))
    conf = model.flavors[mlx_flavor.FLAVOR_NAME]
    assert conf["data"] == "model" and conf["model_files"] == ["model.safetensors"] and conf["code"] == "code"
    assert conf["model_sha256"] == {"model.safetensors": cache.sha256_file(q4.path / "model.safetensors")}
    assert conf["max_context"] == 1024 and conf["adapter"] is None
    assert conf["mlx_version"] == "0.32.4" and conf["mlx_lm_version"] == "0.31.3"
    assert model.metadata == {"mlflow_edge": {**PROVENANCE["mlflow_edge"], "shape": [1, 2]}}
    pyfunc_conf = model.flavors["python_function"]
    assert pyfunc_conf["loader_module"] == "mlflow_edge.flavors.mlx" and pyfunc_conf["data"] == "model"
    assert pyfunc_conf["config"] == {"max_context": 1024}
    assert {p.name for p in path.iterdir()} == SKELETON_FILES | {"model"}
    stored = {p.name for p in (path / "model").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= stored
    assert not {"artifact.json", "key.json", ".complete"} & stored
    assert (path / "code" / "mlflow_edge" / "flavors" / "mlx.py").is_file()
    requirements = (path / "requirements.txt").read_text().splitlines()
    for package in ("mlflow==", "mlx==", "mlx-lm==", "mlx-cpu==", "numpy==", "pandas=="):
        assert any(r.startswith(package) for r in requirements), requirements
    assert not any("mlflow-edge" in r or "mlflow_edge" in r for r in requirements)


def test_save_model_refuses_non_empty_dir_bad_settings_and_bad_folders(q4: Artifact, tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.mkdir()
    (path / "keep.txt").write_text("x")
    with pytest.raises(MlflowException, match="already exists and is not empty"):
        mlx_flavor.save_model(q4.path, path)
    assert [p.name for p in path.iterdir()] == ["keep.txt"]
    with pytest.raises(MlflowException, match="metadata must be JSON-serializable"):
        mlx_flavor.save_model(q4.path, tmp_path / "a", metadata={"mlflow_edge": {"path": Path("x")}})
    with pytest.raises(MlflowException, match="max_context must be positive"):
        mlx_flavor.save_model(q4.path, tmp_path / "b", max_context=0)
    broken = tmp_path / "broken"
    shutil.copytree(q4.path, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(EdgeError, match="truncated or corrupt safetensors") as exc:
        mlx_flavor.save_model(broken, tmp_path / "c")
    assert "\n" not in str(exc.value)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(q4.path / name, bare / name)
    with pytest.raises(EdgeError, match="no tokenizer in"):
        mlx_flavor.save_model(bare, tmp_path / "d")
    with pytest.raises(EdgeError, match="no MLX model"):
        mlx_flavor.save_model(tmp_path / "missing", tmp_path / "e")
    assert not any((tmp_path / name).exists() for name in "abcde")


def test_logged_model_has_contract_provenance_and_reads_back_as_artifact(logged, use_store, q4) -> None:
    use_store(logged)
    local = Path(mlflow.artifacts.download_artifacts(logged.model_uri))
    model = Model.load(str(local))
    assert {p.name: p.default for p in model.signature.params} == {s.name: s.default for s in _common.CONTRACT}
    assert model.flavors[mlx_flavor.FLAVOR_NAME]["max_context"] == 256
    assert model.metadata["mlflow_edge"] == flavors.provenance(q4)
    artifact = flavors.artifact_from_model(logged.model_uri)  # a logged model back as an artifact to evaluate
    assert artifact.backend == "mlx" and artifact.format == "mlx" and artifact.precision == "q4_g64"
    assert [f.name for f in artifact.files] == ["model.safetensors"] and artifact.path.name == "model"
    assert artifact.size_bytes == q4.size_bytes and artifact.options == dict(q4.options)
    assert flavors.flavor_module(artifact.format) is mlx_flavor
    loaded = MLXBackend().load(artifact, threads=2, context_tokens=32)
    assert loaded.logits([1, 2, 3]).shape == (3, 49152)
    loaded.close()


def test_pyfunc_predict_is_greedy_and_matches_mlx_lm(logged, use_store) -> None:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    use_store(logged)
    model = logged.pyfunc_model
    first = model.predict([PROMPT], params={"max_tokens": 8})
    assert isinstance(first, list) and len(first) == 1 and isinstance(first[0], str) and first[0].strip()
    assert model.predict([PROMPT], params={"max_tokens": 8}) == first
    assert model.predict(PROMPT, params={"max_tokens": 8}) == first
    assert model.predict({"prompt": PROMPT}, params={"max_tokens": 8}) == first
    # the same greedy tokens as mlx-lm's own generate_step on the same folder (load_model gives mlx-lm's pair)
    mlx_model, tokenizer = mlx_flavor.load_model(logged.model_uri)
    ids = tokenizer.encode(PROMPT)
    expected = [int(token) for _, (token, _) in zip(range(8), generate_step(mx.array(ids), mlx_model, max_tokens=8))]
    runner = model.get_raw_model()
    assert isinstance(runner, MLXRunner)
    request = _common.parse_request({"max_tokens": 8}, runner.context_tokens)
    assert _common.generate(runner, ids, request, frozenset(), as_ids) == as_ids(expected)
    assert first[0] == tokenizer.decode(expected, skip_special_tokens=True)


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


@pytest.mark.parametrize(("params", "reason"), [
    ({"max_tokens": 0}, "max_tokens must be from 1 to 256 (the model's context), got 0"),
    ({"max_new_tokens": 8}, "unknown param 'max_new_tokens'"),
    ({"temperature": math.nan}, "temperature must be a finite number >= 0"),
    ({"top_p": 1.5}, "top_p must be a finite number in (0, 1]"),
])
def test_pyfunc_refuses_params_outside_the_contract(logged, params, reason) -> None:
    with pytest.raises(MlflowException) as caught:
        logged.pyfunc_model.predict([PROMPT], params=params)
    assert caught.value.get_http_status_code() == 400 and reason in caught.value.message


def test_context_limits_at_load_time(logged, use_store) -> None:
    use_store(logged)
    small = mlflow.pyfunc.load_model(logged.model_uri, model_config={"max_context": 4})
    with pytest.raises(MlflowException, match="does not fit the context of 4"):
        small.predict(["a prompt that is longer than four tokens for sure"], params={"max_tokens": 2})
    assert len(small.predict(["Hi"], params={"max_tokens": 4})) == 1  # clipped to the room left in the context


def test_adapter_logged_with_the_model_is_applied_at_load(q4: Artifact, adapter: Path, tracking_uri: str) -> None:
    with mlflow.start_run():
        info = flavors.log_artifact_model(q4, name="tuned", adapter_path=adapter, max_context=64)
        plain = mlx_flavor.log_model(q4.path, name="plain", max_context=64)
    conf = info.flavors[mlx_flavor.FLAVOR_NAME]
    assert conf["adapter"] == "adapters"
    assert conf["model_files"] == ["model.safetensors", "adapters/adapters.safetensors"]
    tuned_runner = mlflow.pyfunc.load_model(info.model_uri).get_raw_model()
    plain_runner = mlflow.pyfunc.load_model(plain.model_uri).get_raw_model()
    tokens = list(range(1000, 1016))
    assert abs(tuned_runner.logits(tokens) - plain_runner.logits(tokens)).max() > 1e-2  # the adapter is applied
    mlx_model, _ = mlx_flavor.load_model(info.model_uri)
    assert type(mlx_model.model.layers[1].self_attn.q_proj).__name__ == "LoRALinear"
    artifact = flavors.artifact_from_model(info.model_uri)  # the adapter counts in its size, as the runner applies it
    assert artifact.size_bytes == q4.size_bytes + (adapter / "adapters.safetensors").stat().st_size
    assert abs(MLXBackend().load(artifact, 2, 64).logits(tokens) - tuned_runner.logits(tokens)).max() == 0


def test_an_adapter_of_another_model_is_refused(q4: Artifact, adapter: Path, tmp_path: Path) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    foreign = tmp_path / "foreign"
    shutil.copytree(adapter, foreign)
    (foreign / "adapter_config.json").write_text(json.dumps({**config, "lora_parameters": {
        **config["lora_parameters"], "rank": 8}}))  # its weights are rank 4
    with pytest.raises(EdgeError, match="does not match the base model") as exc:
        mlx_flavor.save_model(q4.path, tmp_path / "model", adapter_path=foreign)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "model").exists()


def test_log_model_in_fixture_store(tracking_uri: str, q4: Artifact) -> None:
    with mlflow.start_run() as run:
        info = mlx_flavor.log_model(q4.path, name="model", registered_model_name="edge-mlx", max_context=64)
    assert info.run_id == run.info.run_id
    assert info.flavors[mlx_flavor.FLAVOR_NAME]["data"] == "model"
    assert mlflow.MlflowClient().get_registered_model("edge-mlx").name == "edge-mlx"
    assert mlflow.pyfunc.load_model(info.model_uri).predict([PROMPT], params={"max_tokens": 2})


@pytest.mark.slow
def test_models_serve_answers_the_contract(logged, serve, use_store) -> None:
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
