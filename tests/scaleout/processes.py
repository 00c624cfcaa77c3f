"""The scale-out tests' processes: `mlflow-edge` commands in their own sessions (so a test can kill one's group)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

FAST = ["--window", "64", "--windows", "2", "--repeats", "2", "--threads", "1"]
"""Evaluation settings that keep a trial on the tiny model to seconds."""


def cli(*args: str) -> list[str]:
    """The command line running ``mlflow-edge args…`` with this interpreter."""
    return [sys.executable, "-c", "from mlflow_edge.cli import main; main()", *args]


def start(args: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """``mlflow-edge args…`` in the background, its output in ``log``."""
    return subprocess.Popen(cli(*args), env=env, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_text(log: Path, text: str, process: subprocess.Popen, limit_s: float = 300) -> None:
    """Return once ``text`` is in ``log``; fail with the log's tail if ``process`` ends or ``limit_s`` passes first."""
    deadline = time.monotonic() + limit_s
    while text not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
