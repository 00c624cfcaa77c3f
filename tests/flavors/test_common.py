"""The flavors' shared request contract, sampler and generation loop, without a model (numpy and a fake runtime)."""

from __future__ import annotations

import math
import sys
from typing import Sequence

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

from mlflow_edge.flavors import _common
from mlflow_edge.flavors._mlflow_compat import STRICT_MARK

DEFAULTS = {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "stop": [], "seed": 0,
            "repetition_penalty": 1.0, "chat": False}


def test_contract_is_openai_names_with_defaults_and_the_default_signature():
    schema = _common.default_signature().params
    assert {spec.name: spec.default for spec in schema.params} == DEFAULTS
    assert [spec.name for spec in _common.CONTRACT] == list(DEFAULTS)
    request = _common.parse_request(None, context_tokens=128)
    assert request == _common.Request(64, 0.0, 1.0, 0, (), 0, 1.0, False)
    assert _common.parse_request({"max_tokens": None, "stop": ["\n", "."], "top_k": 5}, 128).stop == ("\n", ".")


@pytest.mark.parametrize(("params", "reason"), [
    ({"max_tokens": -1}, "max_tokens must be from 1 to 128 (the model's context), got -1"),
    ({"max_tokens": 0}, "max_tokens must be from 1"),
    ({"max_tokens": 10**9}, "got 1000000000"),
    ({"max_tokens": 4.0}, "max_tokens must be an integer"),
    ({"max_tokens": True}, "max_tokens must be an integer"),
    ({"temperature": math.nan}, "temperature must be a finite number >= 0, got nan"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"temperature": math.inf}, "temperature must be a finite number"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_p": 0.0}, "top_p must be a finite number in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be"),
    ({"top_k": -1}, "top_k must be from 0"),
    ({"stop": "\n"}, "stop must be a list of non-empty strings"),
    ({"stop": [1]}, "stop must be a list of non-empty strings"),
    ({"stop": [""]}, "stop must be a list of non-empty strings"),
    ({"seed": -1}, "seed must be from 0 to 4294967295"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
    ({"chat": 1}, "chat must be true or false"),
    ({"bogus": 1}, "unknown param 'bogus' (known: chat, max_tokens, repetition_penalty, seed, stop, temperature"),
    ({"max_new_tokens": 8, "repeat_penalty": 1.1}, "unknown params 'max_new_tokens', 'repeat_penalty'"),
])
def test_out_of_contract_params_are_refused_with_one_line(params, reason):
    with pytest.raises(MlflowException) as caught:
        _common.parse_request(params, context_tokens=128)
    assert reason in caught.value.message
    assert caught.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)
    assert caught.value.get_http_status_code() == 400
    assert "\n" not in caught.value.message


def test_mlflow_refuses_undeclared_params_of_registered_loaders_only():
    """The wrap of MLflow's prediction-input validation: names first for our loaders, MLflow's dropping otherwise."""
    _common.refuse_undeclared_params("tests.flavors.fake_loader")
    _common.refuse_undeclared_params("tests.flavors.fake_loader")  # idempotent: wrapped once
    validate = sys.modules["mlflow.pyfunc"]._validate_prediction_input
    assert getattr(validate, STRICT_MARK) and not getattr(validate.__wrapped__, STRICT_MARK, False)
    schema = _common.params_schema()
    with pytest.raises(MlflowException, match="unknown param 'bogus'"):
        validate(["x"], {"bogus": 1, "max_tokens": 2}, None, schema, "tests.flavors.fake_loader")
    _, params = validate(["x"], {"max_tokens": 2}, None, schema, "tests.flavors.fake_loader")
    assert params == {**DEFAULTS, "max_tokens": 2}
    _, params = validate(["x"], {"bogus": 1}, None, schema, "some.other.flavor")  # MLflow's behaviour stays
    assert params == DEFAULTS


def test_prompts_in_every_input_form():
    assert _common.prompts("a") == ["a"]
    assert _common.prompts(["a", "b"]) == ["a", "b"]
    assert _common.prompts({"prompt": "a"}) == ["a"] and _common.prompts({"prompt": ["a", "b"]}) == ["a", "b"]
    assert _common.prompts(pd.DataFrame({"prompt": ["a", "b"]})) == ["a", "b"]
    assert _common.prompts(pd.DataFrame({0: [["a", "b"]]})) == ["a", "b"]
    assert _common.prompts(np.array(["a"])) == ["a"] and _common.prompts([{"prompt": "a"}]) == ["a"]
    with pytest.raises(MlflowException, match="prompts must be strings"):
        _common.prompts([1, 2])
    with pytest.raises(MlflowException, match="'prompt' key"):
        _common.prompts({"text": "a"})


def request(**overrides) -> _common.Request:
    return _common.parse_request(overrides, context_tokens=64)


def test_sampler_greedy_topk_topp_seed_and_penalty():
    logits = np.array([1.0, 3.0, 2.0, 0.5])
    rng = np.random.default_rng(0)
    assert _common.sample_next_token(logits, request(), rng, set()) == 1
    assert _common.sample_next_token(logits, request(temperature=5.0, top_k=1), rng, set()) == 1
    assert _common.sample_next_token(logits, request(temperature=1.0, top_p=0.01), rng, set()) == 1
    # the penalty divides the positive logit of a seen token: greedy moves to the next best
    assert _common.sample_next_token(logits, request(repetition_penalty=2.0), rng, {1}) == 2
    draws = [_common.sample_next_token(logits, request(temperature=1.0), np.random.default_rng(7), set())
             for _ in range(3)]
    assert len(set(draws)) == 1  # one seed, one draw
    spread = {_common.sample_next_token(logits, request(temperature=100.0), rng, set()) for _ in range(200)}
    assert spread == {0, 1, 2, 3}


class FakeRunner:
    """A runtime whose next token is always (last token + 1) modulo the vocabulary, as logits."""

    def __init__(self, context_tokens: int = 16, vocab: int = 10) -> None:
        self.context_tokens = context_tokens
        self.vocab = vocab
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        self.length += len(tokens)
        assert self.length <= self.context_tokens
        logits = np.zeros((len(tokens), self.vocab))
        logits[np.arange(len(tokens)), (np.asarray(tokens) + 1) % self.vocab] = 1.0
        return logits


def decode(ids: list[int]) -> str:
    return "".join(str(i) for i in ids)


def test_generate_stops_at_max_tokens_eos_stop_string_and_context():
    runner = FakeRunner(context_tokens=8)
    assert _common.generate(runner, [0], request(max_tokens=4), frozenset(), decode) == "1234"
    assert _common.generate(runner, [0], request(max_tokens=8), frozenset({5}), decode) == "1234"
    assert _common.generate(runner, [0], request(max_tokens=8, stop=["34", "9"]), frozenset(), decode) == "12"
    assert _common.generate(runner, [0, 1], request(max_tokens=60), frozenset(), decode) == "234567"  # the room left
    with pytest.raises(MlflowException, match="prompt of 8 tokens does not fit the context of 8"):
        _common.generate(runner, list(range(8)), request(), frozenset(), decode)
