"""Every flavor answers the same request the same way under a real ``mlflow models serve``: the tiny Llama as an F16
GGUF and as an f16 OpenVINO IR, each logged through ``flavors.log_artifact_model`` and served on its own port."""

from __future__ import annotations

import math

import pytest

from mlflow_edge import workflow

pytest.importorskip("llama_cpp")
pytest.importorskip("openvino")

PROMPT = "The capital of France is"
CONTRACT_PARAMS = {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "stop": [], "seed": 0,
                   "repetition_penalty": 1.0, "chat": False}
REFUSED = [
    ({"max_tokens": -1}, "max_tokens must be from 1 to 256 (the model's context), got -1"),
    ({"max_tokens": 10**9}, "max_tokens must be from 1 to 256 (the model's context), got 1000000000"),
    ({"bogus": 1}, "unknown param 'bogus' (known: chat, max_tokens, repetition_penalty, seed, stop, temperature, "
                   "top_k, top_p)"),
    ({"temperature": math.nan}, "temperature must be a finite number >= 0, got nan"),
    ({"top_p": 1.5}, "top_p must be a finite number in (0, 1], got 1.5"),
    ({"stop": "."}, "Value must be a 1D array with shape (-1,) for param 'stop'"),  # MLflow's own type check
]


@pytest.fixture(scope="module")
def served_models(tiny_source, tmp_path_factory: pytest.TempPathFactory, log_in_new_store) -> list:
    """The tiny Llama in each format, logged with a context of 256 tokens (cached conversions)."""
    gguf = workflow.convert(tiny_source, "llamacpp", "f16")
    ir = workflow.convert(tiny_source, "openvino", "f16")
    return [log_in_new_store(tmp_path_factory.mktemp("gguf-store"), gguf, n_ctx=256),
            log_in_new_store(tmp_path_factory.mktemp("ir-store"), ir, max_context=256)]


@pytest.mark.slow
def test_every_flavor_serves_the_same_request_contract(served_models, serve) -> None:
    answers = []
    for logged, server in zip(served_models, serve(*served_models)):
        status, body = server.invoke({"inputs": [PROMPT], "params": CONTRACT_PARAMS})
        assert status == 200, (body, server.log_tail())
        assert list(body) == ["predictions"] and len(body["predictions"]) == 1
        assert isinstance(body["predictions"][0], str) and body["predictions"][0]
        assert body["predictions"] == logged.pyfunc_model.predict([PROMPT], params=CONTRACT_PARAMS)
        answers.append(body)
        status, records = server.invoke({"dataframe_records": [{"prompt": PROMPT}], "params": {"max_tokens": 4}})
        assert status == 200 and records == body  # the defaults are the contract's

        for params, reason in REFUSED:
            status, error = server.invoke({"inputs": [PROMPT], "params": params})
            assert status == 400, (params, error)
            assert error["error_code"] == "INVALID_PARAMETER_VALUE"
            # MLflow's scoring server puts its own "Failed to predict data '…'." line before the model's reason
            assert error["message"].splitlines()[-1].startswith("Error: "), error
            assert reason in error["message"].splitlines()[-1], error
    assert [list(a) for a in answers] == [["predictions"], ["predictions"]]
