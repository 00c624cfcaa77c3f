"""The readiness report of one promotion: what became the champion, why (every gate in force), against what (the
reference and the previous champion), measured on which machine and data, and the commands that serve it.

The facts are gathered once (:func:`facts`, JSON-ready: ``readiness.json``) and rendered for people
(:func:`markdown`: ``readiness.md``, also the registered version's description, cut by :func:`description` to what
the registry stores). Backend-specific facts (its own servers) come from the logged model's provenance
(``Model.metadata["mlflow_edge"]["native_serve_commands"]``, recorded from the backend when it was logged); this
module names no framework and imports no backend.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from typing import Any, Mapping

import mlflow
from mlflow.entities import Run

from mlflow_edge.gates import GateReport
from mlflow_edge.metrics import CATALOGUE
from mlflow_edge.tags import METADATA_KEY, STUDY_TAG

DESCRIPTION_LIMIT = 5000
"""Characters of a model version description that MLflow's SQL stores hold (a ``VARCHAR(5000)`` column)."""

ARTIFACT_DIR = "readiness"
"""Where the report lands among the champion run's artifacts (``readiness.md``, ``readiness.json``)."""

SERVE_PORT = 8080
"""The port every OpenAI-compatible server in the report listens on (they are alternatives)."""

_MISSING = "–"


@dataclasses.dataclass(frozen=True)
class Champion:
    """A registered version that holds (or held) the champion alias, with its run's metrics."""

    version: str
    run_id: str | None
    metrics: Mapping[str, float]
    source_sha256: str = ""


@dataclasses.dataclass(frozen=True)
class Promoted:
    """One promotion, as the registry made it: the new version and the runs it is compared with."""

    registered_model: str
    version: str
    alias: str
    target: str
    policy: str
    run: Run
    report: GateReport
    reference: Run | None = None
    previous: Champion | None = None
    choice: Mapping[str, Any] | None = None
    """Why this candidate won (:func:`mlflow_edge.registry.choice_facts`)."""


# -- facts -----------------------------------------------------------------------------------------------------
def facts(promoted: Promoted) -> dict[str, Any]:
    """Everything the report states, as plain JSON-ready data (non-finite numbers become ``None``)."""
    run = promoted.run
    params, tags = run.data.params, run.data.tags
    return {
        "registered_model": promoted.registered_model,
        "version": promoted.version,
        "alias": promoted.alias,
        "model_uri": f"models:/{promoted.registered_model}@{promoted.alias}",
        "target": promoted.target,
        "study": tags.get(STUDY_TAG, ""),
        "run_id": run.info.run_id,
        "policy": promoted.policy,
        "artifact": {"backend": params.get("backend", ""), "format": params.get("format", ""),
                     "precision": params.get("precision", ""), "size_mb": _finite(run.data.metrics.get("size_mb"))},
        "gates": gate_facts(promoted.report),
        "choice": _finite_values(promoted.choice or {}),
        "comparison": comparison(run, promoted.reference, promoted.previous),
        "hardware": _prefixed(tags, "hw."),
        "versions": _prefixed(tags, "version."),
        "data": {k: v for k, v in sorted(params.items()) if k.startswith(("eval.", "calib."))},
        "source": {k: params[k] for k in ("source", "source.sha256") if k in params},
        "serve": serve_commands(promoted.registered_model, promoted.version, promoted.alias,
                                params.get("backend", "")),
    }


def _finite_values(data: Any) -> Any:
    """``data`` (nested dicts and lists) with every non-finite float as ``None``."""
    if isinstance(data, Mapping):
        return {k: _finite_values(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_values(v) for v in data]
    return _finite(data) if isinstance(data, float) else data


def gate_facts(report: GateReport) -> dict[str, Any]:
    """The gates in force: the parseable spec, the overall result, and per AND group its OR gates with the
    candidate's value (``None`` when missing), threshold and result."""
    groups = [{"group": str(group.group), "status": group.status,
               "gates": [{"metric": r.gate.metric, "op": r.gate.op, "threshold": r.gate.threshold,
                          "value": _finite(r.value), "status": r.status} for r in group.results]}
              for group in report.groups]
    return {"spec": str(report.gates), "passed": report.passed, "groups": groups}


def comparison(run: Run, reference: Run | None, previous: Champion | None) -> dict[str, Any]:
    """The catalogue metrics any of the three has, side by side: this candidate, the reference, the previous
    champion (``None`` where one lacks a metric or does not exist)."""
    columns = {"candidate": run.data.metrics, "reference": reference.data.metrics if reference else {},
               "previous_champion": previous.metrics if previous else {}}
    rows = [{"metric": m.name, "unit": m.unit, "better": m.better,
             **{column: _finite(metrics.get(m.name)) for column, metrics in columns.items()}}
            for m in CATALOGUE if any(m.name in metrics for metrics in columns.values())]
    return {
        "reference": {"run_id": reference.info.run_id} if reference else None,
        "previous_champion": {"version": previous.version, "run_id": previous.run_id} if previous else None,
        "metrics": rows,
    }


def serve_commands(name: str, version: str, alias: str, backend: str) -> list[dict[str, Any]]:
    """How to serve the champion: mlflow-edge's OpenAI-compatible server and MLflow's pyfunc server on the alias, and
    the backend's own servers on the downloaded model file or folder (when its logged model records any)."""
    uri = shlex.quote(f"models:/{name}@{alias}")
    servers = [
        {"server": "mlflow-edge (OpenAI-compatible)",
         "commands": [f"mlflow-edge serve {uri} --host 127.0.0.1 --port {SERVE_PORT}"]},
        {"server": "MLflow pyfunc (/invocations)",
         "commands": [f"mlflow models serve -m {uri} --env-manager local --host 127.0.0.1 --port 5000"]},
    ]
    native = _native_commands(name, version)
    if native:
        servers.append({"server": f"{backend}'s own server (on the downloaded model)", "commands": native})
    return servers


def _native_commands(name: str, version: str) -> list[str]:
    """``mlflow artifacts download`` of the version, then the server templates its model records on the model
    file or folder inside."""
    templates, entry = _native_templates(f"models:/{name}/{version}")
    if not templates or not entry:
        return []
    folder = re.sub(r"[^\w.-]+", "_", name) + f"-v{version}"
    model = shlex.quote(f"{folder}/{entry}")
    download = f"mlflow artifacts download -u {shlex.quote(f'models:/{name}/{version}')} -d {shlex.quote(folder)}"
    return [download] + [t.format(model=model, port=SERVE_PORT, name=shlex.quote(name)) for t in templates]


def _native_templates(model_uri: str) -> tuple[list[str], str | None]:
    """The server templates ``model_uri`` records and its model file or folder (its format flavor's ``data`` entry
    in MLmodel); nothing when the model is unreadable or was logged without them."""
    try:
        info = mlflow.models.get_model_info(model_uri)
    except Exception:  # an unreadable model: the report lists the servers that need none
        return [], None
    templates = list(((info.metadata or {}).get(METADATA_KEY) or {}).get("native_serve_commands") or [])
    entries = [conf.get("data") for flavor, conf in info.flavors.items() if flavor != "python_function"]
    entry = next((str(e) for e in entries if e), None)
    return templates, entry


def _prefixed(tags: Mapping[str, str], prefix: str) -> dict[str, str]:
    return {k: v for k, v in sorted(tags.items()) if k.startswith(prefix)}


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# -- rendering -------------------------------------------------------------------------------------------------
def markdown(report: Mapping[str, Any]) -> str:
    """The report for people, sections in order of importance (a cut description keeps the first ones)."""
    sections = [_summary(report), _gates_section(report["gates"]), _choice_section(report.get("choice") or {}),
                _serve_section(report["serve"]),
                _comparison_section(report), _provenance_section(report)]
    return "\n\n".join(sections) + "\n"


def description(text: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """``text`` as a model version description: whole when it fits ``limit``, else its leading sections that fit and
    a pointer to the full report among the run's artifacts."""
    if len(text) <= limit:
        return text
    note = f"\n\n*Cut to fit the registry: the full report is the run artifact `{ARTIFACT_DIR}/readiness.md`.*\n"
    kept = ""
    for section in text.split("\n\n## "):
        candidate = section if not kept else f"{kept}\n\n## {section}"
        if len(candidate) + len(note) > limit:
            break
        kept = candidate
    return (kept or text[: limit - len(note)]).rstrip() + note


def _summary(report: Mapping[str, Any]) -> str:
    artifact = report["artifact"]
    size = f"{_number(artifact['size_mb'])} MB" if artifact["size_mb"] is not None else _MISSING
    source = report["source"]
    rows = [
        ("registered model", f"`{report['registered_model']}` version {report['version']}"),
        ("alias", f"`{report['alias']}` (target `{report['target']}`)"),
        ("candidate run", f"`{report['run_id']}` (study `{report['study'] or _MISSING}`)"),
        ("policy", f"`{report['policy']}`"),
        ("artifact", f"backend `{artifact['backend']}`, format `{artifact['format']}`, "
                     f"precision `{artifact['precision']}`, size {size}"),
        ("source", f"`{source.get('source', _MISSING)}` (sha256 `{source.get('source.sha256', _MISSING)}`)"),
    ]
    title = f"# Readiness: {report['registered_model']} version {report['version']} @{report['alias']}"
    return title + "\n\n" + _table(("", ""), rows)


def _gates_section(gates: Mapping[str, Any]) -> str:
    passed = sum(group["status"] == "pass" for group in gates["groups"])
    head = f"## Gates: {'PASS' if gates['passed'] else 'FAIL'} {passed}/{len(gates['groups'])}"
    rows = []
    for group in gates["groups"]:
        for index, gate in enumerate(group["gates"]):
            op = "≥" if gate["op"] == ">=" else "≤"
            group_cell = f"`{group['group']}`: {group['status']}" if index == 0 else "or"
            value = _number(gate["value"]) if gate["value"] is not None else "missing"
            rows.append((gate["metric"], value, f"{op} {_number(gate['threshold'])}", gate["status"], group_cell))
    spec = f"Spec: `{gates['spec']}` (every group must pass; a group passes when any of its gates does)."
    return f"{head}\n\n{spec}\n\n" + _table(("gate", "value", "threshold", "result", "group"), rows)


def _choice_section(choice: Mapping[str, Any]) -> str:
    """Why the champion won: its policy and ties, the best feasible candidate per objective, and its dominance."""
    if not choice:
        return "## Why this candidate\n\n" + _MISSING
    ties = (f"; {choice['tied']} tied on it, broken by {', '.join(choice['ties_broken_by'])}"
            if choice["tied"] > 1 else "")
    dominated = ("No feasible candidate dominates it (none is at least as good on every objective and better on one)."
                 if not choice["dominated_by"] else
                 f"Dominated by {', '.join(f'`{r}`' for r in choice['dominated_by'])}.")
    lines = [f"Chosen by `{choice['policy']}` among {choice['feasible']} feasible candidate(s), {choice['front']} of "
             f"them on the feasible Pareto front{ties}. {dominated}"]
    rows = [(row["metric"], row["better"], _number(row["winner_value"]), row["best"], _number(row["best_value"]))
            for row in choice["best_by_objective"]]
    lines.append(_table(("objective", "better", "this", "best feasible", "its value"), rows))
    return "## Why this candidate\n\n" + "\n\n".join(lines)


def _serve_section(servers: list[Mapping[str, Any]]) -> str:
    parts = ["## Serve", "With `MLFLOW_TRACKING_URI` pointing at this tracking server:"]
    for server in servers:
        parts.append(f"{server['server']}:\n\n```sh\n" + "\n".join(server["commands"]) + "\n```")
    return "\n\n".join(parts)


def _comparison_section(report: Mapping[str, Any]) -> str:
    compared = report["comparison"]
    reference = compared["reference"]
    previous = compared["previous_champion"]
    reference_head = f"reference (run `{reference['run_id'][:8]}`)" if reference else "reference (none)"
    previous_head = f"previous champion (version {previous['version']})" if previous else "previous champion (none)"
    rows = [(row["metric"], row["unit"], row["better"], *(_number(row[c]) for c in
                                                         ("candidate", "reference", "previous_champion")))
            for row in compared["metrics"]]
    header = ("metric", "unit", "better", f"this (version {report['version']})", reference_head, previous_head)
    return "## Comparison\n\n" + _table(header, rows)


def _provenance_section(report: Mapping[str, Any]) -> str:
    parts = ["## Provenance"]
    for title, values in (("Evaluation and calibration data", report["data"]),
                          ("Hardware", report["hardware"]), ("Framework versions", report["versions"])):
        body = _table(("", ""), [(f"`{k}`", v) for k, v in values.items()]) if values else _MISSING
        parts.append(f"### {title}\n\n{body}")
    return "\n\n".join(parts)


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _number(value: float | None) -> str:
    if value is None:
        return _MISSING
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
