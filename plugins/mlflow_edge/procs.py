"""Child processes that cannot outlive mlflow-edge or run forever.

Every child mlflow-edge starts (converters, quantizers, the evaluation worker, pip) goes through :func:`run`: it runs
in its own process group with a time limit (``$MLFLOW_EDGE_CHILD_TIMEOUT`` seconds, default 14400; 0 turns it off),
the whole group is killed when the limit passes or the caller is interrupted, and on Linux the kernel kills the child
when its parent dies (``PR_SET_PDEATHSIG``), even by ``SIGKILL``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from mlflow_edge.errors import EdgeError

TIMEOUT_ENV = "MLFLOW_EDGE_CHILD_TIMEOUT"
DEFAULT_TIMEOUT_S = 4 * 3600.0
_REAP_TIMEOUT_S = 5.0  # a SIGKILLed child is gone well within this; past it, its Popen is not waited on
_PR_SET_PDEATHSIG = 1


def child_timeout() -> float | None:
    """``$MLFLOW_EDGE_CHILD_TIMEOUT`` in seconds (default 4 hours); None when it is 0 (no limit)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise EdgeError(f"{TIMEOUT_ENV} must be a number of seconds (0: no limit), got {text!r}")
    return seconds or None


def tool_name(cmd: Sequence[str]) -> str:
    """What ``cmd`` runs, for messages: the module of ``python -m``, the script of ``python script``, else the
    program."""
    args = [str(a) for a in cmd]
    if len(args) > 2 and Path(args[0]).name.startswith("python") and args[1] == "-m":
        return args[2]
    if len(args) > 1 and Path(args[0]).name.startswith("python") and not args[1].startswith("-"):
        return Path(args[1]).name
    return Path(args[0]).name if args else "child process"


def run(cmd: Sequence[str], *, timeout: float | None = None, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, **kwargs)`` in a new process group that dies with this process, limited to ``timeout``
    seconds (default :func:`child_timeout`). Passing the limit is an :class:`EdgeError` naming the tool and the limit.

    The parent-death signal is tied to the calling thread: call this from a thread that outlives the child.
    """
    limit = child_timeout() if timeout is None else timeout
    stdin = kwargs.pop("input", None)
    if stdin is not None:
        kwargs["stdin"] = subprocess.PIPE
    if kwargs.pop("capture_output", False):
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent(), **kwargs) as proc:
        try:
            out, err = proc.communicate(stdin, timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise EdgeError(f"{tool_name(cmd)} did not finish within {limit:g} s "
                            f"(the limit is set by {TIMEOUT_ENV})") from None
        except BaseException:  # KeyboardInterrupt: the child is in its own group and got no SIGINT
            _kill_group(proc)
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (its own children too), then reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.kill()
    try:
        proc.communicate(timeout=_REAP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _reap(proc)


def _reap(proc: subprocess.Popen) -> None:
    """Reap a killed child without Popen's wait lock. An interrupt landing just after Popen's timed wait loop took
    that lock (before its ``try``) leaves it held for good, and every later ``wait()`` on that Popen would block."""
    try:
        _, status = os.waitpid(proc.pid, 0)
    except ChildProcessError:  # reaped meanwhile
        return
    proc.returncode = os.waitstatus_to_exitcode(status)


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGKILL the child when this process dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = _prctl(), os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


@functools.lru_cache(maxsize=1)
def _prctl() -> Callable[..., int]:
    """libc's ``prctl``, looked up once in this process (never in the forked child)."""
    return ctypes.CDLL(None, use_errno=True).prctl


def last_error_line(stderr: str) -> str:
    """The line of a tool's ``stderr`` that says what went wrong (the last naming an error), cut short."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if any(word in line.lower() for word in ("error", "exception", "failed", "requires", "invalid", "hash")):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


# -- which process owns a thing -------------------------------------------------------------------------------------
def process_id(pid: int | None = None) -> str:
    """``<pid>-<start time>`` of ``pid`` (default: this process); the start time tells a reused pid apart. Just
    ``<pid>`` where /proc is absent."""
    pid = os.getpid() if pid is None else pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{pid}-{stat.rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return str(pid)


def process_alive(owner: str) -> bool:
    """Whether the process named by ``owner`` (a :func:`process_id` of this machine) still runs."""
    pid = owner.split("-", 1)[0]
    if not pid.isdigit():
        return False
    if "-" in owner:
        return process_id(int(pid)) == owner
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_tag() -> str:
    """``<host>:<process id>``: who runs a run or a trial, so another process can tell a dead owner on this host."""
    return f"{socket.gethostname()}:{process_id()}"


def owner_gone(owner: str | None) -> bool:
    """True only when ``owner`` (an :func:`owner_tag`) is a process of this host that no longer runs; a process on
    another host, or no owner, is never declared gone."""
    host, _, process = (owner or "").rpartition(":")
    return bool(process) and host == socket.gethostname() and not process_alive(process)
