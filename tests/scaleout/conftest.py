"""A real PostgreSQL cluster (Debian's server binaries, installed by scripts/install-postgres.sh) and a real
`mlflow server` on it, both on loopback, for the scale-out tests."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.server_process import LOOPBACK, ServerProcess, free_port


def _postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [p for p in [shutil.which(name)] if p]
    if not found:
        pytest.fail("PostgreSQL is not installed: scripts/setup.sh installs it (scripts/install-postgres.sh)")
    return found[-1]


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run ``command`` as the Debian package's ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class Postgres:
    """A throwaway cluster in ``folder``: trust authentication on 127.0.0.1 only, one database per use."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.data, self.sockets = folder / "data", folder / "sockets"
        for path in (folder, self.sockets):
            path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres")
            shutil.chown(self.sockets, "postgres")
        self._run([_postgres_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        self._run([_postgres_bin("pg_ctl"), "-D", str(self.data), "-l", str(folder / "server.log"), "-w", "-o",
                   f"-p {self.port} -k {self.sockets} -c listen_addresses={LOOPBACK} -c max_connections=300", "start"])

    def _run(self, command: list[str]) -> None:
        done = subprocess.run(_as_postgres(command), capture_output=True, text=True, cwd=self.folder)
        if done.returncode != 0:
            pytest.fail(f"{Path(command[0]).name} failed: {done.stderr.strip() or done.stdout.strip()}")

    def database(self, name: str) -> str:
        """A new database ``name``; its SQLAlchemy URL (psycopg2)."""
        self._run([_postgres_bin("createdb"), "-h", LOOPBACK, "-p", str(self.port), "-U", "postgres", name])
        return f"postgresql+psycopg2://postgres@{LOOPBACK}:{self.port}/{name}"

    def stop(self) -> None:
        self._run([_postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    # not under pytest's tmp_path: its folders are private to root, and the server runs as postgres
    folder = Path(tempfile.mkdtemp(prefix="mlflow-edge-postgres-"))
    folder.chmod(0o755)
    cluster = Postgres(folder / "cluster")
    yield cluster
    cluster.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tracking_server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` with a PostgreSQL backend store and a local artifact root, on loopback: one for the session
    (a start costs seconds), so each module searches in an experiment and under registered model names of its own."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    store = postgres.database(f"mlflow_{folder.name.replace('-', '_')}")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
               "--artifacts-destination", str(folder / "artifacts"), "--host", LOOPBACK, "--port", str(port),
               "--workers", "1"]
    server = ServerProcess(command, folder / "server.log", os.environ, cwd=folder, port=port).wait_ready()
    yield server.base
    server.stop()
