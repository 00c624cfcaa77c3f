"""What an Azure ML job of mlflow-edge runs on: a base image, a conda file generated from the installed
distribution's own requirements, and the source checkout uploaded as the job's code.

The requirements are the distribution's base ones plus the extras named after the backends the chosen targets
recommend (``mlflow-edge[<backend>,…]``), so a job installs what ``pip install -e '.[<backends>]'`` would here, and
nothing in this module names a backend.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mlflow_edge.errors import EdgeError
from mlflow_edge.targets import recommended_backends

DISTRIBUTION = "mlflow-edge"
DEFAULT_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04"
"""Azure ML's usual CPU base image (Ubuntu 22.04 with conda)."""

INSTALL_SOURCE = "pip install --no-deps ."
"""Installs the uploaded checkout into the job's environment (its requirements are there already), so its console
script and its entry points (the backends) exist in the job."""


def extras_for(targets: Iterable[str], backends: Iterable[str] = (), requested: Iterable[str] = ()) -> tuple[str, ...]:
    """The distribution's ``requested`` extras (each must exist), then those named after ``backends`` and the backends
    each target recommends (when it offers them), in that order."""
    offered = importlib.metadata.metadata(DISTRIBUTION).get_all("Provides-Extra") or []
    requested = [name.strip() for name in requested if name.strip()]
    unknown = [name for name in requested if name not in offered]
    if unknown:
        raise EdgeError(f"{DISTRIBUTION} has no extra {', '.join(unknown)} (it offers {', '.join(offered)})")
    wanted = [*backends, *(name for target in targets for name in recommended_backends(target))]
    return tuple(dict.fromkeys([*requested, *(name for name in wanted if name in offered)]))


def requirements(extras: Sequence[str]) -> list[str]:
    """The distribution's base requirements and those of ``extras``, one line per package.

    Environment markers are decided here (the job gets this Python's version); two requirements of one package
    (``torch>=2.13`` and ``torch==2.14.1``) become one line with both specifiers.
    """
    merged: dict[str, Requirement] = {}
    for line in importlib.metadata.requires(DISTRIBUTION) or ():
        req = Requirement(line)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (*extras, "")):
            continue
        req.marker = None
        kept = merged.setdefault(canonicalize_name(req.name), req)
        if kept is not req:
            kept.specifier &= req.specifier
            kept.extras |= req.extras
    return [str(req) for req in merged.values()]


def conda_file(extras: Sequence[str]) -> dict[str, Any]:
    """A conda specification with this Python's version, pip, and :func:`requirements` of ``extras``."""
    python = f"python={sys.version_info.major}.{sys.version_info.minor}"
    return {"name": DISTRIBUTION, "channels": ["conda-forge"],
            "dependencies": [python, "pip", {"pip": requirements(extras)}]}


def job_environment(extras: Sequence[str], image: str = DEFAULT_IMAGE):
    """An anonymous Azure ML environment: ``image`` with the conda file of ``extras`` (built once per content)."""
    from azure.ai.ml.entities import Environment

    if not image.strip():
        raise EdgeError("the Azure ML base image is empty (e.g. --image " + DEFAULT_IMAGE + ")")
    return Environment(image=image, conda_file=conda_file(extras),
                       description=f"{DISTRIBUTION}[{','.join(extras)}] on {image}")


def source_checkout() -> Path:
    """The mlflow-edge source checkout this package runs from: the code a job uploads and installs."""
    import mlflow_edge

    root = Path(mlflow_edge.__file__).resolve().parents[2]
    if not is_installable(root):
        raise EdgeError(f"Azure ML jobs upload the mlflow-edge source checkout, but {root} is not one: "
                        "install mlflow-edge from a checkout (pip install -e .)")
    return root


def is_installable(folder: Path) -> bool:
    """Whether pip can install ``folder`` (it has a ``pyproject.toml``, ``setup.cfg`` or ``setup.py``)."""
    return any((folder / name).is_file() for name in ("pyproject.toml", "setup.cfg", "setup.py"))
