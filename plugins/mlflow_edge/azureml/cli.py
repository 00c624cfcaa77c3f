"""``mlflow-edge azureml``: run mlflow-edge's flow on Azure ML (``pipeline``).

The Azure SDK is imported only when a command runs: the main CLI starts as fast without it, and a missing ``azure``
extra is a one-line error.
"""

from __future__ import annotations

import click

from mlflow_edge.azureml.environment import DEFAULT_IMAGE
from mlflow_edge.azureml.workspace import require_azure_sdk
from mlflow_edge.errors import one_line_errors
from mlflow_edge.sources import DEMO_NAME

DEFAULT_OUT = "mlflow-edge-pipeline.yml"


@click.group("azureml")
def azureml() -> None:
    """Run mlflow-edge on Azure ML (SDK v2): a pipeline of convert, search per target, promote."""


@azureml.command()
@click.option("--model", default="demo", show_default=True,
              help="source: 'demo', a Hugging Face id, or a path the compute can read")
@click.option("--targets", default="cpu", show_default=True, help="comma-separated hardware targets, one search each")
@click.option("--trials", default=8, show_default=True, type=click.IntRange(1), help="trial budget of each search")
@click.option("--registered-model", default=None,
              help=f"registered model name, shared by search and promote (default for demo: {DEMO_NAME}-edge)")
@click.option("--storage", default=None,
              help="Optuna storage URL the search steps share (e.g. postgresql://…; default: one per step)")
@click.option("--extras", default="",
              help="more extras of mlflow-edge for the steps' environment, comma-separated (e.g. the one with "
                   "the --storage database's driver)")
@click.option("--tracking-uri", default=None,
              help="MLflow tracking server the steps log to (needed: the workspace's azureml:// URI needs "
                   "azureml-mlflow, which does not install beside mlflow 3.17)")
@click.option("--compute", default="cpu-cluster", show_default=True, help="Azure ML compute target")
@click.option("--experiment", default="mlflow-edge", show_default=True, help="Azure ML (and MLflow) experiment")
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="base Docker image of the steps")
@click.option("--out", default=DEFAULT_OUT, show_default=True, help="where to write the pipeline YAML")
@click.option("--workspace-config", default=None,
              help="the workspace's config.json (default: one in this folder or .azureml/, else the "
                   "AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, AZUREML_WORKSPACE_NAME variables)")
@click.option("--dry-run", is_flag=True, help="only write the YAML (no workspace needed)")
@one_line_errors
def pipeline(model: str, targets: str, trials: int, registered_model: str | None, storage: str | None, extras: str,
             tracking_uri: str | None, compute: str, experiment: str, image: str, out: str,
             workspace_config: str | None, dry_run: bool) -> None:
    """Write the Azure ML pipeline YAML and, unless --dry-run, submit it to the workspace."""
    require_azure_sdk()
    from mlflow_edge.azureml import pipeline as azure_pipeline

    job = azure_pipeline.build_pipeline(model=model, targets=targets.split(","), trials=trials,
                                        registered_model=registered_model, storage=storage, compute=compute,
                                        experiment=experiment, image=image, extras=extras.split(","),
                                        tracking_uri=tracking_uri)
    ml_client = None if dry_run else azure_pipeline.workspace_client(workspace_config)  # before anything is written
    click.echo(f"pipeline: {azure_pipeline.write_pipeline_yaml(job, out)}")
    if ml_client is not None:
        submitted = azure_pipeline.submit(job, ml_client)
        click.echo(f"submitted: {submitted.name} {submitted.studio_url}")
