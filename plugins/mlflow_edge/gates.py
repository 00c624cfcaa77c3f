"""Quality gates: thresholds on the CONVENTIONS.md metrics of a candidate, relative to its reference.

A spec is comma-separated groups, all of which must pass (AND); a group is ``|``-separated gates, any of which may
pass (OR); a gate is ``<metric><op><threshold>`` with ``op`` one of ``>=``, ``<=`` (``≥``, ``≤`` are read too)::

    >>> gates = parse_gates("accuracy_retention>=0.95,speedup>=2.0|compression_ratio>=2.0")
    >>> report = gates.check({"accuracy_retention": 0.97, "speedup": 1.3, "compression_ratio": 3.1})
    >>> report.passed
    True
    >>> report.as_tags()["gate.speedup_ge_2.0_or_compression_ratio_ge_2.0"]
    'pass'

A metric that is missing or NaN fails its gate and is reported as ``missing``.

Fidelity is measured with an interval (``accuracy_retention_lo``/``_hi``, ``kld_mean_lo``/``_hi``). By default a gate
is decided on the point value; :meth:`Gates.on_bounds` moves every such gate onto its pessimistic bound (a candidate
passes only if the bound does), and the gate's tag key then names the bound (``gate.accuracy_retention_lo_ge_0.95``).
Screening (:meth:`Gates.certain_failures`) prunes only on the optimistic bound::

    >>> parse_gates("accuracy_retention>=0.95,kld_mean<=0.05").on_bounds().check(
    ...     {"accuracy_retention_lo": 0.96, "kld_mean_hi": 0.07}).passed
    False
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal, Mapping, Sequence

from mlflow_edge.errors import EdgeError
from mlflow_edge.metrics import BOUNDS, METRICS, bound_of

Status = Literal["pass", "fail", "missing"]

_OPS = {">=": ">=", "<=": "<=", "≥": ">=", "≤": "<="}
_OP_WORDS = {">=": "ge", "<=": "le"}
_GATE_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*([<>=!≥≤]+)\s*(.*?)\s*$")


@dataclasses.dataclass(frozen=True)
class Gate:
    """``metric op threshold``, e.g. ``accuracy_retention >= 0.95``."""

    metric: str
    op: str
    threshold: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise EdgeError(f"unknown metric '{self.metric}' in gate '{self}' (choose from {', '.join(METRICS)})")
        if self.op not in (">=", "<="):
            raise EdgeError(f"unknown operator '{self.op}' in gate '{self}' (use >= or <=)")
        if not math.isfinite(self.threshold):
            raise EdgeError(f"threshold of gate '{self}' must be a finite number")

    @classmethod
    def parse(cls, text: str) -> "Gate":
        """Parse ``"metric>=0.95"``; :class:`EdgeError` on a bad gate."""
        match = _GATE_RE.match(text)
        if not text.strip():
            raise EdgeError("empty gate (a spec like 'accuracy_retention>=0.95' was expected)")
        if match is None:
            raise EdgeError(f"cannot read gate '{text.strip()}' (expected <metric>>=<number> or <metric><=<number>)")
        metric, op, threshold_text = match.groups()
        if op not in _OPS:
            raise EdgeError(f"unknown operator '{op}' in gate '{text.strip()}' (use >= or <=)")
        try:
            threshold = float(threshold_text)
        except ValueError:
            raise EdgeError(f"threshold '{threshold_text}' of gate '{text.strip()}' is not a number") from None
        return cls(metric, _OPS[op], threshold)

    def check(self, value: float | None) -> Status:
        """``pass``/``fail`` for an observed value; ``missing`` for ``None`` or NaN."""
        if value is None or math.isnan(value):
            return "missing"
        return "pass" if (value >= self.threshold if self.op == ">=" else value <= self.threshold) else "fail"

    def tag_key(self) -> str:
        """This gate in MLflow's tag-key alphabet (no ``<``, ``>``, ``|``): ``accuracy_retention_ge_0.95``."""
        return f"{self.metric}_{_OP_WORDS[self.op]}_{self.threshold!r}"

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold!r}"


@dataclasses.dataclass(frozen=True)
class GateGroup:
    """Gates of which at least one must pass (OR)."""

    gates: tuple[Gate, ...]

    @classmethod
    def parse(cls, text: str) -> "GateGroup":
        if not text.strip():
            raise EdgeError("empty gate group in spec (check for a stray ',')")
        return cls(tuple(Gate.parse(part) for part in text.split("|")))

    def tag_key(self) -> str:
        """``gate.<gate>[_or_<gate>…]``: a valid MLflow tag key."""
        return "gate." + "_or_".join(g.tag_key() for g in self.gates)

    def __str__(self) -> str:
        return "|".join(str(g) for g in self.gates)


@dataclasses.dataclass(frozen=True)
class GateResult:
    gate: Gate
    value: float | None
    status: Status


@dataclasses.dataclass(frozen=True)
class GroupResult:
    """One group's outcome: ``pass`` if any gate passed, else ``missing`` if a metric was missing, else ``fail``."""

    group: GateGroup
    results: tuple[GateResult, ...]

    @property
    def status(self) -> Status:
        statuses = {r.status for r in self.results}
        return "pass" if "pass" in statuses else "missing" if "missing" in statuses else "fail"

    @property
    def passed(self) -> bool:
        return self.status == "pass"


@dataclasses.dataclass(frozen=True)
class GateReport:
    """The outcome of :meth:`Gates.check`: one :class:`GroupResult` per AND group."""

    gates: "Gates"
    groups: tuple[GroupResult, ...]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.groups)

    @property
    def values(self) -> dict[str, float | None]:
        """The observed value of every gated metric (``None`` when missing or NaN)."""
        return {r.gate.metric: r.value for g in self.groups for r in g.results}

    def as_tags(self) -> dict[str, str]:
        """MLflow tags: ``gate.<group>`` → ``pass``/``fail``/``missing`` per group, plus ``gates.spec`` (the parseable
        spec) and ``gates.result`` (``pass``/``fail`` overall).

        MLflow rejects ``<``, ``>`` and ``|`` in tag keys, so keys spell operators as ``_ge_``/``_le_`` and OR as
        ``_or_``: ``gate.speedup_ge_2.0_or_compression_ratio_ge_2.0``.
        """
        tags = {g.group.tag_key(): g.status for g in self.groups}
        tags["gates.spec"] = str(self.gates)
        tags["gates.result"] = "pass" if self.passed else "fail"
        return tags

    def describe(self) -> str:
        """One line, e.g. ``PASS 3/3: accuracy_retention=0.97>=0.95 pass; …``."""
        parts = []
        for g in self.groups:
            observed = ", ".join(
                f"{r.gate.metric}={'missing' if r.value is None else f'{r.value:.4g}'}" for r in g.results
            )
            parts.append(f"{g.group} {g.status} ({observed})")
        head = "PASS" if self.passed else "FAIL"
        return f"{head} {sum(g.passed for g in self.groups)}/{len(self.groups)}: " + "; ".join(parts)


def _value(metrics: Mapping[str, object], name: str) -> float | None:
    raw = metrics.get(name)
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


@dataclasses.dataclass(frozen=True)
class Gates:
    """Groups that must all pass (AND)."""

    groups: tuple[GateGroup, ...]

    def __post_init__(self) -> None:
        if not self.groups:
            raise EdgeError("no gates given (pass None for the defaults)")
        _check_consistent(self.groups)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The gated metric names, each once, in spec order."""
        return tuple(dict.fromkeys(g.metric for group in self.groups for g in group.gates))

    def check(self, metrics: Mapping[str, float]) -> GateReport:
        """Check observed ``metrics`` against every group."""
        results = []
        for group in self.groups:
            values = [_value(metrics, g.metric) for g in group.gates]
            results.append(GroupResult(group, tuple(GateResult(g, v, g.check(v)) for g, v in zip(group.gates, values))))
        return GateReport(self, tuple(results))

    def violations(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """One Optuna constraint per group, keyed by its tag key: ``0`` when it passes, else the smallest relative
        shortfall of its gates (``1e6`` for a missing metric), so a feasible trial has every value ``<= 0``."""
        values = {}
        for group in self.check(metrics).groups:
            shortfalls = [0.0] if group.passed else [_shortfall(r) for r in group.results]
            values[group.group.tag_key()] = min(shortfalls)
        return values

    def certain_failures(self, metrics: Mapping[str, float], margin: float = 0.0) -> list[GroupResult]:
        """Groups that ``metrics`` already fail for sure: every gate's metric is known and misses its threshold by
        more than ``margin`` (relative), judged on the optimistic bound of metrics that have an interval (a gate on
        ``accuracy_retention`` or on its bounds is judged on ``accuracy_retention_hi``; a NaN bound is unknown, an
        unmeasured one falls back to the point value).
        Groups with an unknown metric are undecided. Used to prune early."""
        failed = []
        for group in self.check(_optimistic(metrics)).groups:
            known = all(r.value is not None for r in group.results)
            if known and all(r.status == "fail" and _shortfall(r) > margin for r in group.results):
                failed.append(group)
        return failed

    @property
    def fidelity_groups(self) -> tuple[GateGroup, ...]:
        """The groups every gate of which is on a fidelity metric (:data:`FIDELITY_METRICS` or their bounds)."""
        return tuple(group for group in self.groups if all(_base_metric(g.metric) in FIDELITY_METRICS
                                                           for g in group.gates))

    def fidelity_passed(self, metrics: Mapping[str, float]) -> bool | None:
        """Whether ``metrics`` pass every fidelity group (``None`` when there is none): a candidate that fails only a
        speed or size gate still tells how far its precision can go."""
        groups = self.fidelity_groups
        return Gates(groups).check(metrics).passed if groups else None

    def kld_ceiling(self) -> float | None:
        """The tightest ``kld_mean<=t`` (or on its bound) that holds on its own (a one-gate group), else ``None``."""
        ceilings = [group.gates[0].threshold for group in self.groups if len(group.gates) == 1
                    and _base_metric(group.gates[0].metric) == "kld_mean" and group.gates[0].op == "<="]
        return min(ceilings) if ceilings else None

    def on_bounds(self) -> "Gates":
        """These gates decided on the pessimistic bound of every metric that has an interval (``--gate-confidence``):
        ``accuracy_retention>=t`` becomes ``accuracy_retention_lo>=t``, ``kld_mean<=t`` becomes ``kld_mean_hi<=t``."""
        return Gates(tuple(GateGroup(tuple(dataclasses.replace(g, metric=bound_of(g.metric, "pessimistic"))
                                           for g in group.gates)) for group in self.groups))

    def without_metrics(self, metrics: Sequence[str]) -> "Gates | None":
        """These gates without the groups that gate any of ``metrics`` (or their bounds); ``None`` when none remain."""
        names = set(metrics) | {bound for metric in metrics for bound in BOUNDS.get(metric, ())}
        kept = tuple(group for group in self.groups if not any(g.metric in names for g in group.gates))
        return Gates(kept) if kept else None

    def restricted_to(self, measured: Sequence[str]) -> tuple["Gates | None", list[str]]:
        """These gates without those on metrics outside ``measured``: a group keeps its measurable gates, a group
        with none is dropped. Returns the remaining gates (``None`` when none remain) and the dropped gates."""
        kept_groups, dropped = [], []
        for group in self.groups:
            kept = tuple(g for g in group.gates if g.metric in measured)
            dropped += [str(g) for g in group.gates if g.metric not in measured]
            if kept:
                kept_groups.append(GateGroup(kept))
        return (Gates(tuple(kept_groups)) if kept_groups else None), dropped

    def __str__(self) -> str:
        return ",".join(str(g) for g in self.groups)


def _base_metric(name: str) -> str:
    """The metric a bound belongs to (``kld_mean_hi`` → ``kld_mean``), else ``name``."""
    return next((metric for metric, bounds in BOUNDS.items() if name in bounds), name)


def _optimistic(metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` with every interval metric and its bounds read as the optimistic bound: NaN when that bound is NaN
    (one window has no interval), the point value when no bound was measured at all."""
    seen = dict(metrics)
    for metric in BOUNDS:
        name = bound_of(metric, "optimistic")
        if name not in metrics and metric not in metrics:
            continue
        best = _value(metrics, name if name in metrics else metric)
        for alias in (metric, *BOUNDS[metric]):
            seen[alias] = math.nan if best is None else best
    return seen


def _shortfall(result: GateResult) -> float:
    """How far a gate misses, relative to its threshold (``0`` when it passes, ``1e6`` when its metric is missing)."""
    if result.value is None:
        return 1e6
    gate = result.gate
    gap = gate.threshold - result.value if gate.op == ">=" else result.value - gate.threshold
    return max(gap / max(abs(gate.threshold), 1e-9), 1e-9) if result.status == "fail" else 0.0


def _check_consistent(groups: Sequence[GateGroup]) -> None:
    """Refuse single-gate groups that no value can satisfy together (``size_mb<=10,size_mb>=20``)."""
    lower: dict[str, Gate] = {}
    upper: dict[str, Gate] = {}
    for group in groups:
        if len(group.gates) != 1:
            continue
        gate = group.gates[0]
        bounds = lower if gate.op == ">=" else upper
        best = bounds.get(gate.metric)
        if best is None or (gate.threshold > best.threshold if gate.op == ">=" else gate.threshold < best.threshold):
            bounds[gate.metric] = gate
    for metric, lo in lower.items():
        hi = upper.get(metric)
        if hi is not None and lo.threshold > hi.threshold:
            raise EdgeError(f"contradictory gates '{lo}' and '{hi}': no value of {metric} can pass both")


FIDELITY_PRESETS: dict[str, str] = {
    "near-lossless": "accuracy_retention>=0.99,kld_mean<=0.01",
    "balanced": "accuracy_retention>=0.95,kld_mean<=0.05",
    "small": "accuracy_retention>=0.9,kld_mean<=0.15",
}
"""``--fidelity`` presets: a perplexity ratio and a mean-KLD ceiling. The KLD ceilings follow llama.cpp's published
``llama-perplexity --kl-divergence`` tables (8-bit and Q6_K stay near 0.01 and below; Q5_K_M and Q4_K_M lie between
0.01 and 0.05 on 7-8B models; 3-bit K-quants reach about 0.1, Q2_K several tenths) and what this harness measures on
SmolLM2-135M (Q4_K_M 0.050, OpenVINO INT8_ASYM 0.007): near-lossless admits 8-bit/Q6_K, balanced the 4-5-bit types
users pick by default, small the 3-bit ones. README.md documents the choice."""
DEFAULT_FIDELITY = "balanced"
FIDELITY_METRICS = ("accuracy_retention", "kld_mean", "kld_p99", "top1_agreement", "perplexity")
"""Metrics whose gates a ``--fidelity`` preset replaces."""
SPEED_GATES = "speedup>=2.0|compression_ratio>=2.0,latency_cv<=0.1"


def default_gates(fidelity: str = DEFAULT_FIDELITY) -> "Gates":
    """The ``fidelity`` preset's gates and the speed/size and timing-trust gates of CONVENTIONS.md."""
    return parse_gates([_preset(fidelity), SPEED_GATES])


def resolve_gates(spec: "str | Sequence[str] | Gates | None", fidelity: str | None = None,
                  confidence: float | None = None) -> "Gates":
    """The gates in force: ``spec`` (the defaults when ``None``), its fidelity groups replaced by the ``fidelity``
    preset when one is named, decided on the bounds when a ``confidence`` level is given (``--gate-confidence``)."""
    gates = parse_gates(spec) if spec is not None else default_gates(fidelity or DEFAULT_FIDELITY)
    if fidelity is not None and spec is not None:
        rest = gates.without_metrics(FIDELITY_METRICS)
        gates = parse_gates([_preset(fidelity), *([str(rest)] if rest else [])])
    if confidence is not None:
        if not 0.5 <= confidence < 1.0:
            raise EdgeError(f"gate confidence must be at least 0.5 and below 1, got {confidence}")
        gates = gates.on_bounds()
    return gates


def _preset(fidelity: str) -> str:
    if fidelity not in FIDELITY_PRESETS:
        raise EdgeError(f"unknown fidelity '{fidelity}' (choose from {', '.join(FIDELITY_PRESETS)})")
    return FIDELITY_PRESETS[fidelity]


def parse_gates(spec: str | Sequence[str] | Gates | None) -> Gates:
    """:class:`Gates` from a spec string (comma-separated groups), a sequence of such strings (ANDed), a :class:`Gates`
    (returned as is), or ``None`` (:data:`DEFAULT_GATES`). :class:`EdgeError` on a bad spec."""
    if spec is None:
        return DEFAULT_GATES
    if isinstance(spec, Gates):
        return spec
    parts = [spec] if isinstance(spec, str) else list(spec)
    groups: list[GateGroup] = []
    for part in parts:
        if not isinstance(part, str):
            raise EdgeError(f"gate spec must be a string, not {type(part).__name__}")
        if not part.strip():
            raise EdgeError("empty gate spec (e.g. 'accuracy_retention>=0.95,speedup>=2.0|compression_ratio>=2.0')")
        groups += [GateGroup.parse(text) for text in part.split(",")]
    return Gates(tuple(groups))


DEFAULT_GATES = default_gates()
"""The defaults in force: the balanced fidelity preset, ``speedup>=2.0|compression_ratio>=2.0``, ``latency_cv<=0.1``."""
