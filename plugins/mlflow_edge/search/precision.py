"""The order of precision: what a search learns about bits from its finished trials.

Each backend says what a configuration spends on its weights before it is quantized
(:meth:`~mlflow_edge.backends.base.Backend.precision_bits`: a method and bits per weight). Of one backend and one
method, fidelity falls as the bits fall, so every finished trial says something about its neighbours:

- a fidelity gate failed at ``b`` bits makes every configuration of that method at ``<= b`` bits **unlikely**: the
  sampler leaves them while anything else is left (:meth:`PrecisionOrder.plausible`);
- the mean KLD measured at a few bits predicts it at the others — ``log KLD`` falls linearly with the bits, fitted to
  the method's trials (with one trial, by ``ln 4`` a bit: one more bit quarters the quantization noise) — so after a
  trial the search tries the configuration of that method **predicted to sit nearest the KLD gate** (the smallest
  predicted to pass below the smallest that passed; :meth:`PrecisionOrder.next_point`). Without a KLD gate a pass
  makes the next lower bits worth trying;
- where a backend measured its own per-tensor sensitivity (llama.cpp, for a budgeted recipe), its estimate of each
  configuration's mean KLD (:class:`SensitivityEstimate`), scaled by how it meets that backend's measured trials,
  takes the fit's place;
- the starting points follow the gates: a near-lossless KLD ceiling starts each backend at its 8-bit configuration,
  a loose one at 4 bits, the default at the backends' own defaults (:func:`gated_starting_points`).

Knows no framework: the backends' :class:`~mlflow_edge.backends.base.Bits` are all it reads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from mlflow_edge.backends import optional_method
from mlflow_edge.backends.base import Bits
from mlflow_edge.gates import Gates
from mlflow_edge.search.space import suggest
from mlflow_edge.sources import SourceModel

BITS_ATTR = "bits"
"""Trial user attribute: ``{"method", "bpw"}`` of its configuration (:class:`Bits`)."""
PREDICTED_ATTR = "predicted_kld_mean"
"""Trial user attribute: the mean KLD :class:`PrecisionOrder` predicted for it before it was measured."""
ESTIMATED_ATTR = "estimated_kld_mean"
"""Trial user attribute: the backend's own sensitivity estimate of its mean KLD (:class:`SensitivityEstimate`)."""
NOISE_SLOPE = math.log(4.0)
"""How much ``log KLD`` falls per bit when a method has one measured trial: one bit more quarters the noise power."""
SLOPE_RANGE = (0.2, 2.5)
"""The fitted slope is kept within this (per bit): a few noisy trials must not predict a cliff or a plateau."""
START_BITS = ((0.01, 8.0), (0.1, None), (math.inf, 4.0))
"""KLD ceiling → the bits a new study starts each backend at (``None``: the backends' own defaults): up to 0.01
(near-lossless) the 8-bit types, up to 0.1 (balanced) what users pick by default, looser the 4-bit ones."""


@dataclasses.dataclass(frozen=True)
class Configuration:
    """One point of the space with the bits it spends (``bits`` is ``None`` when its backend cannot say)."""

    params: Mapping[str, Any]
    backend: str
    bits: Bits | None
    precision: str = ""
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def group(self) -> tuple[str, str] | None:
        return (self.backend, self.bits.method) if self.bits else None


def configuration(params: Mapping[str, Any], backends: Sequence[str], source: SourceModel) -> Configuration:
    """``params`` (a trial's, or a point of the listed space) with their backend's :class:`Bits`."""
    backend, precision, options = suggest(optuna.trial.FixedTrial(dict(params)), backends)
    return Configuration(dict(params), backend, bits_of(backend, precision, options, source), precision, options)


@dataclasses.dataclass
class SensitivityEstimate:
    """The mean KLD a backend's own per-tensor sensitivity predicts for a configuration, where the backend offers
    one (``estimated_kld``; llama.cpp, once a budgeted recipe has measured its table) and it is already measured:
    no sensitivity is measured for an estimate (the backend's base, cached, is converted first where it is not yet:
    its trials need it anyway)."""

    source: SourceModel
    calibration: Any
    found: dict[tuple, float] = dataclasses.field(default_factory=dict)
    """Estimates found so far, by configuration (a measured table never changes, so neither do they)."""

    def __call__(self, config: Configuration) -> float | None:
        from mlflow_edge.artifacts import convert

        key = _key(config.params)
        if key in self.found:
            return self.found[key]
        estimate = optional_method(config.backend, "estimated_kld")
        if estimate is None:
            return None
        value = estimate(convert(self.source, config.backend), config.precision, config.options, self.calibration,
                         self.source)
        if value is not None:  # an unknown one may become known once a budgeted recipe measures the table
            self.found[key] = value
        return value


def bits_of(backend: str, precision: str, options: Mapping[str, Any], source: SourceModel) -> Bits | None:
    """The backend's :class:`Bits` of a configuration; ``None`` for a backend that does not declare them (a
    third-party backend written before ``precision_bits``)."""
    declare = optional_method(backend, "precision_bits")
    return declare(precision, options, source) if declare is not None else None


@dataclasses.dataclass
class Evidence:
    """What the finished trials of one (backend, method) say: bits that failed and passed the fidelity gates, and
    the mean KLD measured at each."""

    failed: list[float] = dataclasses.field(default_factory=list)
    passed: list[float] = dataclasses.field(default_factory=list)
    kld: list[tuple[float, float]] = dataclasses.field(default_factory=list)

    @property
    def highest_failure(self) -> float:
        return max(self.failed, default=-math.inf)

    @property
    def lowest_pass(self) -> float:
        return min(self.passed, default=math.inf)

    def predict(self, bpw: float) -> float | None:
        """The mean KLD at ``bpw``: ``log KLD`` linear in the bits through the measured trials."""
        points = [(b, math.log(k)) for b, k in self.kld if k > 0]
        if not points:
            return None
        bits, logs = np.array([b for b, _ in points]), np.array([v for _, v in points])
        slope = NOISE_SLOPE
        if len(set(bits.tolist())) > 1:
            slope = float(np.clip(-np.polyfit(bits, logs, 1)[0], *SLOPE_RANGE))
        nearest = int(np.argmin(np.abs(bits - bpw)))  # anchored at the nearest measurement
        return float(math.exp(logs[nearest] - slope * (bpw - bits[nearest])))


def trial_outcome(trial: FrozenTrial, gates: Gates) -> tuple[bool | None, float | None]:
    """Whether a finished trial passed the fidelity gates (``None``: unknown) and its mean KLD, from its full
    metrics or, for a pruned trial, its screening."""
    metrics = trial.user_attrs.get("metrics") or trial.user_attrs.get("screen") or {}
    if not metrics or trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
        return None, None
    kld = metrics.get("kld_mean")
    return gates.fidelity_passed(metrics), (float(kld) if kld is not None and math.isfinite(kld) else None)


@dataclasses.dataclass
class PrecisionOrder:
    """The space's configurations with their bits, and the evidence of a study's finished trials."""

    configurations: list[Configuration]
    gates: Gates
    estimate: Any = None
    """A :class:`SensitivityEstimate` (or any configuration → mean KLD or ``None``), preferred to the fit."""

    def __post_init__(self) -> None:
        self._by_params = {_key(c.params): c for c in self.configurations}

    @classmethod
    def of(cls, space: Sequence[Mapping[str, Any]], backends: Sequence[str], source: SourceModel,
           gates: Gates, estimate: Any = None) -> "PrecisionOrder":
        return cls([configuration(point, backends, source) for point in space], gates, estimate)

    def estimated(self, config: Configuration) -> float | None:
        """The backend's own estimate of ``config``'s mean KLD, where there is one (errors leave it unknown)."""
        if self.estimate is None:
            return None
        try:
            value = self.estimate(config)
        except Exception:  # an estimate only orders the search: a failing one leaves the fit in charge
            return None
        return value if value is not None and math.isfinite(value) and value > 0 else None

    def predict(self, config: Configuration, trials: Sequence[FrozenTrial],
                known: Evidence | None = None) -> float | None:
        """``config``'s mean KLD: the backend's estimate scaled by how it meets the backend's measured trials
        (:meth:`estimate_scale`), else (no estimate, or no measured trial to scale it by) the log-linear fit of its
        method's evidence."""
        estimate = self.estimated(config)
        scale = self.estimate_scale(config.backend, trials) if estimate is not None else None
        if scale is not None:
            return estimate * scale
        known = known if known is not None else self.evidence(trials).get(config.group) if config.group else None
        return known.predict(config.bits.bpw) if known is not None else None

    def estimate_scale(self, backend: str, trials: Sequence[FrozenTrial]) -> float | None:
        """The geometric mean of measured over estimated mean KLD among ``backend``'s finished trials that the
        backend can estimate now (``None`` when none can): an estimate is right about the order, the trials tell
        its scale."""
        ratios = []
        for trial in trials:
            config = self.configuration_of(trial.params) if trial.user_attrs.get("backend") == backend else None
            kld = trial_outcome(trial, self.gates)[1] if config is not None else None
            estimate = self.estimated(config) if kld else None
            if estimate:
                ratios.append(math.log(kld / estimate))
        return math.exp(sum(ratios) / len(ratios)) if ratios else None

    def configuration_of(self, params: Mapping[str, Any]) -> Configuration | None:
        """The listed configuration with these parameters."""
        return self._by_params.get(_key(params))

    def evidence(self, trials: Sequence[FrozenTrial]) -> dict[tuple[str, str], Evidence]:
        found: dict[tuple[str, str], Evidence] = {}
        for trial in trials:
            bits = trial.user_attrs.get(BITS_ATTR)
            passed, kld = trial_outcome(trial, self.gates)
            if not bits or "twin_of" in trial.user_attrs or (passed is None and kld is None):
                continue
            entry = found.setdefault((trial.user_attrs.get("backend", ""), bits["method"]), Evidence())
            if passed is not None:
                (entry.passed if passed else entry.failed).append(bits["bpw"])
            if kld is not None:
                entry.kld.append((bits["bpw"], kld))
        return found

    def unlikely(self, config: Configuration, evidence: Mapping[tuple[str, str], Evidence]) -> bool:
        """At or below bits where its method already failed a fidelity gate."""
        known = evidence.get(config.group) if config.group else None
        return known is not None and config.bits.bpw <= known.highest_failure

    def plausible(self, open_points: Sequence[Mapping[str, Any]],
                  trials: Sequence[FrozenTrial]) -> list[Mapping[str, Any]]:
        """``open_points`` without the unlikely ones, or all of them when nothing else is left."""
        evidence = self.evidence(trials)
        by_params = self._by_params
        kept = [p for p in open_points if not (c := by_params.get(_key(p))) or not self.unlikely(c, evidence)]
        return kept or list(open_points)

    def next_point(self, open_points: Sequence[Mapping[str, Any]],
                   trials: Sequence[FrozenTrial]) -> Mapping[str, Any] | None:
        """The open configuration the evidence says to try now: of the method whose latest trial is the oldest
        (so every method gets its turn), the one nearest its gate (:meth:`_step`); ``None`` when no method has one."""
        evidence = self.evidence(trials)
        latest: dict[tuple[str, str], int] = {}
        for trial in trials:
            if bits := trial.user_attrs.get(BITS_ATTR):
                latest[(trial.user_attrs.get("backend", ""), bits["method"])] = trial.number
        open_keys = {_key(p) for p in open_points}
        for group in sorted(evidence, key=lambda g: latest.get(g, -1)):
            choices = [c for c in self.configurations if c.group == group and _key(c.params) in open_keys]
            step = self._step(choices, evidence[group], trials)
            if step is not None:
                return step.params
        return None

    def _step(self, choices: Sequence[Configuration], known: Evidence,
              trials: Sequence[FrozenTrial]) -> Configuration | None:
        """Below the lowest pass and above the highest failure: the smallest predicted to pass the KLD ceiling,
        else the one predicted nearest it; without a ceiling or a prediction, the next lower bits under a pass."""
        between = sorted((c for c in choices if known.highest_failure < c.bits.bpw < known.lowest_pass),
                         key=lambda c: c.bits.bpw)
        if not between:
            return None
        ceiling = self.gates.kld_ceiling()
        predicted = [(c, self.predict(c, trials, known)) for c in between]
        if ceiling is None or any(p is None for _, p in predicted):
            return between[-1] if known.passed else None
        passing = [c for c, p in predicted if p <= ceiling]
        return passing[0] if passing else min(predicted, key=lambda cp: cp[1])[0]


def start_bits(gates: Gates) -> float | None:
    """The bits a new study starts each backend at under ``gates`` (:data:`START_BITS`)."""
    ceiling = gates.kld_ceiling()
    if ceiling is None:
        return None
    return next(bits for limit, bits in START_BITS if ceiling <= limit)


def gated_starting_points(declared: Sequence[Mapping[str, Any]], order: PrecisionOrder | None,
                          gates: Gates) -> list[Mapping[str, Any]]:
    """A new study's first trials: the backends' ``declared`` defaults (each backend's first, then each one's
    second …), or, when the gates call for other bits (:func:`start_bits`), one per backend: of its first default's
    method, the configuration with the fewest bits at or above them (else the most below)."""
    bits = start_bits(gates)
    if bits is None or order is None:
        return list(declared)
    points, seen = [], set()
    for point in declared:
        first = order.configuration_of(point)
        if first is None or first.group is None or first.backend in seen:
            continue
        seen.add(first.backend)
        same = [c for c in order.configurations if c.group == first.group]
        above = [c for c in same if c.bits.bpw >= bits]
        chosen = min(above, key=lambda c: c.bits.bpw) if above else max(same, key=lambda c: c.bits.bpw)
        points.append(chosen.params)
    return points + [p for p in declared if p.get("backend") not in seen]  # backends that declare no bits


def _key(params: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))
