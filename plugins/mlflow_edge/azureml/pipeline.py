"""mlflow-edge's flow as an Azure ML pipeline job of command components (SDK v2, ``azure-ai-ml``)::

    convert ──► search, one per target, in parallel ──► promote, one per target, after every search

``convert`` converts the source once for the first target: a bad model id or a source no backend converts fails
there, once, before the searches start. Each ``search`` step consumes the convert step's output and runs one Optuna
search (``--storage``: an Optuna database every step reaches, e.g. PostgreSQL, to share and resume studies); each
``promote`` step consumes every search's output, so promotion sees all of them. Every step installs the uploaded
source checkout into an environment built from the distribution's own requirements (:mod:`.environment`).

Tracking: Azure ML sets ``MLFLOW_TRACKING_URI`` (the workspace's ``azureml://`` URI) and ``MLFLOW_RUN_ID`` in every
job, so each step's run is its job's run, in the pipeline's experiment, the one ``promote`` searches. MLflow resolves
``azureml://`` only through ``azureml-mlflow``'s tracking-store plugin, which is not installed: it pins
``mlflow-skinny<=3.15.0``, which conflicts with mlflow 3.17. So ``tracking_uri`` (``--tracking-uri``) points every
step at an MLflow tracking server the compute reaches instead (the scale-out ``mlflow server`` of README "Scale
out"): each command then runs with that ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI`` and without Azure's
``MLFLOW_RUN_ID``. A local user reads the workspace's URI with ``MLClient.workspaces.get(name).mlflow_tracking_uri``.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, Sequence

from azure.ai.ml import Input, Output, command, dsl
from azure.ai.ml.entities import PipelineJob

from mlflow_edge.azureml.environment import (
    DEFAULT_IMAGE,
    INSTALL_SOURCE,
    extras_for,
    job_environment,
    source_checkout,
)
from mlflow_edge.azureml.workspace import submit, workspace_client
from mlflow_edge.errors import EdgeError
from mlflow_edge.sources import DEMO_NAME, DEMO_SPEC
from mlflow_edge.targets import get_target

__all__ = ["DEFAULT_IMAGE", "build_pipeline", "step_name", "submit", "workspace_client", "write_pipeline_yaml"]

DEMO_REGISTERED_MODEL = f"{DEMO_NAME}-edge"
"""The registered model of ``--model demo`` when none is given (what ``search`` names it)."""

CONVERT_COMMAND = ("mlflow-edge convert --model ${{inputs.model}} --target ${{inputs.target}} "
                   "> ${{outputs.converted}}/model_uri.txt && cat ${{outputs.converted}}/model_uri.txt")
SEARCH_COMMAND = ("cat ${{inputs.converted}}/model_uri.txt && "
                  "mlflow-edge search --model ${{inputs.model}} --target ${{inputs.target}} "
                  "--trials ${{inputs.trials}} --registered-model ${{inputs.registered_model}} "
                  "$[[--storage ${{inputs.storage}}]] "
                  "> ${{outputs.summary}}/search.txt && cat ${{outputs.summary}}/search.txt")
PROMOTE_COMMAND = ("mlflow-edge promote --experiment ${{inputs.experiment}} --target ${{inputs.target}} "
                   "--registered-model ${{inputs.registered_model}}")


def step_name(step: str, target: str | None = None) -> str:
    """A pipeline node's name: ``convert``, ``search_arm_cpu``, ``promote_cpu`` (node names allow no ``-``)."""
    return step if target is None else f"{step}_{target.replace('-', '_')}"


def build_pipeline(*, model: str = "demo", targets: Sequence[str] = ("cpu",), trials: int = 8,
                   registered_model: str | None = None, storage: str | None = None,
                   compute: str = "cpu-cluster", experiment: str = "mlflow-edge",
                   image: str = DEFAULT_IMAGE, extras: Sequence[str] = (),
                   code: str | os.PathLike | None = None, tracking_uri: str | None = None) -> PipelineJob:
    """The pipeline job for ``model`` on ``targets`` (validated first; nothing contacts Azure). ``extras``: more
    extras of the distribution for the steps' environment (the driver of a ``storage`` database, …);
    ``tracking_uri``: the MLflow tracking server the steps log to (see the module's docstring)."""
    targets = tuple(dict.fromkeys(get_target(t.strip()).name for t in targets if t.strip()))
    if not targets:
        raise EdgeError("no target given (e.g. --targets cpu,arm-cpu)")
    if trials < 1:
        raise EdgeError(f"--trials must be at least 1, got {trials}")
    for option, value in (("--compute", compute), ("--experiment", experiment), ("--model", model)):
        if not value.strip():
            raise EdgeError(f"{option} is empty")
    registered_model = registered_model or _default_registered_model(model)
    environment = job_environment(extras_for(targets, requested=extras), image)
    code = str(code or source_checkout())
    components = _components(environment, code, targets, _tracking_prefix(tracking_uri))

    @dsl.pipeline(display_name=f"mlflow-edge {model} on {','.join(targets)}", experiment_name=experiment,
                  default_compute=compute)
    def edge_pipeline(model, trials, registered_model, experiment):  # no annotations: dsl reads them as types
        converted = components["convert"](model=model, target=targets[0])
        converted.name = step_name("convert")
        shared = {"storage": storage} if storage else {}
        summaries = {}
        for target in targets:
            node = components["search"](model=model, target=target, trials=trials, registered_model=registered_model,
                                        converted=converted.outputs.converted, **shared)
            node.name = step_name("search", target)
            summaries[step_name("summary", target)] = node.outputs.summary
        for target in targets:
            node = components["promote"](experiment=experiment, target=target, registered_model=registered_model,
                                         **summaries)
            node.name = step_name("promote", target)

    return edge_pipeline(model=model, trials=trials, registered_model=registered_model, experiment=experiment)


def _default_registered_model(model: str) -> str:
    if model == DEMO_SPEC:
        return DEMO_REGISTERED_MODEL
    raise EdgeError("--registered-model is required for a model other than demo (search and promote share it)")


def _tracking_prefix(tracking_uri: str | None) -> str:
    """``env …`` that runs an ``mlflow-edge`` command against ``tracking_uri`` (nothing without one)."""
    if not tracking_uri:
        return ""
    if not tracking_uri.startswith(("http://", "https://", "postgresql", "mysql")):
        raise EdgeError(f"--tracking-uri must be a tracking server or database every compute node reaches, got "
                        f"'{tracking_uri}'")
    quoted = shlex.quote(tracking_uri)
    return f"env -u MLFLOW_RUN_ID MLFLOW_TRACKING_URI={quoted} MLFLOW_REGISTRY_URI={quoted} "


def _components(environment: Any, code: str, targets: Sequence[str], tracking: str = "") -> dict[str, Any]:
    """The three command components; ``promote`` takes one search summary per target, its dependency on each;
    ``tracking`` prefixes every ``mlflow-edge`` command (:func:`_tracking_prefix`)."""
    def component(name: str, run: str, inputs: dict[str, Input], outputs: dict[str, Output] | None = None) -> Any:
        tracked = run.replace("mlflow-edge ", f"{tracking}mlflow-edge ")
        return command(display_name=name, command=f"{INSTALL_SOURCE} && {tracked}", inputs=inputs, outputs=outputs,
                       environment=environment, code=code)

    text = Input(type="string")
    summaries = {step_name("summary", t): Input(type="uri_folder") for t in targets}
    return {
        "convert": component("convert", CONVERT_COMMAND, {"model": text, "target": text},
                             {"converted": Output(type="uri_folder")}),
        "search": component("search", SEARCH_COMMAND,
                            {"model": text, "target": text, "trials": Input(type="integer"),
                             "registered_model": text, "storage": Input(type="string", optional=True),
                             "converted": Input(type="uri_folder")},
                            {"summary": Output(type="uri_folder")}),
        "promote": component("promote", PROMOTE_COMMAND,
                             {"experiment": text, "target": text, "registered_model": text, **summaries}),
    }


def write_pipeline_yaml(job: PipelineJob, path: str | os.PathLike) -> Path:
    """Write ``job`` as azure-ai-ml's own YAML (``az ml job create --file`` and ``load_job`` read it back)."""
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as stream:  # job.dump(<path>) refuses to replace a file
            job.dump(stream)
    except OSError as exc:
        raise EdgeError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out

