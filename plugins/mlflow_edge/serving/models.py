"""What the server serves: a model of any mlflow-edge flavor, loaded by the installed mlflow-edge's own loaders, and
the registry alias it follows.

A model URI resolves to a :class:`ModelRef` (``models:/<name>@<alias>`` follows the alias; ``models:/<name>/<version>``,
``runs:/…`` and a local folder are fixed). :func:`load_model` downloads it and loads its pyfunc loader module only
when that module is the flavor of a registered backend — never the ``code/`` a model folder carries — so serving a
model never runs code from its files. A :class:`ServedModel` runs its generations one at a time on its own worker
thread, from a bounded queue. :class:`ModelHolder` keeps the current model and, for an alias, checks it at an interval
and on demand (SIGHUP): a new version loads beside the old one, new requests go to it, queued and in-flight ones finish
on the old one, which is then dropped. A version that fails to load leaves the old one serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import queue
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from mlflow.exceptions import MlflowException
from mlflow.models import Model

from mlflow_edge.backends import backend_names, get_backend
from mlflow_edge.errors import EdgeError, first_line
from mlflow_edge.flavors._common import Completion, Request, TextGenerator
from mlflow_edge.tags import METADATA_KEY

PYFUNC = "python_function"


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A model URI resolved: what to download (``uri``), the served name, and the alias and version it came from."""

    uri: str
    name: str
    alias: str | None = None
    version: str | None = None

    @property
    def follows_alias(self) -> bool:
        return self.alias is not None


def resolve(spec: str) -> ModelRef:
    """``spec`` (``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<id>/<path>``, a local model folder)
    as a :class:`ModelRef`; an alias is looked up in the registry now."""
    if spec.startswith("models:/"):
        body = spec[len("models:/"):].strip("/")
        if "@" in body:
            name, alias = body.split("@", 1)
            version = _alias_version(name, alias)
            return ModelRef(f"models:/{name}/{version}", name, alias, version)
        name, _, version = body.partition("/")
        return ModelRef(spec, name, None, version or None)
    if "://" in spec or spec.startswith("runs:/"):
        return ModelRef(spec, spec.rstrip("/").rsplit("/", 1)[-1] or spec)
    path = Path(spec)
    if not (path / "MLmodel").is_file():
        raise EdgeError(f"{spec} is neither a model URI (models:/…, runs:/…) nor a folder with an MLmodel file")
    return ModelRef(str(path.resolve()), path.resolve().name)


def _alias_version(name: str, alias: str) -> str:
    from mlflow import MlflowClient

    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        raise EdgeError(f"alias {name}@{alias} points nowhere: {first_line(exc)}") from exc


def loader_modules() -> set[str]:
    """The pyfunc loader modules the server runs: the flavors of the registered backends."""
    return {get_backend(name).flavor for name in backend_names()}


def load_model(ref: ModelRef, workdir: Path) -> ServedModel:
    """Download ``ref`` into ``workdir`` (a local folder is used in place) and load it with its flavor's loader."""
    local, owned = Path(ref.uri), False
    if not local.is_dir():
        local, owned = Path(tempfile.mkdtemp(prefix="model-", dir=workdir)), True
    try:
        if owned:
            from mlflow.artifacts import download_artifacts

            local = Path(download_artifacts(artifact_uri=ref.uri, dst_path=str(local)))
        generator, info = _load_local(local)
    except Exception as exc:
        if owned:
            shutil.rmtree(local, ignore_errors=True)
        if isinstance(exc, EdgeError):
            raise
        raise EdgeError(f"cannot load {ref.uri}: {first_line(exc)}") from exc
    return ServedModel(ref, generator, info, local if owned else None)


def _load_local(folder: Path) -> tuple[TextGenerator, dict[str, str]]:
    model = Model.load(str(folder))
    conf = model.flavors.get(PYFUNC) or {}
    loader = conf.get("loader_module")
    if loader not in loader_modules():
        raise EdgeError(f"{folder} is not a model of an mlflow-edge flavor (its pyfunc loader is {loader!r}; "
                        f"served: {', '.join(sorted(loader_modules()))})")
    data = (folder / str(conf.get("data", ""))).resolve()
    if not data.is_relative_to(folder.resolve()) or not data.exists():
        raise EdgeError(f"the model data {conf.get('data')!r} is missing or outside {folder}")
    generator = importlib.import_module(loader).load_generator(str(data), conf.get("model_config"))
    if not isinstance(generator, TextGenerator):
        raise EdgeError(f"{loader} does not give a text generator")
    provenance = (model.metadata or {}).get(METADATA_KEY) or {}
    info = {key: str(provenance.get(key, "")) for key in ("backend", "format", "precision")}
    return generator, info


@dataclasses.dataclass
class Job:
    """One generation on a :class:`ServedModel`: its events (``("delta", text)``, ``("done", Completion)``,
    ``("error", exc)``) go to an asyncio queue of the requesting event loop."""

    ids: list[int]
    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    completion: Completion = dataclasses.field(default_factory=Completion)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop closed: the server is shutting down
            pass


class QueueFull(Exception):
    """The model's request queue is full."""


class ServedModel:
    """A loaded model, its provenance and the worker thread that runs its generations from a bounded queue."""

    def __init__(self, ref: ModelRef, generator: TextGenerator, info: dict[str, str], local: Path | None) -> None:
        self.ref = ref
        self.generator = generator
        self.info = info
        self._local = local
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name=f"generate-{ref.name}-{ref.version}", daemon=True)
        self._worker.start()

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return self._pending

    def submit(self, job: Job, limit: int) -> None:
        """Queue ``job``; :class:`QueueFull` when ``limit`` jobs are already queued or running."""
        with self._pending_lock:
            if self._pending >= limit:
                raise QueueFull(f"{self._pending} requests are queued or running (limit {limit})")
            self._pending += 1
        self._jobs.put(job)

    def retire(self) -> None:
        """Finish the queued jobs, then stop the worker and remove the downloaded files."""
        self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if not job.cancelled.is_set():
                    self._generate(job)
            finally:
                with self._pending_lock:
                    self._pending -= 1
        self.generator = None  # type: ignore[assignment]  # the runtime's memory goes with the last reference
        if self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)

    def _generate(self, job: Job) -> None:
        try:
            for delta in self.generator.stream(job.ids, job.request, job.completion, job.cancelled.is_set):
                job.emit("delta", delta)
        except Exception as exc:  # reported to the request; the worker and the model stay
            job.emit("error", exc)
        else:
            job.emit("done", job.completion)


class ModelHolder:
    """The model being served and, for an alias, the watch that switches to the version the alias moves to."""

    def __init__(self, spec: str, workdir: Path, interval_s: float = 30.0,
                 on_reload: Callable[[str, ServedModel | None, str | None], None] = lambda *_: None) -> None:
        self.spec = spec
        self.workdir = workdir
        self.interval_s = interval_s
        self.last_error: str | None = None
        self._on_reload = on_reload
        self._swap_lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self.current = load_model(resolve(spec), workdir)
        self._watch: threading.Thread | None = None

    def start_watch(self) -> None:
        if self.current.ref.follows_alias and self._watch is None:
            self._watch = threading.Thread(target=self._watch_loop, name="alias-watch", daemon=True)
            self._watch.start()

    def check_soon(self) -> None:
        """Check the alias now (SIGHUP), not at the next interval."""
        self._wake.set()

    def submit(self, job: Job, limit: int) -> ServedModel:
        """Queue ``job`` on the current model (never on one being retired); returns that model."""
        with self._swap_lock:
            model = self.current
            model.submit(job, limit)
            return model

    def check(self) -> bool:
        """Follow the alias: load the version it points to when that changed; ``True`` when the model switched."""
        if not self.current.ref.follows_alias:
            return False
        with self._check_lock:
            current = self.current.ref
            try:
                ref = resolve(f"models:/{current.name}@{current.alias}")
                if ref.version == current.version:
                    return False
                loaded = load_model(ref, self.workdir)
            except Exception as exc:
                self.last_error = first_line(exc)
                self._on_reload("failed", None, self.last_error)
                return False
            with self._swap_lock:
                old, self.current = self.current, loaded
                old.retire()
            self.last_error = None
            self._on_reload("switched", loaded, None)
            return True

    def close(self) -> None:
        self._stopped.set()
        self._wake.set()
        with self._swap_lock:
            self.current.retire()

    def _watch_loop(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if not self._stopped.is_set():
                self.check()
