"""What one search is asked to do (:class:`SearchConfig`), and the same checked and derived before any work
(:meth:`SearchConfig.resolved`): the one shape the CLI, the MLproject flows and the Azure pipeline (through the CLI)
and a program build alike::

    from mlflow_edge.search import SearchConfig, run_search

    result = run_search(SearchConfig("demo", target="cpu", trials=8, gates="accuracy_retention>=0.95"))
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from mlflow_edge import registry
from mlflow_edge.errors import EdgeError
from mlflow_edge.evaluation.data import TextSlice, calibration_text, check_disjoint
from mlflow_edge.evaluation.harness import EvalSettings
from mlflow_edge.gates import Gates, resolve_gates
from mlflow_edge.metrics import ACCURACY_SIZE_METRICS, METRICS
from mlflow_edge.search.space import backends_for
from mlflow_edge.targets import Target, get_target, is_measurable

MULTI_OBJECTIVE: tuple[tuple[str, str], ...] = (
    ("decode_tok_s", "maximize"), ("size_mb", "minimize"), ("accuracy_retention", "maximize"),
)
"""``objectives="multi"``: fast, small and faithful."""
ACCURACY_SIZE_OBJECTIVE: tuple[tuple[str, str], ...] = (("size_mb", "minimize"), ("accuracy_retention", "maximize"))
"""``objectives="multi"`` in the accuracy/size-only mode (no speed measured)."""


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Everything a search is given, as given: checked by :meth:`resolved`, run by
    :func:`~mlflow_edge.search.study.run_search` (``trials`` or ``timeout`` bound it, ``policy`` picks the champion).

    ``accuracy_only`` is the explicit mode for a target whose hardware this machine lacks: nothing is timed, the
    objectives, gates and policy use accuracy and size alone (gates on other metrics are dropped and listed).
    ``backends`` narrows the search to some of the target's installed backends. ``screen_windows`` (default: a quarter
    of the evaluation windows; 0 disables) is the cheap first slice that can prune a trial before its timed runs.
    ``fidelity`` names a preset for the fidelity gates (:data:`~mlflow_edge.gates.FIDELITY_PRESETS`);
    ``gate_confidence`` decides gates on the bounds of that confidence level instead of the point values.
    ``coordinate_only`` runs no trial here; it is the default when this machine cannot measure the target and a
    shared ``storage`` is given.
    """

    model: str
    target: str = "cpu"
    trials: int = 8
    timeout: float | None = None
    objectives: str = "multi"
    gates: str | Sequence[str] | Gates | None = None
    policy: str = "min:size_mb"
    seed: int = 0
    storage: str | None = None
    study_name: str | None = None
    registered_model: str | None = None
    settings: EvalSettings | None = None
    calibration_path: str | None = None
    experiment: str | None = None
    accuracy_only: bool = False
    screen_windows: int | None = None
    prune_margin: float = 0.02
    run_name: str = "search"
    backends: Sequence[str] | None = None
    fidelity: str | None = None
    gate_confidence: float | None = None
    coordinate_only: bool | None = None

    def resolved(self) -> ResolvedSearch:
        """This configuration checked and completed, before anything is opened or written: each refusal is one
        line (:class:`EdgeError`)."""
        target = get_target(self.target)
        measurable, coordinate_only = self._where_measured(target)
        gates, dropped = self._gates()
        policy = registry.parse_policy(self.policy)
        if self.accuracy_only and not set(policy.metrics) <= set(ACCURACY_SIZE_METRICS):
            raise EdgeError(f"policy '{self.policy}' needs metrics the accuracy/size-only mode does not measure")
        goals = parse_objectives(self.objectives, self.accuracy_only)
        backends = _chosen_backends(self.target, self.backends)
        if not backends:
            raise EdgeError(f"no installed backend for target '{self.target}' (it recommends "
                            f"{', '.join(target.primary + target.secondary)})")
        settings = self._settings()
        screen_windows = settings.windows // 4 if self.screen_windows is None else self.screen_windows
        if screen_windows < 0 or self.prune_margin < 0:
            raise EdgeError("screen_windows and prune_margin must not be negative")
        calibration = calibration_text(self.calibration_path)
        check_disjoint(settings.text, calibration)
        return ResolvedSearch(self, measurable, coordinate_only, gates, tuple(dropped), policy, goals, backends,
                              settings, screen_windows, calibration)

    def _where_measured(self, target: Target) -> tuple[bool, bool]:
        """A budget above 0, and whether trials are measured here and whether this process only coordinates."""
        if (self.trials is None or self.trials < 1) and self.timeout is None:
            raise EdgeError(f"a budget of 0: give trials >= 1 or a timeout (got trials={self.trials})")
        if self.timeout is not None and self.timeout <= 0:
            raise EdgeError(f"a budget of 0: the timeout must be positive (got {self.timeout})")
        measurable = self.accuracy_only or is_measurable(target)
        coordinate_only = ((not measurable and self.storage is not None) if self.coordinate_only is None
                           else self.coordinate_only)
        if not measurable and not coordinate_only:
            raise EdgeError(f"target '{self.target}' needs {target.requires}, which this machine lacks, so latency "
                            "cannot be measured here; rerun with --accuracy-only true to search by accuracy and size "
                            "alone, or give a shared --storage and start `search --worker` on that hardware")
        if coordinate_only and self.storage is None:
            raise EdgeError("--coordinate-only needs a shared --storage that the workers reach "
                            "(e.g. postgresql://user@host/optuna)")
        return measurable, coordinate_only

    def _gates(self) -> tuple[Gates, list[str]]:
        """The gates in force, and in the accuracy/size-only mode those dropped as not measured there."""
        gates = resolve_gates(self.gates, self.fidelity, self.gate_confidence)
        if not self.accuracy_only:
            return gates, []
        _refuse_unmeasured_gates(gates if self.gates is not None else None)
        kept, dropped = gates.restricted_to(ACCURACY_SIZE_METRICS)
        if kept is None:
            raise EdgeError(f"no gate can be checked in the accuracy/size-only mode (dropped {', '.join(dropped)}); "
                            "give an accuracy or size gate such as accuracy_retention>=0.95")
        return kept, dropped

    def _settings(self) -> EvalSettings:
        """The evaluation settings, deciding on the bounds at ``gate_confidence`` and untimed when accuracy-only."""
        settings = self.settings or EvalSettings()
        if self.gate_confidence is not None:
            settings = dataclasses.replace(settings, confidence=self.gate_confidence)
        if self.accuracy_only:
            settings = dataclasses.replace(settings, speed=False)
        return settings


@dataclasses.dataclass(frozen=True)
class ResolvedSearch:
    """A :class:`SearchConfig` checked, with what follows from it: where trials are measured, the gates, policy,
    objectives (``goals``), backends and evaluation settings in force, the screening slice and the calibration text.
    Inside the search's run the backends and settings narrow further to the model's plan."""

    config: SearchConfig
    measurable: bool
    coordinate_only: bool
    gates: Gates
    dropped: tuple[str, ...]
    policy: registry.Policy
    goals: tuple[tuple[str, str], ...]
    backends: tuple[str, ...]
    settings: EvalSettings
    screen_windows: int
    calibration: TextSlice


def parse_objectives(spec: str, accuracy_only: bool = False) -> tuple[tuple[str, str], ...]:
    """``"multi"`` or comma-separated ``max:<metric>``/``min:<metric>`` → ``((metric, direction), …)``."""
    if spec == "multi":
        return ACCURACY_SIZE_OBJECTIVE if accuracy_only else MULTI_OBJECTIVE
    parsed = []
    for part in str(spec).split(","):
        direction, _, metric = part.strip().partition(":")
        if direction not in ("max", "min") or metric not in METRICS:
            raise EdgeError(f"bad objectives '{spec}': use 'multi', or max:<metric> / min:<metric> with a conventions "
                            "metric")
        parsed.append((metric, "maximize" if direction == "max" else "minimize"))
    if len({m for m, _ in parsed}) != len(parsed):
        raise EdgeError(f"bad objectives '{spec}': a metric appears twice")
    unmeasured = [m for m, _ in parsed if accuracy_only and m not in ACCURACY_SIZE_METRICS]
    if unmeasured:
        raise EdgeError(f"objective {', '.join(unmeasured)} is not measured in the accuracy/size-only mode "
                        f"(choose from {', '.join(ACCURACY_SIZE_METRICS)})")
    return tuple(parsed)


def _chosen_backends(target: str, chosen: Sequence[str] | None) -> tuple[str, ...]:
    """The target's installed backends, or those of them ``chosen`` (each once, in the order given)."""
    installed = backends_for(target)
    if not chosen:
        return installed
    if unknown := [b for b in chosen if b not in installed]:
        raise EdgeError(f"backend(s) {', '.join(unknown)} cannot search target '{target}' here "
                        f"(installed for it: {', '.join(installed) or 'none'})")
    return tuple(dict.fromkeys(chosen))


def _refuse_unmeasured_gates(given: Gates | None) -> None:
    """A gate group the user gave whose every metric the accuracy/size-only mode leaves unmeasured is an error (an
    OR alternative that is measured keeps its group; the default gates are narrowed without a word)."""
    for group in given.groups if given is not None else ():
        if not any(gate.metric in ACCURACY_SIZE_METRICS for gate in group.gates):
            raise EdgeError(f"gate {group} is not measured in the accuracy/size-only mode; gate on accuracy or size "
                            "metrics such as accuracy_retention, kld_mean, size_mb or compression_ratio")
