"""Device workers (issue #18): a coordinator that runs no trial waits, saying so, for workers on the target's hardware;
a worker takes only a study it can measure; a target nobody measures ends in one line, never silently."""

from __future__ import annotations

import os
import subprocess
import time

import mlflow
import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from mlflow_edge.errors import EdgeError
from mlflow_edge.search.workers import COORDINATION_ATTR, run_worker
from mlflow_edge.targets import is_measurable
from tests.scaleout.processes import FAST, cli, start, wait_for_text

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def device_study(postgres, tracking_server, tiny_source, tmp_path_factory):
    """A coordinator started with --coordinate-only, then one worker that joins once the coordinator has said that
    none has."""
    folder = tmp_path_factory.mktemp("device")
    storage = postgres.database("optuna_device")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_server, "MLFLOW_REGISTRY_URI": tracking_server}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    common = ["--model", str(tiny_source.path), "--storage", storage, "--study-name", "device"]
    coordinator = start(["search", *common, "--coordinate-only", "--backends", "llamacpp", "--trials", "2",
                          "--gates", "accuracy_retention>=0.5", "--screen-windows", "0", "--registered-model",
                          "device-edge", *FAST], folder / "coordinator.log", env, folder)
    wait_for_text(folder / "coordinator.log", "no worker for target 'cpu' has joined yet", coordinator)
    worker = start(["search", "--worker", *common, "--target", "cpu"], folder / "worker.log", env, folder)
    codes = [p.wait(timeout=600) for p in (coordinator, worker)]
    logs = {p.stem: p.read_text() for p in folder.glob("*.log")}
    assert codes == [0, 0], "\n".join(f"== {k}\n{v[-3000:]}" for k, v in logs.items())
    mlflow.set_tracking_uri(tracking_server)
    mlflow.set_registry_uri(tracking_server)
    yield optuna.load_study(study_name="device", storage=storage), worker.pid, logs
    mlflow.set_tracking_uri(None)


def test_the_coordinator_says_how_to_join_and_then_who_works(device_study):
    _, worker_pid, logs = device_study
    waiting = next(line for line in logs["coordinator"].splitlines() if "has joined yet" in line)
    assert "`mlflow-edge search --worker --storage postgresql+psycopg2://" in waiting
    assert waiting.endswith("/optuna_device --study-name device --target cpu`")
    assert any(f":{worker_pid}-" in line and "workers:" in line for line in logs["coordinator"].splitlines())


def test_only_the_worker_ran_trials_and_the_coordinator_promoted(device_study):
    study, worker_pid, _ = device_study
    measured = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    assert len(measured) == 2
    assert {t.user_attrs["owner"].split("-")[0].rsplit(":", 1)[1] for t in measured} == {str(worker_pid)}
    joined = [k for k in study.user_attrs if k.startswith("mlflow_edge.worker:")]
    assert len(joined) == 1 and study.user_attrs[joined[0]]["target"] == "cpu"
    aliases = MlflowClient().get_registered_model("device-edge").aliases
    assert list(aliases) == ["cpu-champion"]


@pytest.mark.skipif(is_measurable("apple-silicon"), reason="this machine can measure apple-silicon")
def test_a_target_without_hardware_or_worker_waits_visibly_then_fails_in_one_line(tmp_path, tiny_source,
                                                                                    use_sqlite_store):
    with pytest.MonkeyPatch.context() as patch:
        uri = use_sqlite_store(tmp_path, patch)
        storage = f"sqlite:///{tmp_path / 'optuna.db'}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        coordinator = subprocess.Popen(
            cli("search", "--model", str(tiny_source.path), "--target", "apple-silicon", "--backends", "llamacpp",
                 "--storage", storage, "--study-name", "mac", "--trials", "2", "--timeout", "2",
                 "--gates", "accuracy_retention>=0.5", "--registered-model", "mac-edge", *FAST),
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if COORDINATION_ATTR in optuna.load_study(study_name="mac", storage=storage).user_attrs:
                    break
            except KeyError:
                pass
            time.sleep(0.5)
        with pytest.raises(EdgeError, match="needs macOS on arm64; this machine lacks it: join from one that has it"):
            run_worker(storage, "mac", "apple-silicon", wait_s=5)
        out, err = coordinator.communicate(timeout=300)
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        mlflow.end_run()
    assert coordinator.returncode == 1, err[-3000:]
    assert "no worker for target 'apple-silicon' has joined yet: on a machine with macOS on arm64 run" in err
    assert err.strip().splitlines()[-1] == (
        "mlflow-edge: error: no worker for target 'apple-silicon' measured a trial of study 'mac' within 2 s; "
        "start `mlflow-edge search --worker` on a machine with macOS on arm64; nothing promoted")
    roles = {r.data.tags.get("mlflow_edge.role"): r for r in runs}
    assert roles["study"].info.status == "FAILED"
    assert "decode_tok_s" not in roles["reference"].data.metrics  # nothing of this machine's speed stands for a Mac
    assert "perplexity" in roles["reference"].data.metrics
    assert not MlflowClient().search_registered_models()
