"""What this backend needs of mlx-lm: the guard that imports it, the distributions its artifacts run on, and the
wrapper that keeps mlx-lm's output and exceptions to one line."""

from __future__ import annotations

import contextlib
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Iterator

from mlflow_edge.backends.base import require
from mlflow_edge.errors import EdgeError, first_line

NAME = "mlx"
"""The backend's entry-point name (its params are ``mlx.<option>``; recipes name it)."""
_RUNTIME_DISTRIBUTIONS = ("mlx-cpu", "mlx-cuda-13", "mlx-cuda-12", "mlx-metal")  # where libmlx comes from


def require_mlx_lm():
    """The ``mlx_lm`` module (and MLX under it), or a one-line error naming the extra to install."""
    require("mlx.core", "mlx-lm", "mlx")
    return require("mlx_lm", "mlx-lm", "mlx")


def runtime_distributions() -> tuple[str, ...]:
    """pip distributions an MLX artifact needs at run time: ``mlx``, ``mlx-lm`` and the installed MLX backend
    library (``mlx-cpu`` on Linux CPUs, ``mlx-metal`` on macOS), which ``mlx`` alone does not pull in on Linux."""
    found = []
    for name in _RUNTIME_DISTRIBUTIONS:
        try:
            version(name)
        except PackageNotFoundError:
            continue
        found.append(name)
        break
    return ("mlx", "mlx-lm", *found)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """mlx-lm prints progress to stdout; keep stdout for the CLI's own output."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def mlx_call(what: str, call: Callable[[], Any]) -> Any:
    """``call()``, any framework exception as a one-line :class:`EdgeError` saying ``what`` failed."""
    try:
        with _quiet():
            return call()
    except EdgeError:
        raise
    except Exception as exc:  # mlx-lm and mlx raise ValueError, RuntimeError, KeyError, FileNotFoundError, ...
        raise EdgeError(f"mlx-lm cannot {what}: {first_line(exc)}") from exc
