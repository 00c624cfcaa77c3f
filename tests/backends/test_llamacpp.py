"""The llama.cpp backend on a tiny random Llama: real conversion, real quantization, real inference.

What every backend must do (refusals, the Runner contract, open_artifact, sizes) is checked by
``tests/conformance/test_backend_contract.py``; this module keeps what is GGUF- and llama.cpp-specific.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest

from mlflow_edge import artifacts
from mlflow_edge.backends.base import Artifact
from mlflow_edge.errors import EdgeError
from mlflow_edge.evaluation.data import calibration_text, evaluation_text
from mlflow_edge.sources import SourceModel

pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from mlflow_edge.backends.llamacpp import MIXED, LlamaCppBackend, quant_types, read_imatrix  # noqa: E402

WIDTH = 256
VOCAB = 49152
LLAMA_FTYPE = {"F32": 0, "F16": 1, "Q8_0": 7}


@dataclasses.dataclass(frozen=True)
class GGUFInfo:
    file_type: int
    metadata: dict[str, object]
    types: dict[str, str]  # tensor name -> ggml type name
    ndims: dict[str, int]
    tensor_bytes: int


@functools.lru_cache(maxsize=None)
def inspect_gguf(path: Path) -> GGUFInfo:
    """One read of a GGUF file (parsing the 49k-token vocabulary takes a moment, so once per file)."""
    reader = gguf.GGUFReader(str(path))
    metadata = {name: reader.get_field(name).contents()
                for name in ("general.architecture", "llama.block_count", "llama.embedding_length")}
    return GGUFInfo(
        file_type=int(reader.get_field("general.file_type").contents()),
        metadata=metadata,
        types={t.name: t.tensor_type.name for t in reader.tensors},
        ndims={t.name: len(t.shape) for t in reader.tensors},
        tensor_bytes=sum(int(t.n_bytes) for t in reader.tensors),
    )


def file_type(path: Path) -> int:
    return inspect_gguf(path).file_type


def tensor_types(path: Path) -> dict[str, str]:
    return inspect_gguf(path).types


def block_matrices(path: Path) -> dict[str, str]:
    """Types of the 2-D weights of the transformer blocks (norms are 1-D and stay F32)."""
    info = inspect_gguf(path)
    return {name: kind for name, kind in info.types.items() if name.startswith("blk.") and info.ndims[name] == 2}


@pytest.fixture(scope="module")
def backend() -> LlamaCppBackend:
    return LlamaCppBackend()


@pytest.fixture(scope="module")
def f16(tiny_source: SourceModel) -> Artifact:
    return artifacts.convert(tiny_source, "llamacpp", "f16")


@pytest.fixture(scope="module")
def q8_base(tiny_source: SourceModel) -> Artifact:
    return artifacts.convert(tiny_source, "llamacpp", "q8_0")


@pytest.fixture(scope="module")
def f32(tiny_source: SourceModel) -> Artifact:
    return artifacts.convert(tiny_source, "llamacpp", "f32")


@pytest.fixture(scope="module")
def quantized(backend: LlamaCppBackend, f16: Artifact, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Artifact]:
    root = tmp_path_factory.mktemp("quantized")
    return {q: backend.quantize(f16, root / q, q) for q in ("Q2_K", "Q4_K_M", "Q8_0")}


@pytest.fixture(scope="module")
def tokens(tiny_source: SourceModel) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_source.path)
    ids = tokenizer(evaluation_text().text()[:2000], add_special_tokens=False)["input_ids"]
    return ids[:64]


# -- convert -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("precision", "expected"), [("f16", "F16"), ("q8_0", "Q8_0"), ("f32", "F32")])
def test_convert_writes_gguf_of_the_requested_type(tiny_source: SourceModel, precision: str, expected: str) -> None:
    artifact = artifacts.convert(tiny_source, "llamacpp", precision)
    assert artifact.precision == expected
    assert artifact.backend == "llamacpp" and artifact.format == "gguf"
    assert artifact.path.name == "model.gguf" and artifact.files == (artifact.path,)
    assert artifact.source_sha256 == tiny_source.sha256 and artifact.num_parameters == tiny_source.num_parameters
    assert file_type(artifact.path) == LLAMA_FTYPE[expected]
    info = inspect_gguf(artifact.path)
    assert info.metadata == {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": WIDTH}
    types = tensor_types(artifact.path)
    assert types["blk.0.attn_q.weight"] == expected
    assert types["blk.0.attn_norm.weight"] == "F32"
    # the tensors take 2 (f16), 34/32 (q8_0) or 4 (f32) bytes per weight; the rest is metadata (the vocabulary)
    per_weight = {"F16": 2.0, "Q8_0": 34 / 32, "F32": 4.0}[expected]
    tensor_bytes = info.tensor_bytes
    assert tensor_bytes == pytest.approx(per_weight * tiny_source.num_parameters, rel=0.01)
    assert tensor_bytes < artifact.size_bytes < tensor_bytes + 4_000_000


def test_convert_is_cached(tiny_source: SourceModel, f16: Artifact) -> None:
    again = artifacts.convert(tiny_source, "llamacpp", "F16")
    assert again.path == f16.path
    assert again == f16


# -- quantize ----------------------------------------------------------------------------------------------------
def test_quantized_sizes_are_ordered(quantized: dict[str, Artifact], f16: Artifact) -> None:
    sizes = {q: a.size_bytes for q, a in quantized.items()}
    assert sizes["Q2_K"] < sizes["Q4_K_M"] < sizes["Q8_0"] < f16.size_bytes
    types = quant_types()
    for qtype, artifact in quantized.items():
        assert artifact.precision == qtype
        assert file_type(artifact.path) == types[qtype]
        assert artifact.options == {"imatrix": False, "base_precision": "F16"}
        assert artifact.source_sha256 == f16.source_sha256
        assert artifact.path.parent.name == qtype and artifact.path.is_file()
        assert not list(artifact.path.parent.glob("*.partial"))
    assert tensor_types(quantized["Q8_0"].path)["blk.0.ffn_up.weight"] == "Q8_0"
    assert tensor_types(quantized["Q4_K_M"].path)["blk.0.ffn_up.weight"] == "Q4_K"
    assert tensor_types(quantized["Q2_K"].path)["blk.0.ffn_up.weight"] == "Q2_K"


def test_quantize_is_cached(tiny_source: SourceModel, f16: Artifact) -> None:
    first = artifacts.quantize(tiny_source, f16, "q4_k_m")
    second = artifacts.quantize(tiny_source, f16, "Q4_K_M")
    assert first == second and first.precision == "Q4_K_M"
    assert file_type(first.path) == quant_types()["Q4_K_M"]


def test_iq2_xs_needs_an_importance_matrix(backend: LlamaCppBackend, f16: Artifact, tmp_path: Path) -> None:
    with pytest.raises(EdgeError, match="imatrix") as exc:
        backend.quantize(f16, tmp_path / "out", "IQ2_XS")
    assert "IQ2_XS" in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(EdgeError, match="calibration"):  # an imatrix without calibration text
        backend.quantize(f16, tmp_path / "out2", "IQ2_XS", {"imatrix": True})


def test_iq2_xs_with_an_importance_matrix(backend: LlamaCppBackend, f16: Artifact, tiny_source: SourceModel,
                                          tmp_path: Path) -> None:
    calibration = calibration_text()
    options = {"imatrix": True, "imatrix_chunks": 4}  # 4 x 512 calibration tokens keep the test quick
    artifact = backend.quantize(f16, tmp_path / "iq", "IQ2_XS", options, calibration=calibration, source=tiny_source)
    assert artifact.precision == "IQ2_XS"
    assert file_type(artifact.path) == quant_types()["IQ2_XS"]
    assert artifact.options["imatrix"] is True
    assert artifact.options["calib.dataset"] == calibration.label == "wikitext-2[40000:]"
    assert artifact.options["calib.sha256"] == calibration.sha256
    assert tensor_types(artifact.path)["blk.0.ffn_up.weight"] == "IQ2_XS"

    imatrix_path = tmp_path / "iq" / "imatrix.gguf"
    reader = gguf.GGUFReader(str(imatrix_path))
    assert reader.get_field("general.type").contents() == "imatrix"
    assert int(reader.get_field("imatrix.chunk_count").contents()) == 4
    assert artifact.options["imatrix_chunks"] == 4
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts", "blk.1.ffn_down.weight.in_sum2"} <= names
    matrix = read_imatrix(imatrix_path)
    assert len(matrix) == 14  # 7 matmuls x 2 blocks (the tied output reuses token_embd)
    q = matrix["blk.0.attn_q.weight"]
    assert q.shape == (WIDTH,) and q.dtype == np.float32
    assert np.all(np.isfinite(q)) and np.all(q >= 0) and q.mean() > 0
    assert matrix["blk.0.ffn_down.weight"].shape == (512,)  # columns of ffn_down: the intermediate width


def test_pure_uses_one_type_for_every_block_matrix(backend: LlamaCppBackend, f16: Artifact, quantized,
                                                   tmp_path: Path) -> None:
    mixed = block_matrices(quantized["Q4_K_M"].path)
    assert set(mixed.values()) == {"Q4_K", "Q6_K"}  # the default Q4_K_M mixture
    pure = backend.quantize(f16, tmp_path / "pure", "Q4_K_M", {"pure": True})
    types = tensor_types(pure.path)
    blocks = block_matrices(pure.path)
    assert len(blocks) == 14 and set(blocks.values()) == {"Q4_K"}
    assert {types[name] for name in types if name.endswith("norm.weight")} == {"F32"}
    assert pure.options["pure"] is True
    assert pure.size_bytes < quantized["Q4_K_M"].size_bytes


def test_token_embedding_and_output_types(backend: LlamaCppBackend, f16: Artifact, quantized, tmp_path: Path) -> None:
    assert tensor_types(quantized["Q4_K_M"].path)["token_embd.weight"] == "Q6_K"
    options = {"output_tensor_type": "Q8_0", "token_embedding_type": "Q8_0"}
    artifact = backend.quantize(f16, tmp_path / "emb", "Q4_K_M", options)
    types = tensor_types(artifact.path)
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.ffn_up.weight"] == "Q4_K"
    assert artifact.options["token_embedding_type"] == "Q8_0"
    assert artifact.size_bytes > quantized["Q4_K_M"].size_bytes


def test_requantizing_needs_allow_requantize(backend: LlamaCppBackend, q8_base: Artifact, tmp_path: Path) -> None:
    assert q8_base.precision == "Q8_0"
    with pytest.raises(EdgeError, match="allow_requantize"):
        backend.quantize(q8_base, tmp_path / "refused", "Q4_K_M")
    assert not (tmp_path / "refused" / "model.gguf").exists()
    artifact = backend.quantize(q8_base, tmp_path / "requantized", "Q4_K_M", {"allow_requantize": True})
    assert artifact.precision == "Q4_K_M"
    assert artifact.options["base_precision"] == "Q8_0" and artifact.options["allow_requantize"] is True
    assert file_type(artifact.path) == quant_types()["Q4_K_M"]
    assert artifact.size_bytes < q8_base.size_bytes


def test_bad_tensor_types_are_refused(backend: LlamaCppBackend, f16: Artifact, tmp_path: Path) -> None:
    with pytest.raises(EdgeError, match="unknown ggml tensor type: Q9_9"):
        backend.quantize(f16, tmp_path / "b", "Q4_K_M", {"token_embedding_type": "Q9_9"})
    with pytest.raises(EdgeError, match="unknown ggml tensor type: int3"):
        backend.quantize(f16, tmp_path / "c", "Q4_K_M", {"output_tensor_type": "int3"})
    assert not any((tmp_path / name).exists() for name in "bc")


def test_quant_types_cover_llama_quantize() -> None:
    types = quant_types()
    expected = {"Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "IQ2_XS", "IQ4_NL", "F16", "F32"}
    assert expected <= set(types)
    assert types["F32"] == 0 and types["F16"] == 1 and types["Q8_0"] == 7
    assert len(set(types.values())) == len(types)
    assert set(LlamaCppBackend().quantize_precisions()) == set(types) | {MIXED}  # MIXED: a recipe decides


# -- runner ------------------------------------------------------------------------------------------------------
def test_llama_cpp_matches_transformers(tiny_source: SourceModel, backend: LlamaCppBackend, f32: Artifact,
                                        tokens: list[int]) -> None:
    from mlflow_edge.backends.reference import TransformersRunner

    reference = TransformersRunner(tiny_source.path, threads=2, context_tokens=128)
    loaded = backend.load(f32, threads=2, context_tokens=128)
    try:
        expected = reference.logits(tokens)
        actual = loaded.logits(tokens)
    finally:
        loaded.close()
        reference.close()
    assert expected.shape == actual.shape == (len(tokens), VOCAB) and expected.dtype == np.float32
    assert np.abs(expected - actual).max() < 1e-2  # measured ~5e-4 on logits of magnitude ~2
    assert (expected.argmax(-1) == actual.argmax(-1)).mean() >= 0.95


# -- the demo model end to end -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_q2_k_is_worse_than_q8_0(demo_source: SourceModel) -> None:
    from mlflow_edge.evaluation.harness import EvalSettings, Evaluator

    base = artifacts.convert(demo_source, "llamacpp", "f16")
    assert base.precision == "F16" and file_type(base.path) == 1
    q2 = artifacts.quantize(demo_source, base, "Q2_K")
    q8 = artifacts.quantize(demo_source, base, "Q8_0")
    assert q2.size_bytes < q8.size_bytes < base.size_bytes
    # one thread: llama.cpp's spinning thread pool slows down many times over when another process shares the cores
    evaluator = Evaluator(demo_source, EvalSettings(window=128, windows=4, repeats=2, threads=1))
    try:
        metrics = {artifact.precision: evaluator.evaluate(artifact) for artifact in (q2, q8)}
    finally:
        evaluator.close()
    low, high = metrics["Q2_K"], metrics["Q8_0"]
    assert low["perplexity"] > high["perplexity"]
    assert low["kld_mean"] > high["kld_mean"]
    assert high["accuracy_retention"] > 0.98
    assert high["top1_agreement"] > low["top1_agreement"]
