"""Helpers the backends' recipe tests share: a hand-written recipe file, and the one-line error check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


def one_line(exc: pytest.ExceptionInfo) -> str:
    """The message of a raised error, checked to be one non-empty line."""
    message = str(exc.value)
    assert message and "\n" not in message, message
    return message


def write_recipe(path: Path, rules: list[tuple[str, str]], **fields: Any) -> Path:
    """A recipe file for a llama architecture: ``rules`` as (pattern, type); ``fields`` (``backend``,
    ``default_type`` …) add or replace keys."""
    data = {"mlflow_edge_recipe": 1, "architecture": "llama",
            "tensor_types": [{"pattern": pattern, "type": kind} for pattern, kind in rules], **fields}
    path.write_text(json.dumps(data, indent=1))
    return path
