"""Recipes (the file users read, edit and re-apply) and the budgeted allocation over a sensitivity table."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlflow_edge import recipes
from mlflow_edge.errors import EdgeError
from mlflow_edge.recipes import Recipe, Rule

TYPES = {"A": 2, "B": 4, "C": 6, "D": 8}  # bits per weight of four made-up types


def table_of(rows: list[tuple[str, str, int, int, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(recipes.TABLE_COLUMNS))


def hand_made() -> pd.DataFrame:
    """Three tensors: a sensitive small one, a big robust one, and one in between (errors fall with the bits)."""
    rows = []
    for tensor, params, scale in (("head", 100, 50.0), ("body", 1000, 1.0), ("tail", 300, 8.0)):
        for kind, bpw in TYPES.items():
            rows.append((tensor, kind, params, bpw * params, scale * params / 4.0 ** bpw))
    return table_of(rows)


def brute_force(table: pd.DataFrame, budget: float) -> float:
    """The smallest total error of any choice within ``budget``."""
    groups = [list(group.itertuples()) for _, group in table.groupby("tensor", sort=False)]
    return min(sum(r.error for r in pick) for pick in itertools.product(*groups) if sum(r.bits for r in pick) <= budget)


def total(table: pd.DataFrame, allocation: dict[str, str]) -> tuple[float, float]:
    predicted = recipes.predict(table, allocation)
    return predicted["bits"], predicted["error"]


# -- allocation ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [2800, 3000, 4200, 5000, 6800, 7500, 9000, 11200])
def test_allocation_is_optimal_on_a_hand_made_table(budget: int) -> None:
    table = hand_made()
    allocation = recipes.allocate(table, budget)
    assert list(allocation) == ["head", "body", "tail"]  # the table's order, one type each
    bits, error = total(table, allocation)
    assert bits <= budget
    assert error == pytest.approx(brute_force(table, budget), rel=1e-12)


def test_allocation_is_within_one_tensors_error_range_of_the_optimum() -> None:
    """Random tables with uneven types: the bound of the Lagrangian method holds always, the optimum mostly."""
    rng = np.random.default_rng(0)
    exact = 0
    for _ in range(200):
        rows = []
        for t in range(5):
            params = int(rng.integers(10, 100))
            for kind, bpw in TYPES.items():
                if kind == "A" or rng.random() > 0.2:
                    rows.append((f"t{t}", kind, params, bpw * params + int(rng.integers(0, 5)),
                                 float(rng.exponential(10) / bpw ** 2 * params)))
        table = table_of(rows)
        sizes = table.groupby("tensor")["bits"]
        budget = float(rng.uniform(sizes.min().sum(), sizes.max().sum()))
        bits, error = total(table, recipes.allocate(table, budget))
        best = brute_force(table, budget)
        spread = table.groupby("tensor")["error"].agg(lambda e: e.max() - e.min()).max()
        assert bits <= budget and best - 1e-9 <= error <= best + spread
        exact += error <= best + 1e-9
    assert exact >= 190


def test_allocation_uses_the_whole_range() -> None:
    table = hand_made()
    smallest = table.groupby("tensor")["bits"].min().sum()
    largest = table.groupby("tensor")["bits"].max().sum()
    assert set(recipes.allocate(table, smallest).values()) == {"A"}
    assert set(recipes.allocate(table, largest).values()) == {"D"}
    # lossless candidates: no bit is spent where it saves nothing
    lossless = table_of([("x", "A", 10, 20, 0.0), ("x", "B", 10, 40, 0.0), ("y", "A", 10, 20, 5.0),
                         ("y", "B", 10, 40, 1.0)])
    assert recipes.allocate(lossless, 80) == {"x": "A", "y": "B"}


@pytest.mark.parametrize(("budget", "message"), [
    (2799, "is below the smallest size these types reach (2.000 bpw"),
    (11201, "is above the largest size these types reach (8.000 bpw"),
    (float("nan"), "is below the smallest size"),
])
def test_budgets_out_of_reach_are_refused(budget: float, message: str) -> None:
    with pytest.raises(EdgeError) as info:
        recipes.allocate(hand_made(), budget)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("rows", "message"), [
    ([], "the sensitivity table is empty"),
    ([("x", "A", 10, 20, 1.0), ("x", "A", 10, 20, 1.0)], "the same type twice"),
    ([("x", "A", 10, 0, 1.0)], "positive params and bits"),
    ([("x", "A", 10, 20, -1.0)], "non-negative finite errors"),
])
def test_bad_tables_are_refused(rows: list, message: str) -> None:
    with pytest.raises(EdgeError, match=message):
        recipes.allocate(table_of(rows), 100)
    with pytest.raises(EdgeError, match="needs the columns tensor, type, params, bits, error"):
        recipes.allocate(pd.DataFrame({"tensor": ["x"], "type": ["A"]}), 100)


def test_budget_bits_from_bpw_and_from_size() -> None:
    table = hand_made()  # 1400 parameters
    assert recipes.budget_bits(table, target_bpw=4.5) == 4.5 * 1400
    assert recipes.budget_bits(table, target_size_mb=0.001, fixed_bits=1000) == 8000 - 1000  # MB = 1e6 bytes
    for kwargs, message in [({}, "exactly one of target_bpw and target_size_mb"),
                            ({"target_bpw": 4, "target_size_mb": 1}, "exactly one"),
                            ({"target_bpw": 0}, "target_bpw must be a positive number"),
                            ({"target_size_mb": -1}, "target_size_mb must be a positive number"),
                            ({"target_size_mb": 0.0001, "fixed_bits": 8000}, "below the size of what is not")]:
        with pytest.raises(EdgeError, match=message):
            recipes.budget_bits(table, **kwargs)


# -- recipes -------------------------------------------------------------------------------------------------------
def sample_recipe() -> Recipe:
    allocation = {"token_embd.weight": "Q8_0", "blk.1.attn_v.weight": "Q6_K", "blk.10.attn_v.weight": "Q4_K"}
    return recipes.recipe_from_allocation(allocation, backend="demo", architecture="llama", default_type="Q4_K_M",
                                          source_sha256="ab" * 32, budget={"target_bpw": 4.8},
                                          predicted={"bits": 1.0e6, "bpw": 4.79, "error": 0.25},
                                          sensitivity={"types": ["Q4_K", "Q6_K", "Q8_0"]},
                                          settings={"imatrix": True, "imatrix_chunks": 8})


def test_settings_complete_the_options_the_user_left_unset() -> None:
    recipe = sample_recipe()
    assert recipes.with_settings({}, recipe) == {"imatrix": True, "imatrix_chunks": 8}
    assert recipes.with_settings({"imatrix": False, "nthread": 2}, recipe) == {
        "imatrix": False, "imatrix_chunks": 8, "nthread": 2}
    assert recipes.with_settings({"pure": True}, Recipe("demo", "llama", "Q4_0")) == {"pure": True}


def test_a_recipe_from_an_allocation_has_exact_rules() -> None:
    recipe = sample_recipe()
    assert [rule.pattern for rule in recipe.rules] == [
        r"^token_embd\.weight$", r"^blk\.1\.attn_v\.weight$", r"^blk\.10\.attn_v\.weight$"]
    assert recipe.type_of("blk.1.attn_v.weight") == "Q6_K"  # not blk.10's, nor a regex dot's match
    assert recipe.type_of("blk.10.attn_v.weight") == "Q4_K"
    assert recipe.type_of("blk1attn_vxweight") == recipe.type_of("blk.2.attn_v.weight") == "Q4_K_M"


def test_the_first_matching_rule_wins() -> None:
    recipe = Recipe("demo", "llama", "Q4_0", (Rule(r"blk\.0\.", "Q8_0"), Rule("attn_v", "Q6_K")))
    assert recipe.type_of("blk.0.attn_v.weight") == "Q8_0"
    assert recipe.type_of("blk.3.attn_v.weight") == "Q6_K"
    assert recipe.type_of("blk.3.ffn_up.weight") == "Q4_0"


def test_a_recipe_file_round_trips(tmp_path: Path) -> None:
    recipe = sample_recipe()
    path = recipe.save(tmp_path / "recipe.json")
    text = path.read_text()
    assert text == recipe.to_json() and text.startswith('{\n "mlflow_edge_recipe": 1,\n "backend": "demo",')
    assert '  {"pattern": "^blk\\\\.1\\\\.attn_v\\\\.weight$", "type": "Q6_K"},\n' in text  # one rule per line
    loaded = recipes.load_recipe(path)
    assert loaded == recipe and loaded.digest() == recipe.digest()
    assert loaded.to_json() == text  # stable bytes
    assert json.loads(text)["tensor_types"][0] == {"pattern": r"^token_embd\.weight$", "type": "Q8_0"}

    # hand-edited: other whitespace, key order and lower-case types read back as the same recipe
    data = json.loads(text)
    data["tensor_types"] = [{"type": r["type"].lower(), "pattern": r["pattern"]} for r in data["tensor_types"]]
    (tmp_path / "edited.json").write_text(json.dumps(dict(reversed(list(data.items()))), indent=4))
    assert recipes.load_recipe(tmp_path / "edited.json") == recipe
    assert Recipe("demo", "llama", "Q8_0").digest() != recipe.digest()
    plain = Recipe("demo", "llama", "Q8_0")  # no rules: every tensor at the default type
    assert recipes.load_recipe(plain.save(tmp_path / "plain.json")) == plain


@pytest.mark.parametrize(("content", "message"), [
    (None, "is not a file"),
    ("", "is empty"),
    ("{\"mlflow_edge_recipe\": 1,", "is not JSON: Expecting property name"),
    ("[1, 2]", "is not an mlflow-edge recipe (no \"mlflow_edge_recipe\" key)"),
    ({"mlflow_edge_recipe": 2}, "has version 2; this mlflow-edge reads version 1"),
    ({"default_type": None}, "has no \"default_type\""),
    ({"architecture": ""}, "\"architecture\" must be a non-empty string"),
    ("{}", "is not an mlflow-edge recipe"),
    ({"tensor_types": {"a": "b"}}, "\"tensor_types\" must be a list"),
    ({"tensor_types": [{"pattern": "x"}]}, "tensor_types[0] must be {\"pattern\": \"…\", \"type\": \"…\"}"),
    ({"tensor_types": [{"pattern": "x", "type": "Q8_0"}, {"pattern": "ffn_(", "type": "Q8_0"}]},
     "tensor_types[1]: 'ffn_(' is not a valid regular expression"),
    ({"tensor_types": [{"pattern": "(?P<n>ffn)", "type": "Q8_0"}]}, "uses Python-only syntax"),
    ({"tensor_type": []}, "has unknown key(s) tensor_type"),
    ({"budget": 4.8}, "\"budget\" must be an object"),
])
def test_a_file_that_is_no_recipe_is_a_one_line_error(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "recipe.json"
    if isinstance(content, dict):
        data = {"mlflow_edge_recipe": 1, "backend": "demo", "architecture": "llama", "default_type": "Q4_0",
                "tensor_types": [{"pattern": "ffn_down", "type": "Q6_K"}], **content}
        content = json.dumps({k: v for k, v in data.items() if v is not None})
    if content is not None:
        path.write_text(content)
    with pytest.raises(EdgeError) as info:
        recipes.load_recipe(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith(f"recipe {path}")


def test_portable_patterns_pass() -> None:
    for pattern in (r"^blk\.(?:0|1)\.ffn_down", r"attn_(?!v)", r"ffn_(up|gate)\.weight$", "[0-9]+"):
        recipes.check_pattern(pattern)
        re.compile(pattern)


@pytest.mark.parametrize(("recipe", "message"), [
    (Recipe("other", "llama", "Q4_0", (Rule("ffn", "Q8_0"),)), "a recipe for another backend (other), not demo"),
    (Recipe("demo", "qwen2", "Q4_0", (Rule("ffn", "Q8_0"),)),
     "a recipe for another architecture (qwen2); this model is llama"),
    (Recipe("demo", "llama", "Q4_0", (Rule(r"blk\.9\.", "Q8_0"),)),
     "pattern 'blk\\\\.9\\\\.' matches no quantizable tensor of the model (2 tensors, e.g. blk.0.ffn_up.weight)"),
    (Recipe("demo", "llama", "Q4_0", (Rule("ffn", "Q7_K"),)), "type Q7_K (pattern 'ffn') is not supported by demo"),
    (Recipe("demo", "llama", "F16", (Rule("ffn", "Q8_0"),)), "default_type F16 is not supported by demo"),
])
def test_a_recipe_that_does_not_fit_the_model_is_refused(recipe: Recipe, message: str) -> None:
    names = ["blk.0.ffn_up.weight", "blk.0.attn_v.weight"]
    with pytest.raises(EdgeError) as info:
        recipes.validate_against(recipe, names, "llama", ["Q4_0", "Q8_0", "F16"], "demo",
                                 default_types=["Q4_0", "Q8_0"])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_plot_sensitivity_writes_a_png(tmp_path: Path) -> None:
    table = hand_made()
    table.loc[0, "error"] = 0.0  # a lossless entry is drawn at the bottom, not dropped
    path = recipes.plot_sensitivity(table, tmp_path / "sensitivity.png", title="hand-made")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
