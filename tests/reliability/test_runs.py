"""Runs end in the right state, and the run stack stays right, however the body of a tracked run fails."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_edge import procs
from mlflow_edge.runs import OWNER_TAG, tracked_run


def test_a_failing_nested_run_ends_failed_and_the_next_run_nests_under_the_parent(tracking_uri):
    with tracked_run("parent", "edge") as parent:
        with pytest.raises(RuntimeError, match="boom"):
            with tracked_run("child", nested=True) as child:
                left_open = mlflow.start_run(run_name="left-open", nested=True)  # the body leaves a run open
                raise RuntimeError("boom")
        assert mlflow.active_run().info.run_id == parent.info.run_id
        with tracked_run("next", nested=True) as following:
            pass
    assert mlflow.active_run() is None
    client = MlflowClient()
    status = {name: client.get_run(run.info.run_id).info.status
              for name, run in (("parent", parent), ("child", child), ("left-open", left_open), ("next", following))}
    assert status == {"parent": "FINISHED", "child": "FAILED", "left-open": "FAILED", "next": "FINISHED"}
    assert client.get_run(child.info.run_id).data.tags["mlflow_edge.error"] == "RuntimeError: boom"
    assert client.get_run(following.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_run(parent.info.run_id).data.tags[OWNER_TAG] == procs.owner_tag()


def test_a_store_that_refuses_the_error_tag_still_ends_the_run(tracking_uri, monkeypatch):
    with tracked_run("parent", "edge") as parent:
        with pytest.raises(RuntimeError, match="boom"):
            with tracked_run("child", nested=True) as child:
                def refuse(*args, **kwargs):
                    raise mlflow.exceptions.MlflowException("the store is read-only")

                monkeypatch.setattr(MlflowClient, "set_tag", refuse)  # our call to the store fails, as a store would
                raise RuntimeError("boom")
        monkeypatch.undo()
        assert mlflow.active_run().info.run_id == parent.info.run_id
    assert MlflowClient().get_run(child.info.run_id).info.status == "FAILED"
