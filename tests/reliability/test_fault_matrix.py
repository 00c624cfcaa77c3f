"""A fault matrix on real ``mlflow-edge`` CLI processes, a real sqlite store and the tiny Llama.

Each fault is injected into ``python -m mlflow_edge.cli …`` running with its own cache (``MLFLOW_EDGE_CACHE``, so
conversions and quantizations are really built): SIGKILL while it converts, quantizes, evaluates a trial, logs a model
and promotes; a cache on a full file system; a framework exception inside one trial of a search. The phase is found
from the outside (the child processes it starts, its build folders, the model folder MLflow writes in ``$TMPDIR``),
except for promotion, whose register-to-alias window is too short to hit from outside: there a child runs the CLI with
``MlflowClient.set_registered_model_alias`` replaced by a SIGKILL of itself (as ``tests/test_promotion_safety.py``
does for ``registry.promote``).

After each fault: the exit (killed, or exit 1 with one ``mlflow-edge: error:`` line); the children of the killed
process die by themselves (``PR_SET_PDEATHSIG``); every registered version has complete files and every aliased one
loads and answers; the champion alias is untouched or on a complete version; the next run of the same command
succeeds (a search resumes its study); no build folder or partial file is left in the cache after it; runs a killed
search left RUNNING end FAILED on the next search of its study. ``pytest -s`` prints the fault × outcome table at
the end of the module; it is also written to ``fault_matrix.json`` in the module's temporary folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
import optuna
import psutil
import pytest
from mlflow import MlflowClient
from mlflow.models import Model

from mlflow_edge import artifacts, cache
from mlflow_edge.runs import STALE_REASON
from tests.reliability.test_bad_input import assert_one_line_error
from tests.reliability.test_procs import alive, wait_gone

pytestmark = pytest.mark.slow

EVAL = ["--windows", "2", "--window", "64", "--repeats", "1", "--threads", "2"]
SEARCH = ["--accuracy-only", "true", "--gates", "accuracy_retention>=0.5", "--seed", "0", *EVAL]
KILL_BEFORE_ALIAS = textwrap.dedent("""
    import os, signal, sys
    from mlflow import MlflowClient

    def die(*args, **kwargs):  # the process dies between registering the version and moving the alias
        os.kill(os.getpid(), signal.SIGKILL)

    MlflowClient.set_registered_model_alias = die
    sys.argv[0] = "mlflow-edge"
    from mlflow_edge.cli import main
    main()
""")
COLUMNS = ("fault", "hit", "exit", "children", "registry", "next run", "leftovers", "runs", "result", "seconds")


# -- the lab: a store, a cache, the tiny model, and CLI processes -------------------------------------------------
class Cli:
    """A running ``mlflow-edge`` process; its stdout and stderr are read as they come."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.started = time.monotonic()
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def child(self, marker: str) -> psutil.Process | None:
        """A running descendant whose command line holds ``marker``."""
        for process in self.descendants():
            try:
                if any(marker in part for part in process.cmdline()):
                    return process
            except psutil.Error:
                continue
        return None

    def wait_for(self, what: str, ready: Callable[[], Any], timeout: float = 300) -> Any:
        """Poll ``ready()`` until it is truthy; the process ending first, or ``timeout``, fails the test."""
        deadline = time.monotonic() + timeout
        while True:
            found = ready()
            if found:
                return found
            if self.proc.poll() is not None:
                self._join()
                raise AssertionError(f"exited {self.proc.returncode} before {what}:\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"no {what} within {timeout:.0f} s:\n{self.stderr[-3000:]}")
            time.sleep(0.02)

    def sigkill(self) -> list[int]:
        """SIGKILL this process only (not its group); returns the pids of its descendants. They are stopped
        (SIGSTOP) just before, so that only the kernel's parent-death signal can end them: a child that would finish
        its work by itself within the wait cannot pass for one that died with its parent."""
        children = self.descendants()
        for process in children:
            try:
                process.suspend()
            except psutil.NoSuchProcess:
                pass
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._join()
        return [process.pid for process in children]

    def finish(self, timeout: float = 600) -> int:
        self.proc.wait(timeout=timeout)
        self._join()
        return self.proc.returncode

    def _join(self) -> None:
        for reader in self._readers:
            reader.join(timeout=10)


@dataclasses.dataclass
class Lab:
    root: Path
    cache: Path
    tmp: Path
    model: str
    uri: str
    rows: list[dict[str, Any]]
    state: dict[str, Any] = dataclasses.field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_RUN", "MLFLOW_EXPERIMENT"))}
        env.update(MLFLOW_TRACKING_URI=self.uri, MLFLOW_EDGE_CACHE=str(self.cache), TMPDIR=str(self.tmp),
                   PYTHONUNBUFFERED="1")
        return {**env, **extra}

    def start(self, *args: str, script: str | None = None, **env: str) -> Cli:
        cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "mlflow_edge.cli"]
        return Cli([*cmd, *args], self.env(**env), self.root)

    def run(self, *args: str, timeout: float = 600, preexec: Callable[[], None] | None = None,
            **env: str) -> subprocess.CompletedProcess:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "mlflow_edge.cli", *args], env=self.env(**env), cwd=self.root,
                              capture_output=True, text=True, timeout=timeout, preexec_fn=preexec)
        done.seconds = time.monotonic() - started  # type: ignore[attr-defined]
        return done

    def row(self, fault: str) -> dict[str, Any]:
        """A row of the table, filled as the test goes (a failing test leaves ``result`` FAILED)."""
        row = {column: "" for column in COLUMNS} | {"fault": fault, "result": "FAILED", "_start": time.monotonic()}
        self.rows.append(row)
        return row


def _done(row: dict[str, Any]) -> None:
    row["result"] = "ok"
    row["seconds"] = f"{time.monotonic() - row['_start']:.0f}"


@pytest.fixture(scope="module")
def fault_table(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    """The rows of the fault × outcome table; printed (``pytest -s``) and written to JSON after the module."""
    rows: list[dict[str, Any]] = []
    yield rows
    for row in rows:
        if row["result"] != "ok":
            row["seconds"] = f"{time.monotonic() - row['_start']:.0f}"
        row.pop("_start", None)
    path = tmp_path_factory.mktemp("fault-matrix") / "fault_matrix.json"
    path.write_text(json.dumps(rows, indent=1))
    print("\n\nFault matrix (real mlflow-edge processes, sqlite store, tiny Llama)")
    for row in rows:
        print(f"\n{row['fault']}  [{row['result']}, {row['seconds']} s]")
        for column in COLUMNS[1:-2]:
            print(f"  {column:<10} {row[column]}")
    print(f"\n(written to {path})")


@pytest.fixture(scope="module")
def lab(fault_table, tiny_source, tmp_path_factory: pytest.TempPathFactory, use_sqlite_store) -> Iterator[Lab]:
    """A sqlite store (the module's cwd) and an empty cache holding only llama.cpp's converter scripts (a pinned
    download, not a build)."""
    from mlflow_edge.backends.llamacpp import converter_dir

    root = tmp_path_factory.mktemp("faults")
    scripts = converter_dir()
    shutil.copytree(scripts, root / "cache" / scripts.parent.name / scripts.name, symlinks=True)
    (root / "tmp").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        uri = use_sqlite_store(root, patch)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        yield Lab(root, root / "cache", root / "tmp", str(tiny_source.path), uri, fault_table)
    mlflow.end_run()


# -- what is checked after each fault -----------------------------------------------------------------------------
def leftovers(folder: Path) -> list[str]:
    """Build folders and partial files under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix == ".tmp" or ".partial" in p.name)


def children_gone(pids: list[int]) -> str:
    """Every pid in ``pids`` (the killed process's stopped descendants) ends within seconds: killed by the kernel
    when their parent died."""
    started = time.monotonic()
    survivors = [pid for pid in pids if not wait_gone(pid, 5.0)]
    for pid in survivors:  # stopped orphans: end them before failing
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"orphans of the killed process outlived it: {survivors}"
    return f"{len(pids)} gone in {time.monotonic() - started:.1f} s" if pids else "none running"


def _files_match(local: Path) -> bool:
    """The model files of a downloaded model have the sha256 its flavor config recorded."""
    for conf in Model.load(str(local)).flavors.values():
        if conf.get("sha256"):
            recorded, base = {conf["data"]: conf["sha256"]}, local
        elif conf.get("model_sha256"):
            recorded, base = conf["model_sha256"], local / conf["data"]
        else:
            continue
        if any(not (base / name).is_file() or cache.sha256_file(base / name) != sha for name, sha in recorded.items()):
            return False
    return True


def registry_sound(lab: Lab) -> str:
    """Every registered version has complete files; every aliased one loads and answers two tokens."""
    client, found = MlflowClient(), []
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name = '{model.name}'"):
            where = tempfile.mkdtemp(dir=lab.root)
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{model.name}/{version.version}",
                                                             dst_path=where))
            assert _files_match(local), f"{model.name} v{version.version} has incomplete or altered files"
            shutil.rmtree(where)
            aliases = client.get_model_version(model.name, version.version).aliases  # search leaves them out
            for alias in aliases:
                answer = mlflow.pyfunc.load_model(f"models:/{model.name}@{alias}").predict(
                    ["Hello"], params={"max_tokens": 2})
                assert len(answer) == 1 and isinstance(answer[0], str)
            state = version.tags.get("mlflow_edge.promotion", "-")
            found.append(f"{model.name} v{version.version}" + "".join(f" @{a}" for a in aliases)
                         + f" ({state})")
    return "; ".join(found) or "nothing registered"


def champions() -> dict[tuple[str, str], str]:
    return {(model.name, alias): str(version) for model in MlflowClient().search_registered_models()
            for alias, version in model.aliases.items()}


def runs_with_status(status: str) -> list[Any]:
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, f"attributes.status = '{status}'", max_results=1000)


def build_folder(kind_folder: Path) -> list[Path]:
    return list(kind_folder.glob("*.tmp")) if kind_folder.is_dir() else []


def seed_cache(lab_cache: Path, artifact: Any) -> None:
    """Copy a cache entry (a base conversion, with its manifest) into ``lab_cache`` under the same kind and key."""
    entry = next(p for p in [artifact.path, *artifact.path.parents] if (p / cache.MANIFEST).is_file())
    shutil.copytree(entry, lab_cache / entry.parent.name / entry.name, symlinks=True, dirs_exist_ok=True)


def _first_error(stderr: str) -> str:
    return next((line for line in stderr.splitlines() if line.startswith("mlflow-edge: error:")), "")


# -- the faults ---------------------------------------------------------------------------------------------------
def test_sigkill_during_conversion(lab: Lab) -> None:
    row = lab.row("1 SIGKILL during conversion (convert --backend llamacpp)")
    before = champions()
    cli = lab.start("convert", "--model", lab.model, "--backend", "llamacpp")
    cli.wait_for("the converter in a build folder", lambda: cli.child("convert_hf_to_gguf.py")
                 and build_folder(lab.cache / "convert-llamacpp"))
    children = cli.sigkill()
    row["hit"] = f"convert_hf_to_gguf.py running, build folder {build_folder(lab.cache / 'convert-llamacpp')[0].name}"
    assert cli.proc.returncode == -signal.SIGKILL
    row["exit"] = "killed (SIGKILL)"
    row["children"] = children_gone(children)
    assert leftovers(lab.cache), "the kill came after the build"
    killed_runs = [r.info.run_id for r in runs_with_status("RUNNING")]
    row["registry"] = registry_sound(lab)
    assert champions() == before

    again = lab.run("convert", "--model", lab.model, "--backend", "llamacpp")
    assert again.returncode == 0 and again.stdout.strip().startswith("models:/"), again.stderr[-3000:]
    row["next run"] = f"exit 0 in {again.seconds:.0f} s, logged {again.stdout.strip()}"
    assert leftovers(lab.cache) == []
    row["leftovers"] = "the dead build folder was removed by the next run"
    still = [r for r in runs_with_status("RUNNING") if r.info.run_id in killed_runs]
    assert killed_runs and not still  # the next command ended the killed one's run FAILED
    row["runs"] = f"{len(killed_runs)} run of the killed process RUNNING -> FAILED by the next command"
    _done(row)


def test_sigkill_during_quantization(lab: Lab) -> None:
    row = lab.row("2 SIGKILL during quantization (quantize --precision Q4_K_M)")
    before = champions()
    cli = lab.start("quantize", "--model", lab.model, "--backend", "llamacpp", "--precision", "Q4_K_M")
    cli.wait_for("the quantizer in a build folder", lambda: "quantizing" in cli.stderr
                 and cli.child("mlflow_edge.backends.llamacpp") and build_folder(lab.cache / "quantize-llamacpp"))
    children = cli.sigkill()
    row["hit"] = "'quantizing' printed, llama.cpp quantizer child running, build folder present"
    assert cli.proc.returncode == -signal.SIGKILL
    row["exit"] = "killed (SIGKILL)"
    row["children"] = children_gone(children)
    assert leftovers(lab.cache / "quantize-llamacpp")
    row["registry"] = registry_sound(lab)
    assert champions() == before
    killed_runs = [r.info.run_id for r in runs_with_status("RUNNING")]

    again = lab.run("quantize", "--model", lab.model, "--backend", "llamacpp", "--precision", "Q4_K_M")
    assert again.returncode == 0 and again.stdout.strip().startswith("models:/"), again.stderr[-3000:]
    row["next run"] = f"exit 0 in {again.seconds:.0f} s"
    assert leftovers(lab.cache) == []
    row["leftovers"] = "the dead build folder was removed by the next run"
    still = [r for r in runs_with_status("RUNNING") if r.info.run_id in killed_runs]
    assert killed_runs and not still  # the killed quantize's run was ended by the next command
    row["runs"] = "the killed run RUNNING -> FAILED by the next command"
    _done(row)


def _worker_on_a_trial(cli: Cli) -> psutil.Process | None:
    """The evaluation worker of a trial (its spec names an artifact, not the reference)."""
    worker = cli.child("mlflow_edge.evaluation.worker")
    try:
        spec = json.loads(Path(worker.cmdline()[-2]).read_text()) if worker else {}
    except (OSError, ValueError, psutil.Error, IndexError):
        return None
    return worker if spec.get("kind") == "artifact" else None


def _study(lab: Lab, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{lab.root / 'optuna.db'}")


def test_sigkill_while_a_trial_evaluates_then_the_search_resumes(lab: Lab) -> None:
    row = lab.row("3 SIGKILL during evaluation (search killed while trial 0's worker measures it)")
    search = ["search", "--model", lab.model, "--study-name", "faults", "--registered-model", "tiny-faults",
              "--backends", "llamacpp", "--trials", "1", *SEARCH]
    before = champions()
    cli = lab.start(*search)
    worker = cli.wait_for("a trial's evaluation worker", lambda: _worker_on_a_trial(cli))
    children = cli.sigkill()
    row["hit"] = f"evaluation worker of trial 0 running (pid {worker.pid}), reference measured"
    assert cli.proc.returncode == -signal.SIGKILL and worker.pid in children
    row["exit"] = "killed (SIGKILL)"
    row["children"] = children_gone(children)
    left_running = {r.info.run_id: r.info.run_name for r in runs_with_status("RUNNING")
                    if r.data.tags.get("mlflow_edge.study") == "faults"}
    assert len(left_running) == 2, left_running  # the search's parent run and trial 0's run
    assert [t.state.name for t in _study(lab, "faults").trials] == ["RUNNING"]
    row["registry"] = registry_sound(lab)
    assert champions() == before

    again = lab.run(*search)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "study faults: 2 trials (1 new)" in again.stdout and "marked trial(s) 0 FAIL" in again.stderr
    assert [t.state.name for t in _study(lab, "faults").trials] == ["FAIL", "COMPLETE"]
    row["next run"] = f"exit 0 in {again.seconds:.0f} s: resumed, trial 0 FAIL, trial 1 COMPLETE, promoted"
    client = MlflowClient()
    for run_id in left_running:
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and run.data.tags["mlflow_edge.error"] == STALE_REASON
    row["runs"] = f"{len(left_running)} left RUNNING ({', '.join(sorted(left_running.values()))}) -> FAILED, stale"
    row["registry"] += f" -> {registry_sound(lab)}"
    assert ("tiny-faults", "cpu-champion") in champions()
    assert leftovers(lab.cache) == []
    temp = sorted(p.name for p in lab.tmp.iterdir() if p.name.startswith("mlflow-edge-eval-"))
    row["leftovers"] = f"cache clean; $TMPDIR keeps {len(temp)} evaluation folder(s) of the killed search"
    lab.state["study"] = "faults"
    _done(row)


def test_sigkill_during_model_logging(lab: Lab) -> None:
    row = lab.row("4 SIGKILL during model logging (quantize, artifact cached: killed in MLflow's save_model)")
    before, earlier = champions(), {r.info.run_id for r in runs_with_status("RUNNING")}
    cli = lab.start("quantize", "--model", lab.model, "--backend", "llamacpp", "--precision", "Q4_K_M")
    saving = cli.wait_for("MLflow saving the model in $TMPDIR", lambda: next(lab.tmp.glob("*/model/model.gguf"), None))
    children = cli.sigkill()
    row["hit"] = f"model folder being written in $TMPDIR ({saving.parent.parent.name}/model)"
    assert cli.proc.returncode == -signal.SIGKILL
    row["exit"] = "killed (SIGKILL)"
    row["children"] = children_gone(children)
    (killed,) = [r for r in runs_with_status("RUNNING") if r.info.run_id not in earlier]
    assert "mlflow_edge.model_uri" not in killed.data.tags
    pending = [m for m in MlflowClient().search_logged_models([killed.info.experiment_id])
               if m.source_run_id == killed.info.run_id]
    row["registry"] = (f"{registry_sound(lab)}; the killed run's logged model: "
                       + (", ".join(f"{m.model_id} {m.status}" for m in pending) or "none"))
    assert champions() == before

    again = lab.run("quantize", "--model", lab.model, "--backend", "llamacpp", "--precision", "Q4_K_M")
    assert again.returncode == 0 and again.stdout.strip().startswith("models:/"), again.stderr[-3000:]
    uri = again.stdout.strip()
    answer = mlflow.pyfunc.load_model(uri).predict(["Hello"], params={"max_tokens": 2})
    assert len(answer) == 1
    row["next run"] = f"exit 0 in {again.seconds:.0f} s; its model loads and answers"
    assert leftovers(lab.cache) == []
    row["leftovers"] = f"cache clean; $TMPDIR keeps MLflow's folder {saving.parent.parent.name} of the killed run"
    assert MlflowClient().get_run(killed.info.run_id).info.status == "FAILED"
    row["runs"] = "the killed run (no mlflow_edge.model_uri: never a candidate) -> FAILED by the next command"
    _done(row)


def test_sigkill_during_promotion_then_the_next_promotion_adopts(lab: Lab) -> None:
    row = lab.row("5 SIGKILL during promotion (promote, killed between register and alias)")
    if "study" not in lab.state:
        pytest.skip("needs the candidates of the search of fault 3")
    before = champions()
    promote = ["promote", "--experiment", "mlflow-edge", "--registered-model", "tiny-promoted", "--study",
               lab.state["study"], "--gates", "accuracy_retention>=0.5"]
    cli = lab.start(*promote, script=KILL_BEFORE_ALIAS)
    assert cli.finish(timeout=300) == -signal.SIGKILL, cli.stderr[-3000:]
    row["hit"] = "child CLI with set_registered_model_alias replaced by a SIGKILL of itself (version registered)"
    row["exit"] = "killed (SIGKILL)"
    row["children"] = "none running"
    client = MlflowClient()
    (orphan,) = client.search_model_versions("name = 'tiny-promoted'")
    orphan = client.get_model_version("tiny-promoted", orphan.version)  # with its aliases
    assert orphan.tags["mlflow_edge.promotion"] == "pending" and not orphan.aliases
    assert champions() == before  # the other model's champion is untouched
    row["registry"] = registry_sound(lab)

    again = lab.run(*promote)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"to tiny-promoted version {orphan.version} @cpu-champion" in again.stdout  # adopted, not registered again
    (version,) = client.search_model_versions("name = 'tiny-promoted'")
    version = client.get_model_version("tiny-promoted", version.version)
    assert version.aliases == ["cpu-champion"] and version.tags["mlflow_edge.promotion"] == "done"
    row["next run"] = f"exit 0 in {again.seconds:.0f} s: adopted the pending version {orphan.version}"
    row["registry"] += f" -> {registry_sound(lab)}"
    assert leftovers(lab.cache) == []
    row["leftovers"] = "none"
    row["runs"] = "a run the killed promote left RUNNING is ended FAILED by the next command"
    _done(row)


@pytest.fixture()
def small_disk(lab: Lab, tiny_source) -> Iterator[tuple[Path, str, Callable[[], None] | None, Callable[[], None]]]:
    """A cache on a file system with the base conversion and 4 MiB to spare: a tmpfs mounted here when permitted,
    else a folder whose writer runs under RLIMIT_FSIZE. Yields (cache, how, preexec for the child, make room)."""
    folder = lab.root / "small-disk"
    folder.mkdir()
    base = artifacts.convert(tiny_source, "llamacpp")  # from the default cache: the base conversion is no fault
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    scripts = next((lab.cache / "llama.cpp-scripts").iterdir())
    shutil.copytree(scripts, folder / "llama.cpp-scripts" / scripts.name, symlinks=True)
    seed_cache(folder, base)
    if mounted:
        stat = os.statvfs(folder)
        used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
        subprocess.run(["mount", "-o", f"remount,size={(used >> 20) + 5}m", str(folder)], check=True)

        def make_room() -> None:
            subprocess.run(["mount", "-o", "remount,size=256m", str(folder)], check=True)

        try:
            yield folder, "tmpfs (the base conversion and 4-5 MiB free)", None, make_room
        finally:
            subprocess.run(["umount", str(folder)], check=True)
    else:
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))

        yield folder, "RLIMIT_FSIZE 8 MiB on the CLI and its children (mount not permitted)", limit, lambda: None


def test_a_full_disk_is_one_line_and_the_next_run_succeeds(lab: Lab, small_disk) -> None:
    row = lab.row("6 full disk (quantize with the cache on a small file system)")
    disk, how, preexec, make_room = small_disk
    before, earlier = champions(), {r.info.run_id for r in runs_with_status("FAILED")}
    args = ["quantize", "--model", lab.model, "--backend", "llamacpp", "--precision", "Q4_K_M",
            "--experiment", "full-disk"]
    done = lab.run(*args, preexec=preexec, MLFLOW_EDGE_CACHE=str(disk))
    row["hit"] = how
    line = assert_one_line_error(done.returncode, done.stderr, "could not quantize to Q4_K_M")
    assert "no space left" in line or "the disk is full" in line or "RLIMIT" in how, line
    row["exit"] = f"exit 1: {line}"
    row["children"] = "quantizer ended with an error"
    (failed,) = [r for r in runs_with_status("FAILED") if r.info.run_id not in earlier]
    assert failed.data.tags["mlflow_edge.error"] == line.removeprefix("mlflow-edge: error: ")
    assert leftovers(disk) == []
    row["registry"] = registry_sound(lab)
    assert champions() == before

    make_room()
    again = lab.run(*args, MLFLOW_EDGE_CACHE=str(disk))
    assert again.returncode == 0 and again.stdout.strip().startswith("models:/"), again.stderr[-3000:]
    row["next run"] = f"with room: exit 0 in {again.seconds:.0f} s"
    assert leftovers(disk) == []
    row["leftovers"] = "none (the build folder went with the error)"
    row["runs"] = "the run ended FAILED with the reason in mlflow_edge.error"
    _done(row)


def test_a_framework_exception_inside_a_trial_fails_that_trial_only(lab: Lab, tiny_source) -> None:
    row = lab.row("7 framework exception in a trial (OpenVINO refuses INFERENCE_PRECISION_HINT=f64 at compile)")
    seed_cache(lab.cache, artifacts.convert(tiny_source, "openvino"))  # OpenVINO's export is not the fault here
    done = lab.run("search", "--model", lab.model, "--study-name", "faults-framework", "--registered-model",
                   "tiny-framework", "--backends", "llamacpp,openvino", "--trials", "2", *SEARCH,
                   MLFLOW_EDGE_OPENVINO_INFERENCE_PRECISION="f64")
    row["hit"] = "MLFLOW_EDGE_OPENVINO_INFERENCE_PRECISION=f64: core.compile_model raises in trial 1's worker"
    assert done.returncode == 0, done.stderr[-3000:]
    row["exit"] = "exit 0 (the search goes on)"
    row["children"] = "the failing worker exited 1"
    trials = _study(lab, "faults-framework").trials
    assert [(t.params["backend"], t.state.name) for t in trials] == [("llamacpp", "COMPLETE"), ("openvino", "FAIL")]
    assert "INFERENCE_PRECISION_HINT" in trials[1].user_attrs["error"]
    failed = MlflowClient().get_run(trials[1].user_attrs["run_id"])
    assert failed.info.status == "FAILED" and "INFERENCE_PRECISION_HINT" in failed.data.tags["mlflow_edge.error"]
    champion = MlflowClient().get_model_version_by_alias("tiny-framework", "cpu-champion")
    assert champion.tags["mlflow_edge.run_id"] == trials[0].user_attrs["run_id"]
    row["registry"] = registry_sound(lab)
    row["next run"] = f"the same run: {done.seconds:.0f} s, trial 0 (llamacpp) promoted"
    assert leftovers(lab.cache) == []
    row["leftovers"] = "none"
    row["runs"] = f"trial 1's run FAILED with the reason; {done.stderr.count('Traceback')} traceback(s) on stderr"
    _done(row)


def test_no_process_of_the_module_outlives_it(lab: Lab) -> None:
    """Whatever the faults left, no process started under the lab's folders still runs."""
    mine = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if any(str(lab.root) in part for part in process.info["cmdline"] or ()) and alive(process.info["pid"]):
            mine.append((process.info["pid"], " ".join(process.info["cmdline"])[:200]))
    assert not mine


KILL_AFTER_ALIAS = textwrap.dedent("""
    import os, signal, sys
    import mlflow
    from mlflow import MlflowClient
    from mlflow_edge import registry
    from mlflow_edge.gates import parse_gates
    from mlflow_edge.tags import PROMOTION_TAG

    original = MlflowClient.set_model_version_tag

    def tag(self, name, version, key, value):  # dies once the alias is set, before the version is tagged done
        if key == PROMOTION_TAG and value == "done":
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, name, version, key, value)

    MlflowClient.set_model_version_tag = tag
    mlflow.set_tracking_uri(sys.argv[1])
    experiment = mlflow.get_experiment_by_name("edge")
    registry.promote([experiment.experiment_id], "cpu", parse_gates(None), "min:size_mb", sys.argv[2], sys.argv[3])
""")


def test_sigkill_after_the_alias_keeps_the_champion_version(lab: Lab, tracking_uri: str, stub_gguf) -> None:
    """Stub candidates in a store of their own (the lab's aliased versions must load): the kill lands after the
    alias moved and before the version is tagged done; a better candidate is promoted next."""
    from tests.test_readiness import FIRST, NAME, SMALLER, STUDY, _candidate

    row = lab.row("5b SIGKILL after the alias, before the 'done' tag (registry.promote in a child, stub models)")
    try:
        mlflow.set_experiment("edge")
        _candidate(stub_gguf, FIRST)
        child = subprocess.run([sys.executable, "-c", KILL_AFTER_ALIAS, tracking_uri, NAME, STUDY],
                               capture_output=True, text=True, timeout=300)
        assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
        row["exit"], row["children"], row["leftovers"], row["runs"] = "killed (SIGKILL)", "none running", "-", "-"
        client = MlflowClient()
        champion = client.get_model_version_by_alias(NAME, "cpu-champion")
        assert champion.tags["mlflow_edge.promotion"] == "pending"
        row["hit"] = f"alias on v{champion.version}, still tagged pending"
        _candidate(stub_gguf, SMALLER)
        promoted = subprocess.run([sys.executable, "-m", "mlflow_edge.cli", "promote", "--experiment", "edge",
                                   "--registered-model", NAME, "--study", STUDY], capture_output=True, text=True,
                                  timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri})
        assert promoted.returncode == 0, promoted.stderr[-3000:]
        kept = [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")]
        row["next run"] = f"a better candidate promoted: {promoted.stdout.strip()}"
        row["registry"] = f"versions left: {', '.join(kept)}"
        row["result"] = "BUG: the previous champion's version was deleted" if str(
            champion.version) not in kept else "ok"
        assert str(champion.version) in kept, "the previous champion's version was deleted by the next promotion"
        _done(row)
    finally:
        mlflow.set_tracking_uri(lab.uri)
        mlflow.set_registry_uri(lab.uri)
