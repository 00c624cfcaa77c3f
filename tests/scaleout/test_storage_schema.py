"""Workers started at the same moment on a new PostgreSQL database all open it (Optuna creates its tables on first
use, and concurrent creations collide on PostgreSQL's catalog)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROCESSES = 6


def test_processes_opening_a_new_database_at_once_all_get_the_storage(postgres, tmp_path: Path) -> None:
    url = postgres.database("optuna_schema_race")
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from mlflow_edge.search.storage import open_storage
        while not Path({str(go)!r}).exists():
            time.sleep(0.001)
        open_storage({url!r})
        print("opened")
    """)
    workers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(PROCESSES)]
    time.sleep(8)  # every process has imported optuna and waits for the same instant
    go.touch()
    results = [worker.communicate(timeout=120) for worker in workers]
    failures = [err.strip().splitlines()[-1] for out, err in results if "opened" not in out]
    assert not failures, failures
