"""Child processes get a time limit, their own process group, and die with their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mlflow_edge import procs
from mlflow_edge.errors import EdgeError


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for_file(path: Path, seconds: float = 30.0) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} was never written")


def wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.05)
    return not alive(pid)


def test_a_child_and_its_own_child_are_killed_at_the_limit(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = textwrap.dedent(f"""
        import subprocess, time
        sleeper = subprocess.Popen(["sleep", "60"])
        open({str(pid_file)!r}, "w").write(str(sleeper.pid))
        time.sleep(60)
    """)
    start = time.monotonic()
    with pytest.raises(EdgeError) as info:
        procs.run([sys.executable, "-c", script], timeout=3, capture_output=True, text=True)
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert "\n" not in message and "did not finish within 3 s" in message and procs.TIMEOUT_ENV in message
    assert wait_gone(int(wait_for_file(pid_file)))


def test_killing_the_parent_kills_the_child(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    parent_script = textwrap.dedent(f"""
        from mlflow_edge import procs
        procs.run(["sh", "-c", "echo $$ > {pid_file}; exec sleep 300"], timeout=600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_script])
    try:
        child = int(wait_for_file(pid_file))
        assert alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        assert wait_gone(child), f"child {child} outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_an_interrupted_caller_kills_the_child_group(tmp_path: Path) -> None:
    """Ctrl-C reaches only the caller (the child has its own group): the caller kills the group on the way out."""
    pid_file = tmp_path / "child.pid"
    parent_script = textwrap.dedent(f"""
        import sys
        from mlflow_edge import procs
        try:
            procs.run(["sh", "-c", "echo $$ > {pid_file}; exec sleep 300"], timeout=600)
        except KeyboardInterrupt:
            sys.exit(42)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_script])
    try:
        child = int(wait_for_file(pid_file))
        os.kill(parent.pid, signal.SIGINT)
        assert parent.wait(timeout=45) == 42  # far short of the child's 300 s: the caller did not wait for it
        assert not alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_killed_child_is_reaped_even_when_popens_wait_lock_is_left_held() -> None:
    """CPython's timed ``Popen.wait`` takes its lock before the ``try`` that releases it: a Ctrl-C landing in that gap
    (about 1 in 600 interrupts here) leaves the lock held, and a plain ``wait()`` afterwards never returns."""
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    assert child._waitpid_lock.acquire(False)  # the state that race leaves behind
    start = time.monotonic()
    procs._kill_group(child)
    assert time.monotonic() - start < 20
    assert child.returncode == -signal.SIGKILL and not alive(child.pid)


def test_a_finished_child_returns_like_subprocess_run() -> None:
    done = procs.run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                     capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    assert procs.run(["cat"], input="piped", capture_output=True, text=True).stdout == "piped"


def test_the_limit_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(procs.TIMEOUT_ENV, "1.5")
    with pytest.raises(EdgeError, match=r"^sleep did not finish within 1.5 s"):
        procs.run(["sleep", "30"])
    monkeypatch.setenv(procs.TIMEOUT_ENV, "0")
    assert procs.child_timeout() is None
    monkeypatch.setenv(procs.TIMEOUT_ENV, "soon")
    with pytest.raises(EdgeError, match=f"^{procs.TIMEOUT_ENV} must be a number of seconds"):
        procs.run(["true"])
    monkeypatch.delenv(procs.TIMEOUT_ENV)
    assert procs.child_timeout() == procs.DEFAULT_TIMEOUT_S


def test_tool_names() -> None:
    worker = "mlflow_edge.evaluation.worker"
    assert procs.tool_name([sys.executable, "-m", worker, "spec.json"]) == worker
    assert procs.tool_name([sys.executable, "/x/convert_hf_to_gguf.py", "in"]) == "convert_hf_to_gguf.py"
    assert procs.tool_name(["/usr/bin/sleep", "1"]) == "sleep"


def test_the_evaluation_worker_is_held_to_the_limit(tiny_source, tiny_settings, monkeypatch, tmp_path) -> None:
    from mlflow_edge.evaluation.harness import Evaluator

    monkeypatch.setenv("MLFLOW_EDGE_CACHE", str(tmp_path / "cache"))  # no earlier measurement to take instead
    evaluator = Evaluator(tiny_source, tiny_settings, workdir=tmp_path / "eval")
    monkeypatch.setenv(procs.TIMEOUT_ENV, "0.5")
    with pytest.raises(EdgeError, match=r"^mlflow_edge\.evaluation\.worker did not finish within 0\.5 s"):
        evaluator.evaluate_reference()


def test_the_llama_cpp_converter_is_held_to_the_limit(tiny_source, monkeypatch, tmp_path) -> None:
    from mlflow_edge.backends.llamacpp import LlamaCppBackend, converter_dir

    converter_dir()  # fetched and unpacked before the limit applies
    monkeypatch.setenv(procs.TIMEOUT_ENV, "0.5")
    with pytest.raises(EdgeError, match=r"^convert_hf_to_gguf\.py did not finish within 0\.5 s"):
        LlamaCppBackend().convert(tiny_source, tmp_path / "out", "f16")
