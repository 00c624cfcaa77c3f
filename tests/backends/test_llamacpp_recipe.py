"""Per-tensor mixed precision on the llama.cpp backend, on the tiny random Llama: real sensitivity measurement (real
llama.cpp quantizations, the source's own Fisher on calibration text), real allocation, real tensor type overrides."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from mlflow_edge import artifacts, cache, recipes
from mlflow_edge.backends.base import Artifact
from mlflow_edge.errors import EdgeError
from mlflow_edge.evaluation.data import calibration_text
from mlflow_edge.recipes import side_files
from mlflow_edge.sources import SourceModel

pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from mlflow_edge.backends.llamacpp import LlamaCppBackend, quantizable_tensors  # noqa: E402

TYPES = "Q4_K,Q6_K,Q8_0"
TARGET_BPW = 4.8  # token_embd (92 % of the tiny model's weights) at Q4_K, the small tensors share the rest
# one calibration chunk keeps the importance matrix and the Fisher pass to seconds
MEASURED = {"imatrix": True, "imatrix_chunks": 1, "recipe_types": TYPES}


@functools.lru_cache(maxsize=None)
def read_gguf(path: Path) -> tuple[int, dict[str, tuple[str, int, int]]]:
    """``general.file_type`` and name -> (ggml type, parameters, bytes) of every tensor of a GGUF file (read once:
    decoding the 49k-token vocabulary takes seconds)."""
    reader = gguf.GGUFReader(str(path))
    return (int(reader.get_field("general.file_type").contents()),
            {t.name: (t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in reader.tensors})


def tensor_layout(path: Path) -> dict[str, tuple[str, int, int]]:
    return read_gguf(path)[1]


@pytest.fixture(scope="module")
def backend() -> LlamaCppBackend:
    return LlamaCppBackend()


@pytest.fixture(scope="module")
def f16(tiny_source: SourceModel) -> Artifact:
    return artifacts.convert(tiny_source, "llamacpp", "f16")


@pytest.fixture(scope="module")
def mixed(backend: LlamaCppBackend, f16: Artifact, tiny_source: SourceModel,
          tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    """``target_bpw`` on the tiny model: sensitivity measured (or read from the cache), allocated, applied."""
    out = tmp_path_factory.mktemp("mixed") / "target"
    return backend.quantize(f16, out, "mixed", {**MEASURED, "target_bpw": TARGET_BPW},
                            calibration=calibration_text(), source=tiny_source)


def test_a_budget_gives_a_recipe_within_it(mixed: Artifact, f16: Artifact) -> None:
    folder = mixed.path.parent
    assert mixed.precision == "MIXED"
    assert mixed.files == (folder / "model.gguf",)  # the recipe lies beside the model, not in its size or hash
    assert side_files(mixed.path) == [folder / "recipe.json", folder / "sensitivity.csv", folder / "sensitivity.png"]
    assert (folder / "sensitivity.csv").is_file()
    assert (folder / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recipe = recipes.load_recipe(folder / "recipe.json")
    assert mixed.options["recipe_sha256"] == recipe.digest()
    assert mixed.options["target_bpw"] == TARGET_BPW and mixed.options["recipe_types"] == TYPES
    assert recipe.budget == {"target_bpw": TARGET_BPW} and recipe.source_sha256 == f16.source_sha256
    assert recipe.sensitivity["error"] == "fisher" and recipe.sensitivity["types"] == TYPES.split(",")

    # the real file: every quantizable tensor has the recipe's type, and their bits fit the budget, close to it
    layout = tensor_layout(mixed.path)
    names = quantizable_tensors(f16.path)[1]
    assert len(recipe.rules) == len(names)
    assert {name: layout[name][0] for name in names} == {name: recipe.type_of(name) for name in names}
    bits = sum(8 * layout[name][2] for name in names)
    bpw = bits / sum(layout[name][1] for name in names)
    assert TARGET_BPW - 0.1 <= bpw <= TARGET_BPW
    assert recipe.predicted["bpw"] == pytest.approx(bpw, abs=1e-4)
    assert len({layout[name][0] for name in names}) >= 2  # really mixed


def test_the_sensitivity_table_is_real(mixed: Artifact, f16: Artifact) -> None:
    import pandas as pd

    table = pd.read_csv(mixed.path.parent / "sensitivity.csv")
    recipes.check_table(table)
    names = quantizable_tensors(f16.path)[1]
    assert list(dict.fromkeys(table["tensor"])) == names
    assert set(table["type"]) == set(TYPES.split(","))  # widths of 256: no fallback on this model
    bytes_at_q8 = {row.tensor: row.bits / 8 for row in table[table["type"] == "Q8_0"].itertuples()}
    assert bytes_at_q8["blk.0.attn_q.weight"] == 256 * 256 * 34 / 32
    errors = table.pivot(index="tensor", columns="type", values="error")
    assert (errors["Q8_0"] < errors["Q6_K"]).all() and (errors["Q6_K"] < errors["Q4_K"]).all()


def test_applying_the_written_recipe_gives_the_same_bytes(backend: LlamaCppBackend, f16: Artifact, mixed: Artifact,
                                                          tiny_source: SourceModel, tmp_path: Path) -> None:
    options = {"imatrix": True, "imatrix_chunks": 1, "recipe": str(mixed.path.parent / "recipe.json")}
    again = backend.quantize(f16, tmp_path / "again", "MIXED", options, calibration=calibration_text(),
                             source=tiny_source)
    assert cache.sha256_file(again.path) == cache.sha256_file(mixed.path)
    assert again.options["recipe_sha256"] == mixed.options["recipe_sha256"]
    assert (tmp_path / "again" / "recipe.json").read_bytes() == (mixed.path.parent / "recipe.json").read_bytes()
    assert not (tmp_path / "again" / "sensitivity.csv").exists()  # nothing measured


def test_the_recipe_file_alone_brings_its_importance_matrix(backend: LlamaCppBackend, f16: Artifact, mixed: Artifact,
                                                             tiny_source: SourceModel, tmp_path: Path) -> None:
    """The recipe records that it was allocated with an importance matrix of 1 chunk: given alone it is re-applied
    with one; an explicit ``imatrix=false`` still wins (and writes other bytes)."""
    recipe = str(mixed.path.parent / "recipe.json")
    assert recipes.load_recipe(recipe).settings == {"imatrix": True, "imatrix_chunks": 1}
    alone = backend.quantize(f16, tmp_path / "alone", "MIXED", {"recipe": recipe}, calibration=calibration_text(),
                             source=tiny_source)
    assert cache.sha256_file(alone.path) == cache.sha256_file(mixed.path)
    assert alone.options["imatrix"] is True and alone.options["imatrix_chunks"] == 1
    without = backend.quantize(f16, tmp_path / "without", "MIXED", {"recipe": recipe, "imatrix": "false"})
    assert without.options["imatrix"] is False and cache.sha256_file(without.path) != cache.sha256_file(mixed.path)


def test_a_rule_raises_a_tensor_to_a_higher_type(backend: LlamaCppBackend, f16: Artifact, tmp_path: Path) -> None:
    path = tmp_path / "edited.json"
    path.write_text(json.dumps({
        "mlflow_edge_recipe": 1, "backend": "llamacpp", "architecture": "llama", "default_type": "Q4_0",
        "tensor_types": [{"pattern": "attn_v", "type": "Q8_0"}, {"pattern": "^token_embd\\.weight$", "type": "q6_k"}],
    }))
    plain = tensor_layout(backend.quantize(f16, tmp_path / "plain", "Q4_0").path)
    edited = backend.quantize(f16, tmp_path / "edited", "MIXED", {"recipe": str(path)})
    types = {name: kind for name, (kind, _, _) in tensor_layout(edited.path).items()}
    assert plain["blk.0.attn_v.weight"][0] == plain["blk.1.attn_v.weight"][0] == "Q4_0"
    assert types["blk.0.attn_v.weight"] == types["blk.1.attn_v.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "Q6_K"
    assert {n: t for n, t in types.items() if "attn_v" not in n and n != "token_embd.weight"} == {
        n: t for n, (t, _, _) in plain.items() if "attn_v" not in n and n != "token_embd.weight"}
    assert edited.precision == "MIXED" and (edited.path.parent / "recipe.json").is_file()

    # a plain precision with a recipe: the precision is the default type, the rules still apply
    k_quant = backend.quantize(f16, tmp_path / "k", "Q4_K_M", {"recipe": str(path)})
    k_types = {name: kind for name, (kind, _, _) in tensor_layout(k_quant.path).items()}
    assert k_types["blk.0.attn_v.weight"] == "Q8_0" and k_types["blk.0.attn_q.weight"] == "Q4_K"
    assert read_gguf(k_quant.path)[0] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M


def _recipe(tmp_path: Path, **changes) -> str:
    data = {"mlflow_edge_recipe": 1, "backend": "llamacpp", "architecture": "llama", "default_type": "Q4_0",
            "tensor_types": [{"pattern": "ffn_down", "type": "Q6_K"}], **changes}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(("changes", "message"), [
    ({"architecture": "qwen2"}, "a recipe for another architecture (qwen2); this model is llama"),
    ({"backend": "openvino"}, "a recipe for another backend (openvino), not llamacpp"),
    ({"tensor_types": [{"pattern": "blk\\.7\\.", "type": "Q8_0"}]}, "pattern 'blk\\\\.7\\\\.' matches no quantizable"),
    ({"tensor_types": [{"pattern": "attn_norm", "type": "Q8_0"}]}, "matches no quantizable tensor"),
    ({"tensor_types": [{"pattern": "ffn_up", "type": "Q9_9"}]}, "type Q9_9 (pattern 'ffn_up') is not supported"),
    ({"default_type": "F16"}, "default_type F16 is not supported by llamacpp"),
    ({"tensor_types": [{"pattern": "ffn_up", "type": "IQ2_XS"}]}, "type IQ2_XS needs an importance matrix"),
    ({"tensor_types": [{"pattern": "ffn_(", "type": "Q8_0"}]}, "is not a valid regular expression"),
])
def test_a_recipe_that_does_not_fit_is_refused_before_anything_is_written(
        backend: LlamaCppBackend, f16: Artifact, tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(EdgeError) as info:
        backend.quantize(f16, tmp_path / "out", "MIXED", {"recipe": _recipe(tmp_path, **changes)})
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_no_recipe_is_refused(backend: LlamaCppBackend, f16: Artifact, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"mlflow_edge_recipe": 1, "backend": ')
    with pytest.raises(EdgeError, match="is not JSON"):
        backend.quantize(f16, tmp_path / "out", "MIXED", {"recipe": str(bad)})
    with pytest.raises(EdgeError, match="is not a file"):
        backend.quantize(f16, tmp_path / "out", "MIXED", {"recipe": str(tmp_path / "missing.json")})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("precision", "options", "message"), [
    ("MIXED", {}, "precision MIXED needs llamacpp.recipe=<file>, target_bpw=<bits> or target_size_mb=<MB>"),
    ("MIXED", {"recipe": "r.json", "target_bpw": 4.8}, "give one of llamacpp.recipe, target_bpw and target_size_mb"),
    ("MIXED", {"target_bpw": 5, "target_size_mb": 9}, "not target_bpw and target_size_mb"),
    ("F16", {"target_bpw": 5}, "F16 is not a quantized type"),
    ("MIXED", {"target_bpw": -1}, "llamacpp.target_bpw must be a positive number"),
    ("MIXED", {"target_bpw": 5, "token_embedding_type": "Q8_0"}, "token_embedding_type cannot be combined"),
    ("MIXED", {"target_bpw": 5, "recipe_types": "Q4_K,Q7_K"}, "unknown ggml tensor type in llamacpp.recipe_types"),
    ("MIXED", {"target_bpw": 5, "recipe_types": "IQ2_XXS,Q4_K"}, "recipe type IQ2_XXS needs an importance matrix"),
    ("Q4_K_M", {"recipe_types": "Q4_K"}, "recipe_types needs target_bpw or target_size_mb"),
    ("MIXED", {"target_bpw": "many"}, "option target_bpw must be a number"),
])
def test_bad_mixed_requests_are_one_line_errors(backend: LlamaCppBackend, f16: Artifact, tmp_path: Path,
                                                precision: str, options: dict, message: str) -> None:
    with pytest.raises(EdgeError) as info:
        backend.quantize(f16, tmp_path / "out", precision, options)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_budget_out_of_reach_is_refused_before_anything_is_written(
        backend: LlamaCppBackend, f16: Artifact, mixed: Artifact, tiny_source: SourceModel, tmp_path: Path) -> None:
    """The table is the cached one of ``mixed``: refusing costs no measurement."""
    for options, message in [({"target_bpw": 3.0}, "is below the smallest size these types reach"),
                             ({"target_bpw": 9.0}, "is above the largest size these types reach"),
                             ({"target_size_mb": 0.5}, "target_size_mb 0.5 is below the size of what is not")]:
        with pytest.raises(EdgeError, match=message):
            backend.quantize(f16, tmp_path / "out", "MIXED", {**MEASURED, **options}, calibration=calibration_text(),
                             source=tiny_source)
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_size_target_without_calibration(backend: LlamaCppBackend, f16: Artifact, mixed: Artifact,
                                           tmp_path: Path) -> None:
    """``target_size_mb`` on the whole file; without calibration text the error is the plain squared error."""
    target_mb = mixed.path.stat().st_size / 1e6
    artifact = backend.quantize(f16, tmp_path / "size", "Q8_0", {"target_size_mb": target_mb,
                                                                  "recipe_types": TYPES})
    assert target_mb - 0.2 <= artifact.path.stat().st_size / 1e6 <= target_mb
    recipe = recipes.load_recipe(artifact.path.parent / "recipe.json")
    assert recipe.default_type == "Q8_0" and recipe.sensitivity["error"] == "squared"
    assert recipe.budget == {"target_size_mb": target_mb}


def test_a_measured_table_estimates_each_types_mean_kld(backend: LlamaCppBackend, mixed: Artifact, f16: Artifact,
                                                       tiny_source: SourceModel) -> None:
    """Once a budgeted recipe measured the table, it estimates the mean KLD of the uniform types it covers and of
    other budgets (what the search orders its trials by); options whose table was never measured estimate nothing."""
    calibration = calibration_text()
    estimate = functools.partial(backend.estimated_kld, f16, calibration=calibration, source=tiny_source)
    ladder = [estimate(kind, MEASURED) for kind in ("Q8_0", "Q6_K", "Q4_K_M")]
    assert all(value is not None and value > 0 for value in ladder) and ladder == sorted(ladder)
    assert estimate("Q4_K_S", MEASURED) == estimate("Q4_K_M", MEASURED)  # one main k-quant: one estimate
    assert estimate("Q3_K_M", MEASURED) is None  # Q3_K is not among this table's types
    looser, tighter = (estimate("MIXED", {**MEASURED, "target_bpw": bpw}) for bpw in (4.8, 7.0))
    assert tighter < looser
    assert estimate("Q4_K_M", {**MEASURED, "imatrix_chunks": 2}) is None  # that table was never measured
    recipe = recipes.load_recipe(mixed.path.parent / "recipe.json")
    assert looser == pytest.approx(recipe.predicted["error"] / 2)
