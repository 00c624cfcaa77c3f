"""``mlflow-edge serve``: the champion (or any mlflow-edge model) behind an OpenAI-compatible HTTP server, with
Prometheus metrics and an alias it follows; ``mlflow-edge monitor`` logs what a running server does back into MLflow.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from mlflow_edge.errors import EdgeError
from mlflow_edge.serving.app import Limits, create_app, on_reload
from mlflow_edge.serving.metrics import ServerMetrics
from mlflow_edge.serving.models import ModelHolder

__all__ = ["Limits", "check_listen", "create_app", "serve"]


def check_listen(host: str, port: int) -> None:
    """Refuse, before a model loads, an address this process cannot listen on (busy port, unknown host)."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a listener still refuses
            probe.bind(address)
    except (OSError, OverflowError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise EdgeError(f"cannot listen on {host}:{port}: {reason[:1].lower()}{reason[1:]}") from None


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 8080, limits: Limits | None = None,
          poll_interval_s: float = 30.0) -> None:
    """Load ``model_uri`` and answer on ``host:port`` until interrupted (SIGINT/SIGTERM); SIGHUP checks the alias."""
    import uvicorn
    from prometheus_client import disable_created_metrics

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per event in the server's log
    # Generations run on one long-lived worker thread: OpenMP runtimes (llama.cpp's among them) would keep its thread
    # pool spinning between tokens and requests, doubling the CPU per token; set before any runtime loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    disable_created_metrics()  # no *_created samples: the counters' start times add nothing here
    check_listen(host, port)
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-edge-serve-"))
    try:
        metrics = ServerMetrics()
        holder = ModelHolder(model_uri, workdir, poll_interval_s, on_reload=on_reload(metrics))
        model = holder.current
        print(f"mlflow-edge: serving {model.ref.name}" + (f" version {model.ref.version}" if model.ref.version else "")
              + (f" (following @{model.ref.alias})" if model.ref.alias else "")
              + f" on http://{host}:{port}/v1", flush=True)
        app = create_app(holder, limits or Limits(), metrics)
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
