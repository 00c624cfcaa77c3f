"""The MLX backend on tiny random Llamas: real mlx-lm conversion and quantizers, the real MLX runtime (CPU here).

What every backend must do is checked by tests/conformance; this module checks what is MLX's own: precisions and
options, the mixed recipes, dynamic quantization and AWQ on calibration text, LoRA adapters, the RoPE keys of
transformers 5 configs, and bad input.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

from mlflow_edge import artifacts, recipes
from mlflow_edge.backends import get_backend
from mlflow_edge.backends.base import Artifact
from mlflow_edge.backends.mlx import MLXBackend, MLXRunner, load_mlx_model, read_recipe
from mlflow_edge.errors import EdgeError
from mlflow_edge.evaluation.data import calibration_text
from mlflow_edge.sources import SourceModel, from_folder

pytest.importorskip("mlx_lm")

TOKENS = list(range(1000, 1040))
SMALL_CALIBRATION = {"num_samples": 2, "sequence_length": 32}  # 64 tokens keep data-aware methods at seconds


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, message
    return message


def assert_nothing_left(folder: Path) -> None:
    assert not folder.exists() or not any(folder.iterdir()), sorted(folder.iterdir())


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    centered = expected - expected.mean(axis=-1, keepdims=True)
    return float(np.linalg.norm(actual - actual.mean(axis=-1, keepdims=True) - centered) / np.linalg.norm(centered))


def logits_of(artifact: Artifact, adapter_dir: Path | None = None) -> np.ndarray:
    runner = MLXRunner(artifact.path, threads=2, context_tokens=64, adapter_dir=adapter_dir)
    try:
        return runner.logits(TOKENS)
    finally:
        runner.close()


def quantization_of(artifact: Artifact) -> dict[str, Any]:
    return json.loads((artifact.path / "config.json").read_text())["quantization"]


def make_adapter(model_folder: Path, out: Path, num_layers: int, seed: int = 0) -> Path:
    """A LoRA adapter as ``mlx_lm.lora`` saves one (its trainable parameters and config), non-zero so it shows."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(model_folder)
    model.freeze()
    lora = {"rank": 4, "dropout": 0.0, "scale": 10.0}
    linear_to_lora_layers(model, num_layers, lora)
    mx.random.seed(seed)
    weights = {name: mx.random.normal(value.shape) * 0.05 if name.endswith("lora_b") else value
               for name, value in tree_flatten(model.trainable_parameters())}
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": num_layers,
                                                        "lora_parameters": lora}))
    return out


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backend() -> MLXBackend:
    return MLXBackend()


@pytest.fixture(scope="module")
def base(tiny_source: SourceModel) -> Artifact:
    """The tiny Llama (256 wide) converted at float32 (cached)."""
    return artifacts.convert(tiny_source, "mlx", "float32")


@pytest.fixture(scope="module")
def reference(base: Artifact) -> np.ndarray:
    return logits_of(base)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlx")


@pytest.fixture(scope="module")
def narrow_source(tiny_source: SourceModel, root: Path) -> SourceModel:
    """A one-layer Llama 192 wide (groups of 128 do not divide it) with RoPE base 100000, stored as transformers 5
    stores it (only in ``rope_parameters``)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_source.path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=192, intermediate_size=384, num_hidden_layers=1,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True)
    torch.manual_seed(1)
    folder = root / "narrow-llama"
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return from_folder(folder)


@pytest.fixture(scope="module")
def narrow(backend: MLXBackend, narrow_source: SourceModel, root: Path) -> Artifact:
    return backend.convert(narrow_source, root / "narrow-f32", "float32")


@pytest.fixture(scope="module")
def quantized(backend: MLXBackend, base: Artifact, root: Path) -> dict[str, Artifact]:
    plans = {"q4_g64": {}, "q8_g32": {}, "mixed_3_6": {"q_group_size": 32}, "mxfp4": {}, "nvfp4": {}, "mxfp8": {}}
    return {name: backend.quantize(base, root / name, name, options) for name, options in plans.items()}


@pytest.fixture(scope="module")
def adapter(base: Artifact, root: Path) -> Path:
    return make_adapter(base.path, root / "adapter", num_layers=2)


# -- declarations, precisions, search space ------------------------------------------------------------------------
def test_registered_with_mlx_lm_names(backend: MLXBackend) -> None:
    assert isinstance(get_backend("mlx"), MLXBackend)
    assert backend.format == "mlx" and backend.flavor == "mlflow_edge.flavors.mlx"
    assert {"mlx", "mlx-lm"} <= set(backend.requirements)
    assert backend.convert_precisions() == ("float32", "float16", "bfloat16")
    precisions = set(backend.quantize_precisions())
    assert {"q2_g32", "q4_g64", "q8_g128", "mxfp4", "nvfp4", "mxfp8", "mixed_2_6", "mixed_3_4", "mixed_3_6",
            "mixed_4_6", "dynamic_4.5bpw", "awq_q4_g64"} <= precisions
    assert not {"q7_g64", "q4_g16"} & precisions  # what mx.quantize refuses is not offered
    assert set(backend.sweep_types) <= precisions and backend.versions()["mlx_lm"]


def test_search_space_and_starting_point(backend: MLXBackend) -> None:
    (start,) = backend.starting_points()
    assert backend.search_space(optuna.trial.FixedTrial(dict(start))) == ("q4_g64", {})  # mlx-lm's default
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        precision, options = backend.search_space(trial)
        seen.add(precision)
        study.tell(trial, 0.0)
        if precision == "mixed":  # a budget: dynamic_quant's levels, in groups of 64
            assert set(options) == {"target_bpw"} and options["target_bpw"] in recipes.SEARCH_BUDGETS_BPW
            continue
        group = options.get("q_group_size") or int(precision.split("_g")[-1])
        assert 576 % group == 0 and 256 % group == 0  # SmolLM2 and the tiny model
    assert {"mixed_3_6", "mixed_4_6", "mixed"} <= seen and len(seen) > 6


def test_unsupported_bits_groups_and_modes_are_refused(backend: MLXBackend, base: Artifact, tmp_path: Path) -> None:
    for precision, reason in (("q7_g64", "7 bits"), ("q4_g16", "groups of 16"), ("fp4", "unknown MLX precision"),
                              ("awq_q9_g64", "9 bits"), ("dynamic_bpw", "unknown MLX precision")):
        with pytest.raises(EdgeError) as exc:
            backend.quantize(base, tmp_path / "out", precision)
        assert reason in one_line(exc)
        assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize("options, reason", [
    ({"q_group_size": "48"}, "unknown q_group_size '48'"),
    ({"low_bits": 3}, "low_bits do(es) not apply to q4_g64"),
    ({"fuse_adapter": True}, "fuse_adapter needs adapter_path"),
    ({"dtype": "int8"}, "unknown dtype 'int8'"),
    ({"n_grid": "many"}, "option n_grid must be an integer"),
])
def test_bad_options_are_refused(backend: MLXBackend, base: Artifact, tmp_path: Path, options, reason) -> None:
    with pytest.raises(EdgeError) as exc:
        backend.quantize(base, tmp_path / "out", "q4_g64", options)
    assert reason in one_line(exc)
    assert_nothing_left(tmp_path / "out")


# -- convert -------------------------------------------------------------------------------------------------------
def test_conversions_keep_the_tokenizer_and_write_the_dtype(backend: MLXBackend, base: Artifact,
                                                            tiny_source: SourceModel, root: Path) -> None:
    assert base.precision == "float32" and base.options == {"dtype": "float32"}
    assert [f.name for f in base.files] == ["model.safetensors"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (base.path / name).is_file()
    half = backend.convert(tiny_source, root / "bf16", "bf16")  # optimum-style aliases are accepted
    assert half.precision == "bfloat16" and 0.45 < half.size_bytes / base.size_bytes < 0.55
    assert backend.open_artifact(half.path, tiny_source).precision == "bfloat16"
    assert not (root / "bf16" / ".mlx.partial").exists()


def test_transformers5_rope_base_reaches_mlx(narrow: Artifact, narrow_source: SourceModel) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    config = json.loads((narrow.path / "config.json").read_text())
    assert config["rope_theta"] == 100000.0
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(narrow_source.path, dtype=torch.float32)
        expected = hf(torch.tensor([TOKENS])).logits[0].numpy()
    assert relative_error(logits_of(narrow), expected) < 1e-4
    import mlx.core as mx
    from mlx_lm.utils import load_model  # without the legacy key mlx-lm falls back to RoPE base 10000

    model, _ = load_model(narrow.path, model_config={"rope_theta": 10000.0})
    wrong = np.array(model(mx.array(TOKENS)[None])[0])
    assert relative_error(wrong, expected) > 100 * relative_error(logits_of(narrow), expected)


def test_architectures_mlx_lm_lacks_are_refused(backend: MLXBackend, tiny_source: SourceModel,
                                                tmp_path: Path) -> None:
    alien_folder = tmp_path / "alien"
    alien_folder.mkdir()
    (alien_folder / "config.json").write_text(json.dumps({"model_type": "martian_lm", "architectures": ["Martian"]}))
    alien = dataclasses.replace(tiny_source, path=alien_folder, architecture="Martian", name="alien")
    assert "model_type 'martian_lm'" in backend.unsupported_reason(alien)
    with pytest.raises(EdgeError) as exc:
        backend.convert(alien, tmp_path / "out", "float32")
    assert one_line(exc).startswith("unsupported architecture")
    assert_nothing_left(tmp_path / "out")
    (alien_folder / "config.json").write_text(json.dumps({"model_type": "llama", "model_file": "evil.py"}))
    assert "custom model code" in backend.unsupported_reason(alien)


# -- quantize ------------------------------------------------------------------------------------------------------
def test_uniform_and_microscaling_modes(quantized: dict[str, Artifact], base: Artifact, reference: np.ndarray,
                                        backend: MLXBackend, tiny_source: SourceModel) -> None:
    q4 = quantized["q4_g64"]
    assert q4.options == {"dtype": "float32", "q_bits": 4, "q_group_size": 64, "q_mode": "affine",
                          "base_precision": "float32"}
    assert quantization_of(q4) == {"group_size": 64, "bits": 4, "mode": "affine"}
    for name, mode, bits, group in (("mxfp4", "mxfp4", 4, 32), ("nvfp4", "nvfp4", 4, 16), ("mxfp8", "mxfp8", 8, 32)):
        artifact = quantized[name]
        assert quantization_of(artifact) == {"group_size": group, "bits": bits, "mode": mode}
        assert artifact.options["q_mode"] == mode
        assert backend.open_artifact(artifact.path, tiny_source).precision == mode
    sizes = {name: artifact.size_bytes for name, artifact in quantized.items()}
    assert sizes["q4_g64"] < sizes["q8_g32"] < base.size_bytes and sizes["mxfp4"] < sizes["mxfp8"]
    errors = {name: relative_error(logits_of(artifact), reference) for name, artifact in quantized.items()}
    assert errors["q8_g32"] < errors["q4_g64"] < 0.5 and errors["mxfp8"] < errors["mxfp4"] < 0.5


def test_mixed_recipe_gives_v_and_down_projections_more_bits(quantized: dict[str, Artifact],
                                                              tiny_source: SourceModel, backend: MLXBackend) -> None:
    mixed = quantized["mixed_3_6"]
    assert mixed.options["quant_predicate"] == "mixed_3_6" and mixed.options["q_group_size"] == 32
    layers = {path: entry["bits"] for path, entry in quantization_of(mixed).items() if isinstance(entry, dict)}
    # two layers: the last one (index >= 7/8 of them) keeps 6 bits in v_proj and down_proj, the rest gets 3
    assert layers["model.layers.1.self_attn.v_proj"] == layers["model.layers.1.mlp.down_proj"] == 6
    assert layers["model.layers.0.self_attn.v_proj"] == layers["model.layers.1.self_attn.q_proj"] == 3
    assert backend.open_artifact(mixed.path, tiny_source).precision == "mixed_3_6"


def test_dynamic_quant_meets_its_target_on_calibration_text(backend: MLXBackend, base: Artifact,
                                                            tiny_source: SourceModel, root: Path) -> None:
    from mlx_lm.utils import compute_bits_per_weight

    calibration = calibration_text()
    artifact = backend.quantize(base, root / "dynamic", "dynamic_5.5bpw", SMALL_CALIBRATION,
                                calibration=calibration, source=tiny_source)
    assert artifact.precision == "dynamic_5.5bpw"
    assert artifact.options["calib.sha256"] == calibration.sha256 and artifact.options["calib.dataset"]
    assert artifact.options["target_bpw"] == 5.5 and artifact.options["low_bits"] == 4
    bits = {entry["bits"] for entry in quantization_of(artifact).values() if isinstance(entry, dict)}
    assert bits == {5} and quantization_of(artifact)["bits"] == 4  # sensitive layers at 5 bits, the rest at 4
    # float32 scales: 4 bits in groups of 64 is 5.0 bits per weight as mlx-lm counts, 5 bits 6.0
    assert 5.0 < compute_bits_per_weight(load_mlx_model(artifact.path)) <= 5.5 + 1e-3


def test_dynamic_quant_refuses_unreachable_targets_and_missing_text(backend: MLXBackend, base: Artifact,
                                                                   tmp_path: Path) -> None:
    with pytest.raises(EdgeError) as exc:
        backend.quantize(base, tmp_path / "out", "dynamic_4.5bpw", SMALL_CALIBRATION, calibration=calibration_text())
    assert "4.5 bits per weight is outside the 5.00-6.00" in one_line(exc)
    with pytest.raises(EdgeError) as exc:
        backend.quantize(base, tmp_path / "out", "dynamic_5.5bpw", SMALL_CALIBRATION)
    assert "reads calibration text" in one_line(exc)
    with pytest.raises(EdgeError) as exc:
        backend.quantize(base, tmp_path / "out", "dynamic_5.5bpw", {"num_samples": 1000, "sequence_length": 512},
                         calibration=calibration_text())
    assert "1000 windows of 512" in one_line(exc)
    assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize(("budget", "levels"), [({"target_bpw": 5.5}, (4, 5)), ({"target_size_mb": 9.0}, (4, 5)),
                                                ({"target_bpw": 5.0}, (3, 4))])
def test_a_budget_is_dynamic_quant_at_the_levels_around_it(backend: MLXBackend, base: Artifact,
                                                           tiny_source: SourceModel, root: Path,
                                                           budget: dict[str, float], levels: tuple[int, int]) -> None:
    from mlx_lm.utils import compute_bits_per_weight, get_total_parameters

    (name, value), = budget.items()
    artifact = backend.quantize(base, root / f"budget-{name}-{value}", "MIXED", {**budget, **SMALL_CALIBRATION},
                                calibration=calibration_text(), source=tiny_source)
    model = load_mlx_model(artifact.path)
    params = get_total_parameters(model)
    target = budget.get("target_bpw") or budget["target_size_mb"] * 8e6 / params
    assert artifact.precision == "mixed" and artifact.options["target_bpw"] == pytest.approx(target, rel=1e-6)
    assert {k: artifact.options[k] for k in budget} == budget
    # float32 scales: 4 bits in groups of 64 are 5.0 bits per weight (and a little more with the norms), 5 bits 6.0:
    # the levels either side of 5.5; 5.0 itself lies between 3 and 4 bits
    assert (artifact.options["low_bits"], artifact.options["high_bits"]) == levels
    assert levels[0] + 1 < compute_bits_per_weight(model) <= target + 1e-3
    assert read_recipe(artifact.path / "recipe.json").budget == budget


def test_budgets_out_of_reach_or_misplaced_are_refused(backend: MLXBackend, base: Artifact, tmp_path: Path) -> None:
    for precision, options, reason in (
        ("mixed", {"target_bpw": 2.5}, "a target of 2.5 bits per weight is outside the 3.00-4.00"),
        ("mixed", {"target_bpw": 5.0, "recipe": "recipe.json"}, "give one of recipe, target_bpw and target_size_mb"),
        ("mixed", {"target_bpw": 5.0, "target_size_mb": 9.0}, "give one of target_bpw and target_size_mb"),
        ("q4_g64", {"target_bpw": 5.0}, "target_bpw applies with precision mixed, not q4_g64"),
        ("mixed", {"target_bpw": 5.0, "q_group_size": 32}, "q_group_size do(es) not apply to mixed"),
    ):
        with pytest.raises(EdgeError) as exc:
            backend.quantize(base, tmp_path / "out", precision, {**options, **SMALL_CALIBRATION},
                             calibration=calibration_text())
        assert reason in one_line(exc)
        assert_nothing_left(tmp_path / "out")
    bits = backend.precision_bits("mixed", {"target_bpw": 5.5}, None)
    assert (bits.method, bits.bpw) == ("dynamic", 5.5)


def test_awq_on_calibration_text(backend: MLXBackend, base: Artifact, reference: np.ndarray,
                                 tiny_source: SourceModel, root: Path) -> None:
    calibration = calibration_text()
    artifact = backend.quantize(base, root / "awq", "awq_q4_g64", {**SMALL_CALIBRATION, "n_grid": 4},
                                calibration=calibration, source=tiny_source)
    assert artifact.options["calib.sha256"] == calibration.sha256 and artifact.options["n_grid"] == 4
    quantization = quantization_of(artifact)
    assert quantization["model.embed_tokens"] == {"group_size": 32, "bits": 4}  # embed_group_size
    assert quantization["model.layers.0.mlp.down_proj"] == {"group_size": 64, "bits": 4}
    assert relative_error(logits_of(artifact), reference) < 0.5


def test_group_sizes_must_divide_every_layer(backend: MLXBackend, narrow: Artifact, tmp_path: Path) -> None:
    for precision, options in (("q4_g128", {}), ("mixed_3_6", {"q_group_size": 128})):
        with pytest.raises(EdgeError) as exc:
            backend.quantize(narrow, tmp_path / "out", precision, options)
        assert "128 does not divide layer" in one_line(exc) and "192 wide" in one_line(exc)
        assert_nothing_left(tmp_path / "out")
    assert backend.quantize(narrow, tmp_path / "ok", "q4_g64").precision == "q4_g64"


def test_quantized_artifacts_are_not_quantized_again(backend: MLXBackend, quantized: dict[str, Artifact],
                                                     tmp_path: Path) -> None:
    with pytest.raises(EdgeError) as exc:
        backend.quantize(quantized["q4_g64"], tmp_path / "out", "q8_g64")
    assert "already quantized" in one_line(exc)
    assert_nothing_left(tmp_path / "out")


# -- adapters ------------------------------------------------------------------------------------------------------
def test_adapter_travels_with_the_artifact_or_is_fused(backend: MLXBackend, base: Artifact, adapter: Path,
                                                       reference: np.ndarray, root: Path) -> None:
    adapted = logits_of(base, adapter_dir=adapter)
    assert relative_error(adapted, reference) > 0.05  # the adapter changes the model
    kept = backend.quantize(base, root / "q8-adapter", "q8_g64", {"adapter_path": str(adapter)})
    assert (kept.path / "adapters" / "adapters.safetensors").is_file()
    assert [f.name for f in kept.files] == ["model.safetensors", "adapters.safetensors"]
    assert kept.options["adapter"] == "adapter" and kept.options["fuse_adapter"] is False
    assert len(kept.options["adapter.sha256"]) == 64
    fused = backend.quantize(base, root / "q8-fused", "q8_g64", {"adapter_path": str(adapter), "fuse_adapter": "true"})
    assert not (fused.path / "adapters").exists() and fused.options["fuse_adapter"] is True
    for artifact in (kept, fused):  # both are the adapted model, up to 8-bit rounding
        assert relative_error(logits_of(artifact), adapted) < 0.05


def test_an_adapter_of_another_model_is_refused(backend: MLXBackend, base: Artifact, narrow: Artifact,
                                                tmp_path: Path) -> None:
    foreign = make_adapter(narrow.path, tmp_path / "foreign", num_layers=1)
    with pytest.raises(EdgeError) as exc:
        backend.quantize(base, tmp_path / "out", "q4_g64", {"adapter_path": str(foreign)})
    assert "does not match the base model" in one_line(exc)
    assert_nothing_left(tmp_path / "out")
    with pytest.raises(EdgeError) as exc:
        MLXRunner(base.path, threads=2, context_tokens=16, adapter_dir=foreign)
    assert "does not match the base model" in one_line(exc)
    (foreign / "adapter_config.json").unlink()
    with pytest.raises(EdgeError) as exc:
        backend.quantize(base, tmp_path / "out", "q4_g64", {"adapter_path": str(foreign)})
    assert "no mlx-lm adapter" in one_line(exc)
    assert_nothing_left(tmp_path / "out")


# -- corrupt folders and the runner --------------------------------------------------------------------------------
def test_corrupt_or_truncated_folders_are_refused(backend: MLXBackend, base: Artifact, tiny_source: SourceModel,
                                                  tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(base.path, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 1000])
    with pytest.raises(EdgeError, match="truncated or corrupt safetensors") as exc:
        backend.open_artifact(broken, tiny_source)
    one_line(exc)
    weights.write_bytes(b"\xff" * 64)  # not even a header
    artifact = dataclasses.replace(base, path=broken, files=(weights,))
    for attempt in (lambda: backend.load(artifact, threads=2, context_tokens=16),
                    lambda: backend.quantize(artifact, tmp_path / "out", "q4_g64")):
        with pytest.raises(EdgeError, match="not a valid safetensors file") as exc:
            attempt()
        one_line(exc)
    assert_nothing_left(tmp_path / "out")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(EdgeError, match="cannot read") as exc:
        backend.load(artifact, threads=2, context_tokens=16)
    one_line(exc)
    assert backend.open_artifact(tiny_source.path, tiny_source) is None  # an HF folder is not an MLX one


def test_runner_generates_greedily_with_mlx_lm(base: Artifact, reference: np.ndarray) -> None:
    runner = MLXRunner(base.path, threads=1, context_tokens=64)
    try:
        assert runner.threads == 1  # recorded; MLX has no thread setting
        generation = runner.generate(TOKENS[:8], 6)
        assert generation.generated_tokens == 6 and 0 < generation.ttft_s <= generation.total_s
        runner.reset()
        split = np.concatenate([runner.forward(TOKENS[:30]), runner.forward(TOKENS[30:])])
        assert np.allclose(split, reference, atol=1e-4)  # the KV cache continues the sequence
        with pytest.raises(EdgeError, match="exceeds the context of 64"):
            runner.forward(TOKENS[:30])
    finally:
        runner.close()


# -- SmolLM2 through the harness -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_4bit_is_smaller_than_8bit_with_higher_kld(demo_source: SourceModel, tmp_path: Path) -> None:
    from mlflow_edge.evaluation.harness import EvalSettings, Evaluator

    backend = MLXBackend()
    base = artifacts.convert(demo_source, "mlx", "float32")
    settings = EvalSettings(window=64, windows=2, threads=2, repeats=1, prefill_tokens=64, prompt_tokens=8,
                            decode_tokens=4, speed=False)
    evaluator = Evaluator(demo_source, settings, workdir=tmp_path / "eval")
    try:
        metrics = {precision: evaluator.evaluate(backend.quantize(base, tmp_path / precision, precision))
                   for precision in ("q4_g64", "q8_g64")}
    finally:
        evaluator.close()
    q4, q8 = metrics["q4_g64"], metrics["q8_g64"]
    assert q4["size_mb"] < q8["size_mb"] and q4["kld_mean"] > q8["kld_mean"]
    assert q8["kld_mean"] < 0.05 and q8["accuracy_retention"] > 0.95  # the RoPE base reached MLX


@pytest.mark.slow
def test_apple_silicon_search_in_accuracy_only_mode_promotes_a_champion(tracking_uri, tiny_source: SourceModel,
                                                                        tiny_settings) -> None:
    """On this Linux machine the apple-silicon target is searched by accuracy and size alone (never timed)."""
    import mlflow
    from mlflow import MlflowClient

    from mlflow_edge.search import SearchConfig, run_search

    with pytest.raises(EdgeError, match="--accuracy-only true"):
        run_search(SearchConfig(str(tiny_source.path), target="apple-silicon", trials=1, settings=tiny_settings))
    result = run_search(SearchConfig(str(tiny_source.path), target="apple-silicon", trials=2, accuracy_only=True,
                                     settings=tiny_settings, gates="accuracy_retention>=0.5",
                                     registered_model="tiny-apple"))
    trials = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`mlflow_edge.role` = 'candidate'")
    assert set(trials["params.backend"].dropna()) <= {"mlx", "llamacpp"} and "mlx" in set(trials["params.backend"])
    assert (trials["params.eval.speed"].dropna() == "false").all()
    version = MlflowClient().get_model_version_by_alias("tiny-apple", "apple-silicon-champion")
    assert version.tags["mlflow_edge.target"] == "apple-silicon" and result["promotion"]
