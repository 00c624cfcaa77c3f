"""Per-layer recipes on the MLX backend, on the tiny random Llama with real mlx-lm: the ``recipe.json`` of mixed and
dynamic artifacts re-applies to the same weights byte for byte, a hand-written recipe gives each layer its bits, and
a recipe that does not fit the model is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlflow_edge import artifacts
from mlflow_edge.backends.base import Artifact
from mlflow_edge.backends.mlx import RECIPE_FILE, MLXBackend, check_recipe, read_recipe
from mlflow_edge.errors import EdgeError
from mlflow_edge.evaluation.data import calibration_text
from mlflow_edge.recipes import Recipe, Rule
from mlflow_edge.sources import SourceModel
from tests.backends import recipe_files
from tests.backends.recipe_files import one_line

pytest.importorskip("mlx_lm")

TOKENS = list(range(1000, 1040))
SMALL_CALIBRATION = {"num_samples": 2, "sequence_length": 32}


# -- helpers -------------------------------------------------------------------------------------------------------
def write_recipe(path: Path, rules: list[tuple[str, str]], **fields: Any) -> Path:
    return recipe_files.write_recipe(path, rules, **{"backend": "mlx", "default_type": "q4_g64", **fields})


def layer_entries(artifact: Artifact) -> dict[str, Any]:
    """config.json's per-layer quantization entries."""
    quantization = json.loads((artifact.path / "config.json").read_text())["quantization"]
    return {name: entry for name, entry in quantization.items() if isinstance(entry, dict)}


def tensors(artifact: Artifact) -> dict[str, tuple[str, tuple[int, ...]]]:
    """dtype and shape of every tensor in the artifact's weights, as mlx reads them."""
    import mlx.core as mx

    weights: dict[str, Any] = {}
    for file in artifact.files:
        weights.update(mx.load(str(file)))
    return {name: (str(value.dtype), tuple(value.shape)) for name, value in weights.items()}


def assert_same_weights(one: Artifact, other: Artifact) -> None:
    assert [f.name for f in one.files] == [f.name for f in other.files]
    for mine, theirs in zip(one.files, other.files):
        assert mine.read_bytes() == theirs.read_bytes(), mine.name


def assert_reapplies(backend: MLXBackend, base: Artifact, artifact: Artifact, out: Path) -> Artifact:
    """``artifact``'s recipe.json applied to ``base`` gives the same weights and the same recipe back."""
    recipe_file = artifact.path / RECIPE_FILE
    assert artifact.options["recipe_sha256"] == read_recipe(recipe_file).digest()
    again = backend.quantize(base, out, "MIXED", {"recipe": str(recipe_file)})
    assert again.precision == "mixed" and again.options["recipe"] == str(recipe_file)
    assert_same_weights(again, artifact)
    theirs = layer_entries(artifact)  # the layers it recorded (dynamic_*: only the high ones) are recorded alike
    assert all(theirs[name] | entry == entry for name, entry in layer_entries(again).items() if name in theirs)
    assert (again.path / RECIPE_FILE).read_bytes() == recipe_file.read_bytes()  # every layer read back alike
    assert again.options["recipe_sha256"] == artifact.options["recipe_sha256"]
    return again


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backend() -> MLXBackend:
    return MLXBackend()


@pytest.fixture(scope="module")
def base(tiny_source: SourceModel) -> Artifact:
    """The tiny Llama (2 layers, 256 wide, tied embeddings: no lm_head) at float32 (cached)."""
    return artifacts.convert(tiny_source, "mlx", "float32")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlx-recipe")


# -- extraction and re-application ---------------------------------------------------------------------------------
def test_mixed_recipe_is_extracted_and_reapplies_bit_identically(backend: MLXBackend, base: Artifact,
                                                                 root: Path) -> None:
    mixed = backend.quantize(base, root / "mixed_3_6", "mixed_3_6", {"q_group_size": 32})
    recipe = read_recipe(mixed.path / RECIPE_FILE)
    assert (recipe.backend, recipe.architecture, recipe.default_type) == ("mlx", "llama", "q3_g32")
    assert recipe.rules == (Rule(r"^model\.layers\.1\.self_attn\.v_proj$", "q6_g32"),
                            Rule(r"^model\.layers\.1\.mlp\.down_proj$", "q6_g32"))
    assert recipe.source_sha256 == base.source_sha256
    assert_reapplies(backend, base, mixed, root / "mixed_3_6-again")


@pytest.mark.slow
def test_dynamic_recipe_reapplies_bit_identically(backend: MLXBackend, base: Artifact, tiny_source: SourceModel,
                                                  root: Path) -> None:
    # low layers are quantized at the model-wide setting and have no entry of their own: their scales say so
    dynamic = backend.quantize(base, root / "dynamic", "dynamic_5.5bpw", SMALL_CALIBRATION,
                               calibration=calibration_text(), source=tiny_source)
    recipe = read_recipe(dynamic.path / RECIPE_FILE)
    assert {rule.type for rule in recipe.rules} | {recipe.default_type} == {"q4_g64", "q5_g64"}
    assert len(recipe.rules) == min(len(layer_entries(dynamic)), 15 - len(layer_entries(dynamic)))
    assert_reapplies(backend, base, dynamic, root / "dynamic-again")


def test_uniform_artifacts_carry_no_recipe(backend: MLXBackend, base: Artifact, root: Path) -> None:
    uniform = backend.quantize(base, root / "q4", "q4_g64")
    assert not (uniform.path / RECIPE_FILE).exists() and "recipe_sha256" not in uniform.options


# -- a hand-written recipe -----------------------------------------------------------------------------------------
def test_hand_written_recipe_gives_each_layer_its_bits(backend: MLXBackend, base: Artifact, root: Path) -> None:
    from mlflow_edge.backends.mlx import MLXRunner

    recipe_file = write_recipe(root / "hand.json", [
        ("embed_tokens", "q8_g64"),  # tied: the output layer too
        (r"layers\.1\.", "Q8_G32"),  # names are case-insensitive
        (r"layers\.0\.self_attn\.k_proj$", "float32"),  # left unquantized
    ])
    artifact = backend.quantize(base, root / "hand", "mixed", {"recipe": str(recipe_file)})
    entries = layer_entries(artifact)
    assert entries["model.embed_tokens"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert entries["model.layers.1.mlp.down_proj"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert entries["model.layers.0.mlp.down_proj"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert "model.layers.0.self_attn.k_proj" not in entries and len(entries) == 14
    found = tensors(artifact)
    vocab = found["model.embed_tokens.weight"][1][0]
    assert found["model.embed_tokens.weight"] == ("mlx.core.uint32", (vocab, 256 * 8 // 32))
    assert found["model.embed_tokens.scales"] == ("mlx.core.float32", (vocab, 256 // 64))
    assert found["model.layers.1.mlp.down_proj.weight"] == ("mlx.core.uint32", (256, 512 * 8 // 32))
    assert found["model.layers.1.mlp.down_proj.scales"][1] == (256, 512 // 32)
    assert found["model.layers.0.mlp.down_proj.weight"] == ("mlx.core.uint32", (256, 512 * 4 // 32))
    assert found["model.layers.0.self_attn.k_proj.weight"] == ("mlx.core.float32", (128, 256))
    assert "model.layers.0.self_attn.k_proj.scales" not in found
    extracted = read_recipe(artifact.path / RECIPE_FILE)  # the same assignment, exact per layer
    assert extracted.default_type == "q8_g32" and len(extracted.rules) == 8
    assert extracted.type_of("model.layers.0.self_attn.k_proj") == "float32"
    runner = MLXRunner(artifact.path, threads=2, context_tokens=64)
    try:
        assert np.isfinite(runner.logits(TOKENS)).all()
    finally:
        runner.close()
    assert_reapplies(backend, base, artifact, root / "hand-again")


# -- refusals ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rules, fields, reason", [
    ([("embed", "q8_g64")], {"architecture": "qwen2"}, "another architecture (qwen2); this model is llama"),
    ([("embed", "Q8_0")], {"backend": "llamacpp"}, "another backend (llamacpp), not mlx"),
    ([(r"^lm_head$", "q8_g64")], {}, "pattern '^lm_head$' matches no quantizable tensor"),
    ([(r"^token_embd\.weight$", "q8_g64")], {}, "matches no quantizable tensor"),
    ([("down_proj", "q7_g64")], {}, "type q7_g64 (pattern 'down_proj') is not supported by mlx"),
    ([("down_proj", "q8_g64")], {"default_type": "q4_g16"}, "default_type q4_g16 is not supported by mlx"),
    ([("down_proj", "float16")], {}, "keeps unquantized layers at float32 (set dtype=float16"),
    ([(".", "float32")], {"default_type": "float32"}, "leaves every layer unquantized"),
])
def test_recipes_that_do_not_fit_are_refused_before_writing(backend: MLXBackend, base: Artifact, tmp_path: Path,
                                                            rules, fields, reason) -> None:
    recipe_file = write_recipe(tmp_path / "recipe.json", rules, **fields)
    with pytest.raises(EdgeError) as exc:
        backend.quantize(base, tmp_path / "out", "mixed", {"recipe": str(recipe_file)})
    assert reason in one_line(exc)
    assert not (tmp_path / "out").exists()


def test_bad_recipe_files_and_options_are_refused_before_writing(backend: MLXBackend, base: Artifact,
                                                                 tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('{"mlflow_edge_recipe": 1, "backend": ')
    good = write_recipe(tmp_path / "good.json", [("embed", "q8_g64")])
    for precision, options, reason in (
        ("mixed", {"recipe": str(tmp_path / "broken.json")}, "is not JSON"),
        ("mixed", {"recipe": str(tmp_path / "missing.json")}, "is not a file"),
        ("MIXED", {}, "precision mixed needs recipe=<a recipe JSON file>"),
        ("q4_g64", {"recipe": str(good)}, "recipe do(es) not apply to q4_g64 (a recipe applies with precision mixed)"),
    ):
        with pytest.raises(EdgeError) as exc:
            backend.quantize(base, tmp_path / "out", precision, options)
        assert reason in one_line(exc)
        assert not (tmp_path / "out").exists()


def test_group_sizes_must_divide_the_layers_they_are_given_to() -> None:
    recipe = Recipe("mlx", "llama", "q4_g32", (Rule("down_proj", "q4_g128"),))
    check_recipe(recipe, {"model.layers.0.mlp.up_proj": 192, "model.layers.0.mlp.down_proj": 256}, "llama", "float32")
    with pytest.raises(EdgeError) as exc:
        check_recipe(recipe, {"model.layers.0.mlp.down_proj": 192}, "llama", "float32")
    assert "type q4_g128 does not divide layer model.layers.0.mlp.down_proj (192 wide)" in one_line(exc)
