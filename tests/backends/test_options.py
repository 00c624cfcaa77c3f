"""Backend options are typed from the backend's own declarations: a bad value is a one-line error, never a guess."""

from __future__ import annotations

import pytest

from mlflow_edge.backends.base import OptionSpec, option_bool, typed_options
from mlflow_edge.errors import EdgeError

SPECS = (
    OptionSpec("imatrix", bool, False),
    OptionSpec("imatrix_chunks", int, 16),
    OptionSpec("ratio", float, None),
    OptionSpec("preset", str, None, choices=("PERFORMANCE", "MIXED")),
    OptionSpec("output_tensor_type", str, None),
)


def test_values_from_the_cli_become_their_declared_types():
    given = {"imatrix": "true", "imatrix_chunks": "8", "ratio": "0.8", "preset": "mixed", "output_tensor_type": "Q8_0"}
    typed = typed_options("demo", SPECS, given)
    assert typed == {"imatrix": True, "imatrix_chunks": 8, "ratio": 0.8, "preset": "MIXED",
                     "output_tensor_type": "Q8_0"}
    assert typed_options("demo", SPECS, {"imatrix": False, "imatrix_chunks": 4, "ratio": None}) == {
        "imatrix": False, "imatrix_chunks": 4}


@pytest.mark.parametrize(("options", "message"), [
    ({"imatrix_chunks": "abc"}, "option imatrix_chunks must be an integer, got 'abc'"),
    ({"imatrix_chunks": 2.5}, "option imatrix_chunks must be an integer, got 2.5"),
    ({"imatrix": "ture"}, "option imatrix must be true or false, got 'ture'"),
    ({"ratio": "most"}, "option ratio must be a number, got 'most'"),
    ({"preset": "fast"}, "unknown preset 'fast' (choose from PERFORMANCE, MIXED)"),
    ({"imatrx": "true"}, "unknown demo option(s): imatrx (choose from imatrix, imatrix_chunks"),
])
def test_bad_values_are_one_line_errors(options, message):
    with pytest.raises(EdgeError) as info:
        typed_options("demo", SPECS, options)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_option_bool_refuses_what_is_not_a_boolean():
    assert [option_bool(v) for v in ("1", "true", " On ", "yes", True)] == [True] * 5
    assert [option_bool(v) for v in ("0", "false", "OFF", "no", False)] == [False] * 5
    for bad in ("ture", "", "2", None):
        with pytest.raises(EdgeError, match="not a boolean"):
            option_bool(bad)
