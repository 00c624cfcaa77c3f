"""The one user-facing error. Imported by every module; imports nothing of mlflow-edge."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable


class EdgeError(Exception):
    """A user-facing error: the message is one line that names the problem (printed as ``mlflow-edge: error: …``)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message (its class name when it has none), at most ``limit`` characters."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def one_line_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """A command whose :class:`EdgeError` prints ``mlflow-edge: error: <message>`` on stderr and exits 1."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EdgeError as exc:
            print(f"mlflow-edge: error: {exc}", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapper
