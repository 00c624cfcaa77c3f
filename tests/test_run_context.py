"""The run context provider tags every fluent run with the hardware fingerprint (entry point, real store)."""

from __future__ import annotations

from importlib.metadata import entry_points

import mlflow

from mlflow_edge.run_context import HardwareContext
from mlflow_edge.targets import HW_KEYS, hardware_fingerprint


def test_entry_point_is_registered():
    names = {ep.value for ep in entry_points(group="mlflow.run_context_provider")}
    assert "mlflow_edge.run_context:HardwareContext" in names


def test_any_run_gets_the_fingerprint(tracking_uri):
    with mlflow.start_run() as run:
        pass
    tags = mlflow.get_run(run.info.run_id).data.tags
    for key in HW_KEYS:
        assert tags[key] == hardware_fingerprint()[key]
    assert tags["version.mlflow"] == mlflow.__version__


def test_provider_tags():
    tags = HardwareContext().tags()
    assert HardwareContext().in_context()
    assert set(HW_KEYS) <= set(tags) and all(isinstance(v, str) for v in tags.values())
