"""The backend contract, checked the same way against every registered backend on the tiny random Llama.

Nothing here names a framework: what a backend must do is read from its own declarations (``base_precision``,
``starting_points``, ``search_space``, ``option_specs`` …) and every tolerance from what its runtime measures on this
machine. A backend-specific behaviour belongs in ``tests/backends/test_<name>.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import shutil
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import optuna
import pytest

from mlflow_edge.backends import Artifact, Backend, OptionSpec, Runner, backend_names, get_backend
from mlflow_edge.errors import EdgeError
from mlflow_edge.evaluation.accuracy import log_softmax
from mlflow_edge.evaluation.data import calibration_text, evaluation_text
from mlflow_edge.sources import SourceModel
from mlflow_edge.targets import TARGETS

CONTEXT_TOKENS = 64
THREADS = 2
REQUEST_PARAMS = {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0, "repetition_penalty": 1.0}


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, f"not a one-line error: {message!r}"
    return message


def assert_nothing_left(folder: Path) -> None:
    assert not folder.exists() or not any(folder.iterdir()), f"left behind: {sorted(folder.iterdir())}"


def kld_mean(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean KL divergence of ``candidate``'s next-token distributions from ``reference``'s (nats)."""
    expected, actual = log_softmax(reference), log_softmax(candidate)
    return float((np.exp(expected) * (expected - actual)).sum(axis=-1).mean())


def copy_artifact(artifact: Artifact, folder: Path) -> Artifact:
    """``artifact``'s file or folder copied under ``folder``, described as the same artifact."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / artifact.path.name
    if artifact.path.is_dir():
        shutil.copytree(artifact.path, target)
        files = tuple(target / f.relative_to(artifact.path) for f in artifact.files)
    else:
        shutil.copyfile(artifact.path, target)
        files = (target,)
    return dataclasses.replace(artifact, path=target, files=files)


# -- fixtures: one backend per parameter (read from the entry points at collection), converted and quantized once
@pytest.fixture(scope="module", params=backend_names())
def backend(request: pytest.FixtureRequest, tiny_source: SourceModel) -> Backend:
    """The backend registered under the parameter's name; skipped when its framework is not installed here."""
    try:
        instance = get_backend(request.param)
        instance.versions()  # EdgeError naming the extra to install when the framework is missing
    except EdgeError as exc:
        pytest.skip(f"backend {request.param}: {exc}")
    if reason := instance.unsupported_reason(tiny_source):
        pytest.skip(f"backend {request.param} cannot convert the tiny Llama: {reason}")
    return instance


@pytest.fixture(scope="module")
def workdir(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp(f"conformance-{backend.name}")


@pytest.fixture(scope="module")
def base(backend: Backend, tiny_source: SourceModel, workdir: Path) -> Artifact:
    """The tiny Llama converted at the backend's ``base_precision`` (no cache: the backend's own ``convert``)."""
    return backend.convert(tiny_source, workdir / "base", backend.base_precision)


@pytest.fixture(scope="module")
def first_point(backend: Backend) -> tuple[str, dict[str, Any]]:
    """``(precision, options)`` of the backend's first starting point, as the search would quantize it."""
    return backend.search_space(optuna.trial.FixedTrial(dict(backend.starting_points()[0])))


@pytest.fixture(scope="module")
def quantized(backend: Backend, base: Artifact, first_point: tuple[str, dict[str, Any]], tiny_source: SourceModel,
              workdir: Path) -> Artifact:
    precision, options = first_point
    return backend.quantize(base, workdir / "quantized", precision, options, calibration=calibration_text(),
                            source=tiny_source)


@pytest.fixture(scope="module")
def runner(backend: Backend, base: Artifact) -> Iterator[Runner]:
    loaded = backend.load(base, threads=THREADS, context_tokens=CONTEXT_TOKENS)
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def tokens(tiny_source: SourceModel) -> list[int]:
    """48 token ids of the evaluation text (the source tokenizer's, as every Runner takes)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_source.path)
    return tokenizer(evaluation_text().text()[:2000], add_special_tokens=False)["input_ids"][:48]


@pytest.fixture(scope="session")
def reference_logits(tiny_source: SourceModel, tokens: list[int]) -> np.ndarray:
    """The source model's own logits for ``tokens`` (transformers, fp32): what every backend reproduces."""
    from mlflow_edge.backends.reference import TransformersRunner

    reference = TransformersRunner(tiny_source.path, threads=THREADS, context_tokens=CONTEXT_TOKENS)
    try:
        return reference.logits(tokens)
    finally:
        reference.close()


@pytest.fixture(scope="session")
def off_by_one_kld(reference_logits: np.ndarray) -> float:
    """KL divergence of the reference from itself one position off: what a runner misaligned by a token scores, and
    the yardstick of "the same model" below (measured, so it holds for any tiny model and any CPU)."""
    return kld_mean(reference_logits, np.roll(reference_logits, 1, axis=0))


# -- declarations --------------------------------------------------------------------------------------------------
def test_class_declarations(backend: Backend) -> None:
    assert re.fullmatch(r"[a-z][a-z0-9_]*", backend.name)
    assert re.fullmatch(r"[a-z][a-z0-9_]*", backend.format)
    flavor = importlib.import_module(backend.flavor)
    assert isinstance(getattr(flavor, "FLAVOR_NAME", None), str)
    assert callable(getattr(flavor, "log_model", None)) and callable(getattr(flavor, "load_model", None))
    assert backend.requirements and all(isinstance(r, str) for r in backend.requirements)
    for requirement in backend.requirements:  # the framework is installed here, so its runtime is too
        try:
            version(requirement)
        except PackageNotFoundError:
            pytest.fail(f"requirement {requirement} of {backend.name} is no installed distribution")
    assert backend.targets and set(backend.targets) <= set(TARGETS)
    assert set(backend.targets.values()) <= {"primary", "secondary"}
    assert backend.base_precision in backend.convert_precisions()
    assert backend.sweep_types and set(backend.sweep_types) <= set(backend.quantize_precisions())
    versions = backend.versions()
    assert versions and all(isinstance(k, str) and isinstance(v, str) and v for k, v in versions.items())


def test_option_specs(backend: Backend) -> None:
    specs = backend.option_specs()
    names = [spec.name for spec in specs]
    assert len(names) == len(set(names))
    for spec in specs:
        assert isinstance(spec, OptionSpec) and re.fullmatch(r"[a-z][a-z0-9_]*", spec.name)
        assert spec.default is None or isinstance(spec.default, spec.type), spec
        assert spec.choices is None or spec.default is None or spec.default in spec.choices, spec


def test_starting_points_are_points_of_the_search_space(backend: Backend) -> None:
    points = backend.starting_points()
    assert points
    options = {spec.name for spec in backend.option_specs()}
    for point in points:
        assert all(key.startswith(f"{backend.name}.") for key in point)
        trial = optuna.trial.FixedTrial(dict(point))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # optuna only warns about a fixed value outside its distribution
            precision, chosen = backend.search_space(trial)
        assert set(trial.params) == set(point), "a starting point must set exactly the parameters the space samples"
        assert precision in backend.quantize_precisions()
        assert set(chosen) <= options


def test_search_space_samples_valid_configurations(backend: Backend) -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    options = {spec.name for spec in backend.option_specs()}
    for _ in range(20):
        trial = study.ask()
        precision, chosen = backend.search_space(trial)
        assert all(name.startswith(f"{backend.name}.") for name in trial.params)
        assert precision in backend.quantize_precisions() and set(chosen) <= options
        study.tell(trial, 0.0)


# -- convert and quantize ------------------------------------------------------------------------------------------
def test_convert_at_base_precision(backend: Backend, base: Artifact, tiny_source: SourceModel) -> None:
    assert base.backend == backend.name and base.format == backend.format
    assert base.precision.lower() == backend.base_precision.lower()
    assert base.source_name == tiny_source.name and base.source_sha256 == tiny_source.sha256
    assert base.num_parameters == tiny_source.num_parameters
    assert base.path.exists() and base.files
    for file in base.files:
        assert file.is_file() and file.stat().st_size > 0
        assert file == base.path or base.path in file.parents
    assert base.size_bytes == sum(f.stat().st_size for f in base.files)


def test_open_artifact_recognizes_its_format_only(backend: Backend, base: Artifact, quantized: Artifact,
                                                  tiny_source: SourceModel, tmp_path: Path) -> None:
    for artifact in (base, quantized):
        opened = backend.open_artifact(artifact.path, tiny_source)
        assert opened is not None, f"{backend.name} does not recognize its own {artifact.path}"
        assert opened.backend == backend.name and opened.format == backend.format
        assert opened.source_sha256 == tiny_source.sha256 and opened.size_bytes == artifact.size_bytes
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    for foreign in (text, empty):
        assert backend.open_artifact(foreign, tiny_source) is None


def test_quantize_the_first_starting_point(backend: Backend, base: Artifact, quantized: Artifact,
                                           first_point: tuple[str, dict[str, Any]]) -> None:
    precision, _ = first_point
    assert quantized.backend == backend.name and quantized.format == backend.format
    assert quantized.precision.upper() == precision.upper()
    assert quantized.source_sha256 == base.source_sha256 and quantized.num_parameters == base.num_parameters
    assert all(f.is_file() and f.stat().st_size > 0 for f in quantized.files)
    assert quantized.size_bytes < base.size_bytes


def test_quantized_artifact_runs_the_same_model(backend: Backend, quantized: Artifact, tokens: list[int],
                                                reference_logits: np.ndarray, off_by_one_kld: float) -> None:
    loaded = backend.load(quantized, threads=THREADS, context_tokens=CONTEXT_TOKENS)
    try:
        logits = loaded.logits(tokens)
    finally:
        loaded.close()
    assert logits.shape == reference_logits.shape and np.isfinite(logits).all()
    # quantization noise, not another model: far closer to the source than the source is to itself a token off
    assert kld_mean(reference_logits, logits) < 0.5 * off_by_one_kld


# -- the runner ----------------------------------------------------------------------------------------------------
def test_logits(runner: Runner, tokens: list[int], reference_logits: np.ndarray, off_by_one_kld: float) -> None:
    logits = runner.logits(tokens)
    assert logits.shape == reference_logits.shape == (len(tokens), reference_logits.shape[1])
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    assert np.array_equal(runner.logits(tokens), logits)  # every call starts a fresh sequence
    # the base conversion is the source model up to its number format and the runtime's compute type (bf16 inference,
    # the coarsest, measures a few 1e-4 of the yardstick); a runner one token off would score the yardstick itself
    assert kld_mean(reference_logits, logits) < 0.01 * off_by_one_kld


def test_logits_are_causal(runner: Runner, tokens: list[int], reference_logits: np.ndarray) -> None:
    full = runner.logits(tokens)
    prefixes = {k: runner.logits(tokens[:k]) for k in (1, 9, 24, len(tokens) - 1)}
    # The last row of a prefix sees the whole prefix whether or not the runtime masks the future, so its distance to
    # the fp32 reference is this runtime's own precision on this CPU (weight format, compute type, kernels): the
    # rows of a prefix and of a longer sequence may differ by that rounding, a leak of later tokens by far more.
    precision = max(float(np.abs(p[-1] - reference_logits[k - 1]).max()) for k, p in prefixes.items())
    tolerance = 4 * precision + 1e-6 * float(np.abs(reference_logits).max())
    for k, prefix in prefixes.items():
        assert prefix.shape == (k, full.shape[1])
        deviation = float(np.abs(full[:k] - prefix).max())
        assert deviation <= tolerance, f"prefix of {k}: {deviation:.3g} > {tolerance:.3g} (precision {precision:.3g})"


def test_generate_and_prefill_are_timed(runner: Runner, tokens: list[int]) -> None:
    first = runner.logits(tokens[:8])
    generation = runner.generate(tokens[:16], 8)
    assert generation.prompt_tokens == 16 and generation.generated_tokens == 8
    assert 0 < generation.ttft_s <= generation.total_s
    assert runner.prefill(tokens[:32]) > 0
    assert np.array_equal(runner.logits(tokens[:8]), first)  # neither left state behind: every call starts afresh


def test_sequences_longer_than_the_context_are_refused(runner: Runner, tokens: list[int]) -> None:
    too_long = (tokens * 3)[: CONTEXT_TOKENS + 1]
    with pytest.raises(EdgeError) as exc:
        runner.logits(too_long)
    one_line(exc)
    with pytest.raises(EdgeError) as exc:
        runner.prefill(too_long)
    one_line(exc)
    with pytest.raises(EdgeError) as exc:  # the prompt fits, the tokens generated after it do not
        runner.generate(too_long[: CONTEXT_TOKENS - 2], 4)
    one_line(exc)
    assert runner.logits(tokens[:8]).shape[0] == 8  # still usable afterwards


def test_a_closed_runner_refuses_every_call(backend: Backend, base: Artifact) -> None:
    loaded = backend.load(base, threads=THREADS, context_tokens=16)
    assert loaded.logits([1, 2, 3]).shape[0] == 3
    loaded.close()
    loaded.close()  # twice is harmless
    for use in (lambda: loaded.logits([1, 2, 3]), lambda: loaded.prefill([1, 2]), lambda: loaded.generate([1], 2)):
        with pytest.raises(EdgeError) as exc:  # never a use of freed runtime memory
            use()
        one_line(exc)


# -- bad input -----------------------------------------------------------------------------------------------------
def test_unknown_precisions_are_refused(backend: Backend, base: Artifact, tiny_source: SourceModel,
                                        tmp_path: Path) -> None:
    with pytest.raises(EdgeError) as exc:
        backend.convert(tiny_source, tmp_path / "convert", "no_such_precision")
    assert "no_such_precision" in one_line(exc).lower()
    assert_nothing_left(tmp_path / "convert")
    with pytest.raises(EdgeError) as exc:
        backend.quantize(base, tmp_path / "quantize", "NO_SUCH_PRECISION")
    assert "no_such_precision" in one_line(exc).lower()
    assert_nothing_left(tmp_path / "quantize")


def test_unknown_options_are_refused(backend: Backend, base: Artifact, first_point: tuple[str, dict[str, Any]],
                                     tiny_source: SourceModel, tmp_path: Path) -> None:
    precision, options = first_point
    with pytest.raises(EdgeError) as exc:
        backend.quantize(base, tmp_path / "out", precision, {**options, "no_such_option": 1},
                         calibration=calibration_text(), source=tiny_source)
    assert "no_such_option" in one_line(exc)
    assert_nothing_left(tmp_path / "out")


def test_truncated_model_files_are_refused(backend: Backend, base: Artifact, first_point: tuple[str, dict[str, Any]],
                                           tiny_source: SourceModel, tmp_path: Path) -> None:
    broken = copy_artifact(base, tmp_path / "broken")
    for file in broken.files:  # cut every model file in half, as an interrupted copy or download leaves it
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgeError) as exc:
        backend.open_artifact(broken.path, tiny_source)
    one_line(exc)
    with pytest.raises(EdgeError) as exc:
        backend.load(broken, threads=THREADS, context_tokens=CONTEXT_TOKENS)
    one_line(exc)
    precision, options = first_point
    with pytest.raises(EdgeError) as exc:
        backend.quantize(broken, tmp_path / "out", precision, options, calibration=calibration_text(),
                         source=tiny_source)
    one_line(exc)
    assert_nothing_left(tmp_path / "out")


# -- the logged model ----------------------------------------------------------------------------------------------
def test_pyfunc_request_contract(quantized: Artifact, tracking_uri: str) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    from mlflow_edge.flavors import log_artifact_model

    with mlflow.start_run():
        info = log_artifact_model(quantized, name="model")
    model = mlflow.pyfunc.load_model(info.model_uri)
    prompts = ["The capital of France is"]
    outputs = list(model.predict(prompts, params=REQUEST_PARAMS))
    assert len(outputs) == len(prompts) and all(isinstance(text, str) for text in outputs)
    for bad in ({"max_tokens": -1}, {"bogus": 1}):
        with pytest.raises(MlflowException):
            model.predict(prompts, params=bad)
