"""A server under test: a real process on a free loopback port, in its own session, with its output in a log file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence

import pytest

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class ServerProcess:
    """``command(port)`` started on a free loopback port; ready when ``GET <ready_path>`` answers 200."""

    ready_path = "/health"

    def __init__(self, command: Sequence[str], log_file: Path, env: Mapping[str, str], cwd: Path | None = None,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.base = f"http://{LOOPBACK}:{self.port}"
        self.log_file = log_file
        self._log = open(log_file, "w")
        self.process = subprocess.Popen(list(command), env=dict(env), cwd=cwd, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 180) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base}{self.ready_path}", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready in {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.3)

    def log_tail(self) -> str:
        return self.log_file.read_text()[-3000:]

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)
        finally:
            self._log.close()
