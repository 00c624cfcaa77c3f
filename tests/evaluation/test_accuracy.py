"""Perplexity, KL divergence and top-1 agreement from logits, checked against hand-computed values (numpy only)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mlflow_edge.evaluation.accuracy import AccuracyAccumulator, log_softmax, scored_positions

WINDOW = 8  # scores positions 4, 5, 6 predicting tokens 5, 6, 7


def test_scored_positions_are_the_second_half() -> None:
    assert scored_positions(8) == slice(4, 7)
    assert scored_positions(256) == slice(128, 255)


def test_log_softmax_rows_are_distributions() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=5.0, size=(6, 1000)).astype(np.float32)
    logits[0] += 1e4  # large offsets must not overflow
    logits[1, 3] = 80.0
    logprobs = log_softmax(logits)
    assert logprobs.dtype == np.float32
    assert np.all(np.isfinite(logprobs)) and np.all(logprobs <= 0)
    np.testing.assert_allclose(np.exp(logprobs).sum(axis=-1), 1.0, rtol=1e-5)
    assert np.array_equal(logprobs.argmax(axis=-1), logits.argmax(axis=-1))
    np.testing.assert_allclose(log_softmax(np.array([[0.0, math.log(3.0)]])), [[math.log(0.25), math.log(0.75)]],
                               rtol=1e-6)


def test_uniform_logits_give_perplexity_equal_to_vocab_size() -> None:
    vocab = 50
    acc = AccuracyAccumulator(WINDOW)
    tokens = np.arange(WINDOW) * 7 % vocab
    acc.add(0, tokens, np.zeros((WINDOW, vocab), dtype=np.float32))
    acc.add(1, tokens[::-1].copy(), np.full((WINDOW, vocab), 3.5, dtype=np.float32))
    metrics = acc.metrics()
    assert metrics["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert set(metrics) == {"perplexity"}  # no reference: no KLD or agreement


def test_perplexity_scores_only_the_target_tokens_of_the_second_half() -> None:
    vocab = 4
    logits = np.zeros((WINDOW, vocab), dtype=np.float32)
    logits[:, 2] = math.log(3.0)  # p(token 2) = 3/6 = 0.5, others 1/6
    tokens = np.array([0, 0, 0, 0, 0, 2, 2, 1])  # targets 2, 2, 1
    acc = AccuracyAccumulator(WINDOW)
    acc.add(0, tokens, logits)
    expected = math.exp(-(2 * math.log(0.5) + math.log(1 / 6)) / 3)
    assert acc.metrics()["perplexity"] == pytest.approx(expected, rel=1e-5)
    tokens[:5] = 3  # the first half and the first scored input do not matter
    other = AccuracyAccumulator(WINDOW)
    other.add(0, tokens, logits)
    assert other.metrics()["perplexity"] == pytest.approx(expected, rel=1e-5)


def reference_of(windows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    span = scored_positions(WINDOW)
    logprobs = np.stack([log_softmax(w[span]) for w in windows])
    return logprobs, logprobs.argmax(axis=-1)


def test_identical_logits_give_zero_kld_and_full_agreement() -> None:
    rng = np.random.default_rng(1)
    windows = [rng.normal(size=(WINDOW, 32)).astype(np.float32) for _ in range(3)]
    acc = AccuracyAccumulator(WINDOW, reference_of(windows))
    for i, logits in enumerate(windows):
        acc.add(i, rng.integers(0, 32, WINDOW), logits)
    metrics = acc.metrics()
    assert metrics["kld_mean"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["kld_p99"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["top1_agreement"] == 1.0


def test_two_token_vocabulary_kld_matches_hand_computation() -> None:
    # reference p = (1/2, 1/2); candidate q = (3/4, 1/4): KL(p||q) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    reference_logits = np.zeros((WINDOW, 2), dtype=np.float32)
    candidate = np.tile(np.array([math.log(3.0), 0.0], dtype=np.float32), (WINDOW, 1))
    candidate[6] = [0.0, math.log(3.0)]  # last scored position: q = (1/4, 3/4), same KLD, other argmax
    reference = reference_of([reference_logits])
    reference[1][0] = [0, 0, 0]  # a tie: the reference's argmax is token 0
    acc = AccuracyAccumulator(WINDOW, reference)
    acc.add(0, np.zeros(WINDOW, dtype=np.int64), candidate)
    metrics = acc.metrics()
    assert metrics["kld_mean"] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)
    assert metrics["kld_p99"] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)
    assert metrics["top1_agreement"] == pytest.approx(2 / 3)
    # targets all 0: q(0) = 3/4, 3/4, 1/4
    assert metrics["perplexity"] == pytest.approx(math.exp(-(2 * math.log(0.75) + math.log(0.25)) / 3), rel=1e-5)


def test_kld_is_reference_weighted_not_symmetric() -> None:
    p_logits = np.tile(np.log(np.array([0.9, 0.1], dtype=np.float32)), (WINDOW, 1))
    q_logits = np.tile(np.log(np.array([0.5, 0.5], dtype=np.float32)), (WINDOW, 1))
    acc = AccuracyAccumulator(WINDOW, reference_of([p_logits]))
    acc.add(0, np.zeros(WINDOW, dtype=np.int64), q_logits)
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(reference || candidate)
    assert acc.metrics()["kld_mean"] == pytest.approx(expected, rel=1e-5)


def test_saved_reference_round_trips_as_float16(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    windows = [rng.normal(scale=3.0, size=(WINDOW, 64)).astype(np.float32) for _ in range(4)]
    tokens = [rng.integers(0, 64, WINDOW) for _ in windows]
    reference_run = AccuracyAccumulator(WINDOW)
    for i, (row, logits) in enumerate(zip(tokens, windows)):
        reference_run.add(i, row, logits, keep=True)
    saved = reference_run.save_reference(tmp_path / "logprobs.npy", tmp_path / "argmax.npy")
    logprobs, argmax = saved.open()
    assert logprobs.dtype == np.float16 and logprobs.shape == (4, 3, 64)
    assert argmax.shape == (4, 3)

    same = AccuracyAccumulator(WINDOW, (logprobs, argmax))
    shifted = AccuracyAccumulator(WINDOW, (logprobs, argmax))
    for i, (row, logits) in enumerate(zip(tokens, windows)):
        same.add(i, row, logits)
        shifted.add(i, row, logits + 100.0)  # a constant shift is the same distribution
    for metrics in (same.metrics(), shifted.metrics()):
        assert 0.0 <= metrics["kld_mean"] < 1e-3  # float16 storage rounding only
        assert metrics["top1_agreement"] == 1.0
        assert metrics["perplexity"] == pytest.approx(reference_run.metrics()["perplexity"], rel=1e-4)

    noisy = AccuracyAccumulator(WINDOW, (logprobs, argmax))
    for i, (row, logits) in enumerate(zip(tokens, windows)):
        noisy.add(i, row, logits + rng.normal(scale=3.0, size=logits.shape).astype(np.float32))
    assert noisy.metrics()["kld_mean"] > 0.1
    assert noisy.metrics()["top1_agreement"] < 1.0


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_windows():
    import numpy as np

    from mlflow_edge.evaluation.accuracy import bootstrap_interval

    rng = np.random.default_rng(1)
    few, many = rng.normal(0.05, 0.02, 4), rng.normal(0.05, 0.02, 64)
    low_few, high_few = bootstrap_interval(few)
    low_many, high_many = bootstrap_interval(many)
    assert low_few <= few.mean() <= high_few and low_many <= many.mean() <= high_many
    assert high_many - low_many < high_few - low_few
    assert bootstrap_interval(few) == (low_few, high_few)  # seeded: the same scores give the same bounds
    assert bootstrap_interval(few, confidence=0.5)[1] - bootstrap_interval(few, confidence=0.5)[0] < high_few - low_few
    assert all(v != v for v in bootstrap_interval(few[:1]))  # one window: no interval (NaN)
