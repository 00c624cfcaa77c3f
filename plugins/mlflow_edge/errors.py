"""The one user-facing error. Imported by every module; imports nothing of mlflow-edge."""

from __future__ import annotations


class EdgeError(Exception):
    """A user-facing error: the message is one line that names the problem (printed as ``mlflow-edge: error: …``)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message (its class name when it has none), at most ``limit`` characters."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
