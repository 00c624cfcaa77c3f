"""Promotion: the best feasible candidate of a target becomes ``<target>-champion`` in the model registry.

A candidate is a finished run tagged ``mlflow_edge.role=candidate`` for the target, with a logged model. Gates are
checked again from the run's metrics (tags are never trusted), the policy ranks the feasible ones, and the winner is
registered and aliased only if it beats the current champion. The new version carries the readiness report
(:mod:`mlflow_edge.readiness`) as its description and the gates in force as tag ``mlflow_edge.gates``. Registration,
description and alias move together: if any of them fails, the new version is deleted, so a failure leaves the
registry as it was. The report is then logged on the champion's run (``readiness/``); a failure there only warns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Mapping, Sequence

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from mlflow_edge import cache, readiness
from mlflow_edge.errors import EdgeError, first_line
from mlflow_edge.gates import GateReport, Gates
from mlflow_edge.metrics import METRICS
from mlflow_edge.readiness import Champion, Promoted
from mlflow_edge.runs import filter_literal, progress
from mlflow_edge.tags import (
    GATES_TAG,
    MODEL_URI_TAG,
    PROMOTION_TAG,
    ROLE_TAG,
    RUN_ID_TAG,
    STUDY_TAG,
    TARGET_TAG,
    TRIAL_TAG,
)

REBUILD_TAG = "mlflow_edge.rebuild"
"""Tag of a candidate whose model files were not logged: the ``mlflow-edge quantize`` command that rebuilds them."""

EVALUATED_TAG = "gates.result"
"""Set on a run whose artifact the harness measured and whose gates were checked: only such runs are candidates."""
"""Version tag: ``pending`` from registration until the alias is set, then ``done``."""
"""Version tag: the gates spec the version passed (``parse_gates`` reads it back), for a later monitor."""


@dataclasses.dataclass(frozen=True)
class Term:
    """One metric a policy ranks by, its direction (``max``/``min``) and weight."""

    direction: str
    metric: str
    weight: float = 1.0

    def __str__(self) -> str:
        return f"{self.direction}:{self.metric}"


@dataclasses.dataclass(frozen=True)
class Policy:
    """How feasible candidates rank: ``max:decode_tok_s``, ``min:size_mb``, ``max:fidelity`` (lowest ``kld_mean``,
    then highest ``accuracy_retention``), … or a weighted sum
    ``weighted:max:decode_tok_s=0.3,min:size_mb=0.3,max:accuracy_retention=0.4``.

    A weighted policy scales each metric to [0, 1] over the candidates being compared (min–max, best = 1), so metrics
    of different units add up; a candidate missing a ranked metric ranks last. Ties of the score are broken by the
    policy's further terms, then by :data:`TIE_BREAKS` (fidelity, then decode speed, then size)::

        >>> policy = parse_policy("weighted:min:size_mb=1,max:accuracy_retention=1")
        >>> policy.scores([{"size_mb": 90, "accuracy_retention": 0.9}, {"size_mb": 100, "accuracy_retention": 1.0}])
        [1.0, 1.0]
    """

    terms: tuple[Term, ...]
    weighted: bool = False
    name: str | None = None
    """The spec of a named policy (``max:fidelity``), whose terms rank one after the other."""

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(t.metric for t in self.terms)

    @property
    def objectives(self) -> tuple[Term, ...]:
        """What a candidate is compared on, for ties and for dominance: the policy's terms, then
        :data:`TIE_BREAKS`, each metric once."""
        seen = {t.metric for t in self.terms}
        return self.terms + tuple(t for t in TIE_BREAKS if t.metric not in seen)

    def scores(self, pool: Sequence[Mapping[str, float]]) -> list[float]:
        """One score per metrics mapping of ``pool``: larger is better."""
        signed = [[_signed(m, t) for t in self.terms] for m in pool]
        if not self.weighted:
            return [row[0] for row in signed]
        columns = list(zip(*signed)) if signed else []
        ranges = []
        for column in columns:
            finite = [v for v in column if math.isfinite(v)]
            ranges.append((min(finite), max(finite)) if finite else (0.0, 0.0))
        scores = []
        for row in signed:
            if not all(math.isfinite(v) for v in row):
                scores.append(-math.inf)
                continue
            scores.append(sum(t.weight * ((v - lo) / (hi - lo) if hi > lo else 1.0)
                              for t, v, (lo, hi) in zip(self.terms, row, ranges)))
        return scores

    def pick(self, pool: Sequence[Mapping[str, float]]) -> int:
        """The index of the best of ``pool`` (metrics mappings) that no other one dominates (:func:`dominates` on
        :attr:`objectives`): its score, then the tie-breaks; an exact tie goes to the earlier one."""
        if not pool:
            raise ValueError("no candidate to pick from")
        scores = self.scores(pool)
        front = undominated(pool, self.objectives)
        return max(front, key=lambda i: (scores[i], *(_signed(pool[i], t) for t in self.tie_breaks), -i))

    @property
    def tie_breaks(self) -> tuple[Term, ...]:
        """What breaks a tie of :meth:`scores`, in order: a plain policy's further terms, then the other
        :attr:`objectives` (a weighted policy's terms are all in its score)."""
        return (self.terms[1:] if not self.weighted else ()) + self.objectives[len(self.terms):]

    def __str__(self) -> str:
        if self.name:
            return self.name
        if not self.weighted:
            return str(self.terms[0])
        return "weighted:" + ",".join(f"{t}={t.weight:g}" for t in self.terms)


TIE_BREAKS: tuple[Term, ...] = (Term("min", "kld_mean"), Term("max", "accuracy_retention"),
                                Term("max", "decode_tok_s"), Term("min", "size_mb"))
"""The study's objectives in the order that breaks a policy's ties: fidelity (mean KLD, then retention), then decode
speed, then size. With the policy's own terms they also decide dominance."""
NAMED_POLICIES: dict[str, tuple[Term, ...]] = {
    "max:fidelity": (Term("min", "kld_mean"), Term("max", "accuracy_retention")),
}
"""Policies by name: ``max:fidelity`` is the most faithful candidate that meets the gates (lowest mean KLD, then
highest retention), what tuners that optimize under a speed and loss budget pick."""


def dominates(a: Mapping[str, float], b: Mapping[str, float], objectives: Sequence[Term] = TIE_BREAKS) -> bool:
    """Whether ``a`` is no worse than ``b`` on every objective both measured and better on at least one."""
    pairs = [(_signed(a, t), _signed(b, t)) for t in objectives]
    shared = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
    return bool(shared) and all(x >= y for x, y in shared) and any(x > y for x, y in shared)


def undominated(pool: Sequence[Mapping[str, float]], objectives: Sequence[Term] = TIE_BREAKS) -> list[int]:
    """Indexes of ``pool`` that no other member dominates (the Pareto front of ``pool``), in order."""
    return [i for i, metrics in enumerate(pool)
            if not any(dominates(other, metrics, objectives) for j, other in enumerate(pool) if j != i)]


def _signed(metrics: Mapping[str, float], term: Term) -> float:
    value = metrics.get(term.metric)
    if value is None or math.isnan(value):
        return -math.inf
    return value if term.direction == "max" else -value


def _term(text: str, spec: str, weighted: bool) -> Term:
    body, _, weight_text = text.strip().partition("=") if weighted else (text.strip(), "", "")
    direction, _, metric = body.partition(":")
    if direction not in ("max", "min") or metric not in METRICS:
        raise EdgeError(f"bad promotion policy '{spec}': use max:<metric> or min:<metric> with a conventions metric, "
                        f"{', '.join(NAMED_POLICIES)}, or weighted:max:<metric>=<weight>,min:<metric>=<weight>,…")
    try:
        weight = float(weight_text) if weighted else 1.0
    except ValueError:
        weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
        raise EdgeError(f"bad promotion policy '{spec}': the weight of {body} must be a positive number")
    return Term(direction, metric, weight)


def parse_policy(spec: "str | Policy") -> Policy:
    if isinstance(spec, Policy):
        return spec
    spec = str(spec).strip()
    if spec in NAMED_POLICIES:
        return Policy(NAMED_POLICIES[spec], name=spec)
    if spec.startswith("weighted:"):
        parts = [p for p in spec[len("weighted:"):].split(",")]
        terms = tuple(_term(part, spec, weighted=True) for part in parts)
        if len({t.metric for t in terms}) != len(terms):
            raise EdgeError(f"bad promotion policy '{spec}': a metric appears twice")
        return Policy(terms, weighted=True)
    return Policy((_term(spec, spec, weighted=False),))


def champion_alias(target: str) -> str:
    return f"{target}-champion"


@dataclasses.dataclass(frozen=True)
class Promotion:
    registered_model: str
    alias: str
    run_id: str
    version: str | None
    kept_champion: bool
    policy: str

    def describe(self) -> str:
        if self.kept_champion:
            return (f"kept {self.registered_model}@{self.alias} (version {self.version}): the best new candidate "
                    f"(run {self.run_id}) is not better by {self.policy}")
        return f"promoted run {self.run_id} to {self.registered_model} version {self.version} @{self.alias}"


def candidate_runs(experiment_ids: Sequence[str], target: str, study: str | None = None) -> list[Run]:
    """Finished candidate runs of ``target`` (and ``study``, when given) that were evaluated (their gates checked),
    newest first. Only those with model files logged (:data:`MODEL_URI_TAG`) can be promoted."""
    runs = _tagged_runs(experiment_ids, {ROLE_TAG: "candidate", TARGET_TAG: target,
                                         **({STUDY_TAG: study} if study else {})})
    return [run for run in runs if EVALUATED_TAG in run.data.tags]


def reference_run(candidate: Run) -> Run | None:
    """The latest finished reference run of ``candidate``'s study in its experiment (``None`` without a study)."""
    study = candidate.data.tags.get(STUDY_TAG)
    if not study:
        return None
    found = _tagged_runs([candidate.info.experiment_id], {ROLE_TAG: "reference", STUDY_TAG: study})
    return found[0] if found else None


def _tagged_runs(experiment_ids: Sequence[str], tags: Mapping[str, str]) -> list[Run]:
    """Finished runs whose tags equal ``tags`` exactly, newest first. A value the filter language cannot quote
    (it has both quote characters, or a backslash) is compared here instead of in the store."""
    clauses = ["attributes.status = 'FINISHED'"]
    clauses += [f"tags.`{key}` = {quoted}" for key, value in tags.items() if (quoted := filter_literal(value))]
    runs = mlflow.search_runs(experiment_ids=list(experiment_ids), filter_string=" AND ".join(clauses),
                              output_format="list")
    return [run for run in runs if all(run.data.tags.get(key) == value for key, value in tags.items())]


def promote(experiment_ids: Sequence[str], target: str, gates: Gates, policy: str | Policy,
            registered_model: str, study: str | None = None, source: str | None = None) -> Promotion:
    """Register the best gate-passing candidate and point ``<target>-champion`` at it (or keep a better champion);
    the new version's description is its readiness report.

    Candidates are the evaluated runs of ``study`` (every study when ``None``) of one source model: ``source`` (its
    name or sha256), else the champion's, else the only one there is. Promotions of one registered model and alias
    run one at a time on this machine; a version an interrupted promotion left registered but not aliased is adopted
    when its run wins, else removed. Promoting the same run again changes nothing. The champion is kept only while
    it passes ``gates``.
    """
    policy = parse_policy(policy)
    alias = champion_alias(target)
    with _promotion_lock(registered_model, alias):
        client = MlflowClient()
        champion = _current_champion(client, registered_model, alias)
        feasible = _feasible(_same_source(candidate_runs(experiment_ids, target, study), champion, source), gates,
                             target)
        standing = champion if champion is not None and gates.check(champion.metrics).passed else None
        best, report, kept = _winner(feasible, standing, policy)
        if kept:
            return Promotion(registered_model, alias, best.info.run_id, champion.version, True, str(policy))
        promoted = Promoted(registered_model=registered_model, version="", alias=alias, target=target,
                            policy=str(policy), run=best, report=report, reference=reference_run(best),
                            previous=champion, choice=choice_facts(policy, [run for run, _ in feasible], best))
        version, text, facts = _register(client, promoted, _settle_interrupted(client, registered_model, best))
    _log_report(client, best.info.run_id, text, facts)
    return Promotion(registered_model, alias, best.info.run_id, version, False, str(policy))



def promote_study(parent: mlflow.ActiveRun, study: str, source_name: str, target: str, gates: Gates,
                  policy: str | Policy, registered_model: str | None) -> Promotion:
    """Promote the best feasible candidate of ``study`` (run under the active ``parent``) to the registered model
    (``<source_name>-edge`` unless named), and record the outcome on the parent run."""
    promotion = promote(experiment_ids=[parent.info.experiment_id], study=study, target=target, gates=gates,
                        policy=policy, registered_model=registered_model or f"{source_name}-edge")
    progress(promotion.describe())
    mlflow.set_tags({PROMOTION_TAG: promotion.describe()[:5000]})
    return promotion

def _feasible(runs: Sequence[Run], gates: Gates, target: str) -> list[tuple[Run, GateReport]]:
    if not runs:
        raise EdgeError(f"no evaluated candidate runs for target '{target}'; nothing registered")
    checked = [(run, gates.check(run.data.metrics)) for run in runs]
    passed = [(run, report) for run, report in checked if report.passed]
    feasible = [(run, report) for run, report in passed if MODEL_URI_TAG in run.data.tags]
    if not passed:
        raise EdgeError(f"none of {len(runs)} candidates passed the gates {gates}; nothing registered, "
                        "champion unchanged")
    if not feasible:
        raise EdgeError(f"{len(passed)} candidate(s) passed the gates {gates} but none has its model files logged "
                        f"(a search logs its front only; rebuild one with its tag {REBUILD_TAG}); nothing registered")
    return feasible


def _same_source(runs: Sequence[Run], champion: Champion | None, source: str | None) -> list[Run]:
    """The runs of one source model: ``source`` (name or sha256), else the champion's, else the only one."""
    def sha(run: Run) -> str:
        return run.data.params.get("source.sha256", "")

    if source:
        return [run for run in runs if source in (run.data.params.get("source"), sha(run))]
    if champion is not None and champion.source_sha256:
        return [run for run in runs if sha(run) == champion.source_sha256]
    sources = {sha(run): run.data.params.get("source", "?") for run in runs}
    if len(sources) > 1:
        raise EdgeError(f"the candidates come from {len(sources)} source models ({', '.join(sorted(sources.values()))})"
                        "; name one with --model, or promote one --study")
    return list(runs)


@contextlib.contextmanager
def _promotion_lock(registered_model: str, alias: str) -> Iterator[None]:
    """One promotion of ``registered_model@alias`` at a time on this machine (per tracking store)."""
    key = cache.key_digest({"tracking_uri": mlflow.get_tracking_uri(), "model": registered_model, "alias": alias})
    with cache.file_lock(cache.subfolder("locks") / f"promote-{key}.lock"):
        yield


def _settle_interrupted(client: MlflowClient, name: str, winner: Run) -> str | None:
    """Versions an interrupted promotion registered but never finished: the winner's is returned (to adopt),
    the others are deleted."""
    adopt = None
    try:  # the SQL stores leave ModelVersion.aliases empty in searches: the registered model has them
        aliased = {str(version) for version in client.get_registered_model(name).aliases.values()}
    except MlflowException:
        return None  # no registered model yet: nothing was interrupted
    for version in client.search_model_versions(f"name = {filter_literal(name) or repr(name)}"):
        if version.tags.get(PROMOTION_TAG) != "pending":
            continue
        if str(version.version) in aliased:  # killed after its alias moved: it was promoted, only the tag is late
            client.set_model_version_tag(name, version.version, PROMOTION_TAG, "done")
            continue
        if version.tags.get(RUN_ID_TAG) == winner.info.run_id and adopt is None:
            adopt = str(version.version)
        else:
            client.delete_model_version(name, version.version)
    return adopt


def _winner(feasible: Sequence[tuple[Run, GateReport]], champion: Champion | None,
            policy: Policy) -> tuple[Run, GateReport, bool]:
    """The best feasible candidate by ``policy`` that no other one dominates (ties broken by the other objectives),
    and whether the champion stays: it competes too, first, so that an exact tie keeps it."""
    candidates = [run.data.metrics for run, _ in feasible]
    if champion is None:
        return (*feasible[policy.pick(candidates)], False)
    winner = policy.pick([champion.metrics, *candidates])
    if winner == 0:  # the best new candidate is named in the message that the champion stays
        return (*feasible[policy.pick(candidates)], True)
    return (*feasible[winner - 1], False)


def choice_facts(policy: Policy, feasible: Sequence[Run], winner: Run) -> dict[str, Any]:
    """Why ``winner`` won among the ``feasible`` runs, for the readiness report: the policy, how many tied on its
    score, per objective the best feasible candidate beside the winner's value, and the candidates that dominate the
    winner (none, by construction)."""
    pool = [run.data.metrics for run in feasible]
    scores = policy.scores(pool)
    mine = scores[_index(feasible, winner)]
    best_by_objective = []
    for term in policy.objectives:
        measured = [run for run in feasible if math.isfinite(_signed(run.data.metrics, term))]
        if measured:
            top = max(measured, key=lambda run: _signed(run.data.metrics, term))
            best_by_objective.append({
                "metric": term.metric, "better": "higher" if term.direction == "max" else "lower",
                "best_run_id": top.info.run_id, "best": candidate_label(top),
                "best_value": top.data.metrics[term.metric], "winner_value": winner.data.metrics.get(term.metric)})
    return {"policy": str(policy), "feasible": len(feasible), "front": len(undominated(pool, policy.objectives)),
            "tied": sum(score == mine for score in scores),
            "ties_broken_by": [t.metric for t in policy.tie_breaks],
            "dominated_by": [run.info.run_id for run in feasible
                             if dominates(run.data.metrics, winner.data.metrics, policy.objectives)],
            "best_by_objective": best_by_objective}


def _index(runs: Sequence[Run], run: Run) -> int:
    return next(i for i, other in enumerate(runs) if other.info.run_id == run.info.run_id)


def candidate_label(run: Run) -> str:
    """``<backend> <precision>`` and the trial number of a candidate run, as people name it."""
    params, tags = run.data.params, run.data.tags
    trial = f" (trial {tags['mlflow_edge.trial']})" if TRIAL_TAG in tags else ""
    return f"{params.get('backend', '?')} {params.get('precision', '?')}{trial}"


def _version_tags(promoted: Promoted) -> dict[str, str]:
    best = promoted.run
    return {
        TARGET_TAG: promoted.target,
        STUDY_TAG: best.data.tags.get(STUDY_TAG, ""),
        RUN_ID_TAG: best.info.run_id,
        **{key: best.data.tags[key] for key in (TRIAL_TAG, "optuna.study") if key in best.data.tags},
        "precision": best.data.params.get("precision", ""),
        "backend": best.data.params.get("backend", ""),
        "source.sha256": best.data.params.get("source.sha256", ""),
        "policy": promoted.policy,
        GATES_TAG: str(promoted.report.gates),
        **promoted.report.as_tags(),
    }


def _register(client: MlflowClient, promoted: Promoted, adopted: str | None = None) -> tuple[str, str, dict[str, Any]]:
    """Register the winner (or finish the ``adopted`` version an interrupted promotion left) with its readiness
    report as description, then move the alias; on any failure the version is deleted. Returns the version, the
    report's Markdown and its facts."""
    name = promoted.registered_model
    tags = {**_version_tags(promoted), PROMOTION_TAG: "pending"}
    version = adopted or str(mlflow.register_model(promoted.run.data.tags[MODEL_URI_TAG], name, tags=tags).version)
    try:
        facts = readiness.facts(dataclasses.replace(promoted, version=version))
        text = readiness.markdown(facts)
        client.update_model_version(name, version, description=readiness.description(text))
        client.set_registered_model_alias(name, promoted.alias, version)
    except Exception:
        client.delete_model_version(name, version)
        raise
    client.set_model_version_tag(name, version, PROMOTION_TAG, "done")
    return version, text, facts


def _log_report(client: MlflowClient, run_id: str, text: str, facts: Mapping[str, Any]) -> None:
    """The full report on the champion's run; the promotion stands if this fails (one warning line)."""
    try:
        client.log_text(run_id, text, f"{readiness.ARTIFACT_DIR}/readiness.md")
        client.log_dict(run_id, dict(facts), f"{readiness.ARTIFACT_DIR}/readiness.json")
    except Exception as exc:
        progress(f"warning: promoted, but the readiness report could not be logged on run {run_id}: "
                 f"{first_line(exc)}")


def _current_champion(client: MlflowClient, name: str, alias: str) -> Champion | None:
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    run_id = version.tags.get(RUN_ID_TAG) or version.run_id
    metrics = client.get_run(run_id).data.metrics if run_id else {}
    return Champion(str(version.version), run_id, metrics, version.tags.get("source.sha256", ""))
