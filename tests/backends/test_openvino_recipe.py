"""Per-layer recipes on the OpenVINO backend, on the tiny random Llama with real NNCF: a hand-written recipe gives each
weight its NNCF mode, the ``recipe.json`` of a ``ratio`` < 1 artifact (the layers NNCF's sensitivity kept in
``backup_mode``) re-applies to the same ``openvino_model.bin`` byte for byte, and a recipe that does not fit the model
is refused before anything is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import openvino as ov
import pytest

from mlflow_edge import artifacts, flavors
from mlflow_edge.backends.base import Artifact
from mlflow_edge.backends.openvino import MODEL_BIN, MODEL_XML, RECIPE_FILE, OpenVINOBackend, OpenVINORunner
from mlflow_edge.errors import EdgeError
from mlflow_edge.evaluation.data import calibration_text
from mlflow_edge.recipes import load_recipe
from mlflow_edge.sources import SourceModel
from tests.backends import recipe_files
from tests.backends.recipe_files import one_line

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
# the weight constants of the tiny Llama's IR (tied embeddings: the embedding is the output layer's weight too)
LAYERS = ("self.model.embed_tokens.weight",
          *(f"self.model.layers.{i}.{projection}.weight" for i in range(2) for projection in PROJECTIONS))
# a weight constant's element type at each recipe type, on an f32 IR
ELEMENTS = {"INT8_SYM": "i8", "INT8_ASYM": "u8", "INT4_SYM": "i4", "INT4_ASYM": "u4", "NF4": "nf4", "NONE": "f32"}
TOKENS = list(range(1000, 1032))
SMALL_CALIBRATION = {"subset_size": 4, "calibration_tokens": 32}


# -- helpers -------------------------------------------------------------------------------------------------------
def write_recipe(path: Path, rules: list[tuple[str, str]], **fields: Any) -> Path:
    return recipe_files.write_recipe(path, rules, **{"backend": "openvino", "default_type": "INT4_ASYM", **fields})


def constants(artifact: Artifact) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Element type and shape of every constant of the artifact's IR, by name."""
    model = ov.Core().read_model(str(artifact.path / MODEL_XML))
    return {op.get_friendly_name(): (op.get_element_type().get_type_name(), tuple(op.shape))
            for op in model.get_ops() if op.get_type_name() == "Constant"}


def assert_reapplies(backend: OpenVINOBackend, base: Artifact, artifact: Artifact, out: Path) -> None:
    """``artifact``'s recipe.json applied alone to ``base`` (it records its group size) gives the same IR weights and
    recipe back."""
    recipe_file = artifact.path / RECIPE_FILE
    assert artifact.options["recipe_sha256"] == load_recipe(recipe_file).digest()
    again = backend.quantize(base, out, "MIXED", {"recipe": str(recipe_file)})
    assert again.options["group_size"] == 64
    assert again.precision == "MIXED" and again.options["recipe"] == str(recipe_file)
    assert (again.path / MODEL_BIN).read_bytes() == (artifact.path / MODEL_BIN).read_bytes()
    assert (again.path / RECIPE_FILE).read_bytes() == recipe_file.read_bytes()
    assert again.options["recipe_sha256"] == artifact.options["recipe_sha256"]


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backend() -> OpenVINOBackend:
    return OpenVINOBackend()


@pytest.fixture(scope="module")
def f32(tiny_source: SourceModel) -> Artifact:
    return artifacts.convert(tiny_source, "openvino", "f32")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("openvino-recipe")


@pytest.fixture(scope="module")
def mixed(backend: OpenVINOBackend, f32: Artifact, root: Path) -> Artifact:
    """INT4_ASYM on 60 % of the ratio-defining weights; NNCF's data-free sensitivity keeps the rest at INT8_ASYM."""
    return backend.quantize(f32, root / "ratio", "INT4_ASYM", {"group_size": 64, "ratio": 0.6})


# -- extraction and re-application ---------------------------------------------------------------------------------
def test_ratio_artifact_carries_the_types_nncf_chose(mixed: Artifact, f32: Artifact) -> None:
    recipe = load_recipe(mixed.path / RECIPE_FILE)
    assert (recipe.backend, recipe.architecture, recipe.source_sha256) == ("openvino", "llama", f32.source_sha256)
    assert recipe.settings == {"group_size": 64}
    assert RECIPE_FILE not in {file.name for file in mixed.files}  # its size and hash are the IR's
    found = constants(mixed)
    kinds = {name: recipe.type_of(name) for name in LAYERS}
    assert {name: found[name][0] for name in LAYERS} == {name: ELEMENTS[kind] for name, kind in kinds.items()}
    assert kinds["self.model.embed_tokens.weight"] == "INT8_ASYM"  # embeddings stay in backup_mode (all_layers off)
    four_bit = [name for name, kind in kinds.items() if kind == "INT4_ASYM"]
    assert 0 < len(four_bit) < len(PROJECTIONS) * 2 and set(kinds.values()) == {"INT4_ASYM", "INT8_ASYM"}
    assert all(found[name][1][-1] == 64 for name in four_bit)  # groups of 64
    assert len(recipe.rules) == min(len(four_bit), len(LAYERS) - len(four_bit))  # exact rules off the default


def test_ratio_recipe_reapplies_bit_identically(backend: OpenVINOBackend, f32: Artifact, mixed: Artifact,
                                               root: Path) -> None:
    assert_reapplies(backend, f32, mixed, root / "ratio-again")


def test_a_recipe_names_the_weights_of_an_f16_ir_alike(backend: OpenVINOBackend, mixed: Artifact,
                                                     tiny_source: SourceModel, root: Path) -> None:
    f16 = artifacts.convert(tiny_source, "openvino", "f16")  # constants "<parameter>_compressed", stored in f16
    assert {f"{name}_compressed" for name in LAYERS} <= set(constants(f16))
    applied = backend.quantize(f16, root / "f16", "MIXED", {"recipe": str(mixed.path / RECIPE_FILE),
                                                             "group_size": 64})
    assert (applied.path / RECIPE_FILE).read_bytes() == (mixed.path / RECIPE_FILE).read_bytes()  # the same types
    assert applied.files[1].stat().st_size < 0.6 * f16.files[1].stat().st_size


def test_activation_ranked_recipe_reapplies_and_awq_carries_none(backend: OpenVINOBackend, f32: Artifact,
                                                                tiny_source: SourceModel, root: Path) -> None:
    # calibration text only ranks the layers: the weights are still plain per-layer compressions
    options = {"group_size": 64, "ratio": 0.5, "sensitivity_metric": "MAX_ACTIVATION_VARIANCE", **SMALL_CALIBRATION}
    ranked = backend.quantize(f32, root / "ranked", "INT4_ASYM", options, calibration=calibration_text(),
                              source=tiny_source)
    recipe = load_recipe(ranked.path / RECIPE_FILE)
    assert {rule.type for rule in recipe.rules} | {recipe.default_type} == {"INT4_ASYM", "INT8_ASYM"}
    assert_reapplies(backend, f32, ranked, root / "ranked-again")
    # AWQ rescales the weights before compressing them: a recipe of its types would not reproduce it
    awq = backend.quantize(f32, root / "awq", "INT4_ASYM", {"group_size": 64, "ratio": 0.5, "awq": True,
                                                            **SMALL_CALIBRATION},
                           calibration=calibration_text(), source=tiny_source)
    assert {found[0] for name, found in constants(awq).items() if name in LAYERS} == {"u4", "u8"}
    assert not (awq.path / RECIPE_FILE).exists() and "recipe_sha256" not in awq.options


def test_uniform_artifacts_carry_no_recipe(backend: OpenVINOBackend, f32: Artifact, root: Path) -> None:
    uniform = backend.quantize(f32, root / "int8", "INT8_ASYM")
    assert {found[0] for name, found in constants(uniform).items() if name in LAYERS} == {"u8"}
    assert not (uniform.path / RECIPE_FILE).exists() and "recipe_sha256" not in uniform.options


# -- a bit budget --------------------------------------------------------------------------------------------------
def weight_bpw(artifact: Artifact, f32: Artifact, recipe: Any) -> float:
    """Bits per weight of the artifact's layers by their recipe types: INT4_ASYM in groups of 64 (4 bits, an f16
    scale and a u4 zero point per group), INT8_ASYM per output channel (an f16 scale and a u8 zero point per row)."""
    shapes = {name: shape for name, (_, shape) in constants(f32).items() if name in LAYERS}
    bits = sum(np.prod(shape) * (4 + 20 / 64) if recipe.type_of(name) == "INT4_ASYM"
               else np.prod(shape) * 8 + 24 * shape[0] for name, shape in shapes.items())
    return float(bits / sum(np.prod(shape) for shape in shapes.values()))


@pytest.mark.parametrize("budget", [{"target_bpw": 7.9}, {"target_size_mb": 13.5}])
def test_a_budget_is_nncf_mixed_precision_within_it(backend: OpenVINOBackend, f32: Artifact, root: Path,
                                                    budget: dict[str, float]) -> None:
    # the tiny model's embedding is 91 % of its weights: only a budget near 8 bits leaves room for two types
    artifact = backend.quantize(f32, root / f"budget-{next(iter(budget))}", "MIXED", {**budget, "group_size": 64})
    assert artifact.precision == "MIXED" and artifact.options["all_layers"] is True
    assert {k: artifact.options[k] for k in budget} == budget and 0 < artifact.options["ratio"] <= 1
    recipe = load_recipe(artifact.path / RECIPE_FILE)
    assert recipe.budget == budget and recipe.settings == {"group_size": 64}
    assert {recipe.type_of(name) for name in LAYERS} == {"INT4_ASYM", "INT8_ASYM"}
    params = sum(np.prod(shape) for name, (_, shape) in constants(f32).items() if name in LAYERS)
    target = budget.get("target_bpw") or budget["target_size_mb"] * 8e6 / params
    largest = max(np.prod(shape) for name, (_, shape) in constants(f32).items() if name in LAYERS) / params
    assert target - largest * (8 - 4 - 20 / 64) <= weight_bpw(artifact, f32, recipe) <= target  # within one layer
    # its recipe re-applies to the same weights (a recipe applied carries its types, not the budget that chose them)
    again = backend.quantize(f32, root / f"budget-{next(iter(budget))}-again", "MIXED",
                             {"recipe": str(artifact.path / RECIPE_FILE)})
    assert (again.path / MODEL_BIN).read_bytes() == (artifact.path / MODEL_BIN).read_bytes()
    reapplied = load_recipe(again.path / RECIPE_FILE)
    assert (reapplied.default_type, reapplied.rules, reapplied.budget) == (recipe.default_type, recipe.rules, None)


def test_budgets_out_of_reach_are_refused_before_writing(backend: OpenVINOBackend, f32: Artifact,
                                                         tmp_path: Path) -> None:
    good = str(write_recipe(tmp_path / "good.json", [("down_proj", "INT8_ASYM")]))
    for precision, options, reason in (
        ("MIXED", {"target_bpw": 4.2, "group_size": 64}, "below INT4_ASYM in groups of 64 on every layer (4.31)"),
        ("MIXED", {"target_bpw": 8.5}, "at or above INT8_ASYM on every layer"),
        ("MIXED", {"target_size_mb": 0.0}, "target_size_mb must be a positive number"),
        ("MIXED", {"target_bpw": 6.0, "recipe": good}, "give one of recipe, target_bpw and target_size_mb"),
        ("MIXED", {"target_bpw": 6.0, "target_size_mb": 9.0}, "give one of recipe, target_bpw and target_size_mb"),
        ("MIXED", {"target_bpw": 6.0, "ratio": 0.5}, "ratio do(es) not apply to a MIXED budget"),
        ("INT4_ASYM", {"target_bpw": 6.0}, "target_bpw applies with precision MIXED, not INT4_ASYM"),
    ):
        with pytest.raises(EdgeError) as exc:
            backend.quantize(f32, tmp_path / "out", precision, options)
        assert reason in one_line(exc)
        assert not (tmp_path / "out").exists()


def test_a_budget_is_known_in_bits_before_quantizing(backend: OpenVINOBackend) -> None:
    bits = backend.precision_bits("MIXED", {"target_bpw": 5.5, "group_size": 64}, None)
    assert (bits.method, bits.bpw) == ("mixed", 5.5)
    assert backend.precision_bits("MIXED", {"recipe": "recipe.json"}, None) is None


# -- a hand-written recipe -----------------------------------------------------------------------------------------
def test_hand_written_recipe_gives_each_layer_its_type(backend: OpenVINOBackend, f32: Artifact, root: Path) -> None:
    recipe_file = write_recipe(root / "hand.json", [
        ("embed_tokens", "int8_sym"),  # tied: the output layer too; names are case-insensitive
        (r"layers\.0\.self_attn\.[qk]_proj", "INT4_SYM"),
        ("v_proj", "NF4"),
        (r"layers\.1\.mlp\.", "INT8_ASYM"),
        ("o_proj", "NONE"),  # left uncompressed
    ])
    artifact = backend.quantize(f32, root / "hand", "MIXED", {"recipe": str(recipe_file), "group_size": 64})
    found = constants(artifact)
    expected = {name: "u4" for name in LAYERS}
    expected.update({"self.model.embed_tokens.weight": "i8", "self.model.layers.0.self_attn.q_proj.weight": "i4",
                     "self.model.layers.0.self_attn.k_proj.weight": "i4"})
    expected.update({f"self.model.layers.{i}.self_attn.v_proj.weight": "nf4" for i in range(2)})
    expected.update({f"self.model.layers.1.{p}.weight": "u8" for p in PROJECTIONS if p.startswith("mlp")})
    expected.update({f"self.model.layers.{i}.self_attn.o_proj.weight": "f32" for i in range(2)})
    assert {name: found[name][0] for name in LAYERS} == expected
    assert found["self.model.layers.0.mlp.down_proj.weight"][1] == (256, 512 // 64, 64)
    assert found["self.model.layers.1.mlp.down_proj.weight"][1] == (256, 512)  # 8-bit: per output channel
    extracted = load_recipe(artifact.path / RECIPE_FILE)  # the same assignment, one exact rule per layer
    assert extracted.default_type == "INT4_ASYM" and len(extracted.rules) == 10
    assert {name: ELEMENTS[extracted.type_of(name)] for name in LAYERS} == expected
    runner = OpenVINORunner(artifact.path, threads=2, context_tokens=64)
    try:
        assert np.isfinite(runner.logits(TOKENS)).all()
    finally:
        runner.close()
    assert_reapplies(backend, f32, artifact, root / "hand-again")


def test_the_recipe_is_logged_under_the_run_not_in_the_model(mixed: Artifact, tracking_uri: str,
                                                             tmp_path: Path) -> None:
    with mlflow.start_run() as run:
        info = flavors.log_artifact_model(mixed)
    client = mlflow.MlflowClient()
    assert [a.path for a in client.list_artifacts(run.info.run_id, "recipe")] == ["recipe/recipe.json"]
    logged = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="recipe/recipe.json",
                                                      dst_path=str(tmp_path / "recipe")))
    assert logged.read_bytes() == (mixed.path / RECIPE_FILE).read_bytes()
    model = flavors.artifact_from_model(info.model_uri, str(tmp_path / "model"))
    assert (model.path / MODEL_XML).is_file() and not (model.path / RECIPE_FILE).exists()


# -- refusals ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rules, fields, reason", [
    ([("embed", "INT8_SYM")], {"architecture": "qwen2"}, "another architecture (qwen2); this model is llama"),
    ([("token_embd", "Q8_0")], {"backend": "llamacpp", "default_type": "Q4_K"},
     "another backend (llamacpp), not openvino"),
    ([(r"^model\.layers\.0\.mlp\.down_proj$", "INT8_SYM")], {},
     r"pattern '^model\\.layers\\.0\\.mlp\\.down_proj$' matches no quantizable tensor"),
    ([("down_proj", "MXFP4")], {}, "type MXFP4 (pattern 'down_proj') is not supported by openvino"),
    ([("down_proj", "INT8_SYM")], {"default_type": "q4_k"}, "default_type Q4_K is not supported by openvino"),
    ([("down_proj", "NONE")], {"default_type": "NONE"}, "leaves every layer uncompressed"),
])
def test_recipes_that_do_not_fit_are_refused_before_writing(backend: OpenVINOBackend, f32: Artifact, tmp_path: Path,
                                                            rules, fields, reason) -> None:
    recipe_file = write_recipe(tmp_path / "recipe.json", rules, **fields)
    with pytest.raises(EdgeError) as exc:
        backend.quantize(f32, tmp_path / "out", "MIXED", {"recipe": str(recipe_file)})
    assert reason in one_line(exc)
    assert not (tmp_path / "out").exists()


def test_bad_recipe_files_and_options_are_refused_before_writing(backend: OpenVINOBackend, f32: Artifact,
                                                                 tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('{"mlflow_edge_recipe": 1, "backend": ')
    good = str(write_recipe(tmp_path / "good.json", [("down_proj", "INT8_ASYM")]))
    for precision, options, reason in (
        ("MIXED", {"recipe": str(tmp_path / "broken.json")}, "is not JSON"),
        ("MIXED", {"recipe": str(tmp_path / "missing.json")}, "is not a file"),
        ("mixed", {}, "precision MIXED needs recipe=<a recipe JSON file>"),
        ("INT4_ASYM", {"recipe": good}, "recipe applies with precision MIXED, not INT4_ASYM"),
        ("MIXED", {"recipe": good, "ratio": 0.8, "awq": True}, "awq, ratio do(es) not apply to MIXED"),
        ("MIXED", {"recipe": good, "group_size": 96}, "NNCF cannot quantize"),  # 96 divides no layer of 256
    ):
        with pytest.raises(EdgeError) as exc:
            backend.quantize(f32, tmp_path / "out", precision, options)
        assert reason in one_line(exc)
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_budget_without_a_group_size_takes_the_largest_that_groups_every_layer(f32: Artifact,
                                                                                  demo_source: SourceModel) -> None:
    from mlflow_edge import artifacts
    from mlflow_edge.backends.openvino.budget import budget_group_size
    from mlflow_edge.backends.openvino.ir import read_model
    from mlflow_edge.backends.openvino.recipe import weight_shapes

    def group_of(artifact: Artifact) -> int:
        return budget_group_size(weight_shapes(read_model(artifact.path)))

    assert group_of(f32) == 128  # the tiny model's layers are 256 wide: NNCF's default
    assert group_of(artifacts.convert(demo_source, "openvino", "f16")) == 64  # SmolLM2's are 576 wide
