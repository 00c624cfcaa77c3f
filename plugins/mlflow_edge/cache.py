"""A content-addressed cache of conversions, so nothing is converted twice.

Each entry is a folder named by the hash of the inputs that determine it (source hash, backend, precision, options,
framework version). It is built in a temporary folder beside it and renamed into place only when the build succeeded,
under a file lock, so a crash or a concurrent process never leaves a half-written entry behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from mlflow_edge.errors import EdgeError, first_line


def cache_root() -> Path:
    """``$MLFLOW_EDGE_CACHE``, else ``~/.cache/mlflow-edge``."""
    root = os.environ.get("MLFLOW_EDGE_CACHE") or Path.home() / ".cache" / "mlflow-edge"
    return Path(root)


def key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def subfolder(*parts: str) -> Path:
    """The cache folder ``<root>/<parts…>``, created if needed."""
    return _usable(cache_root().joinpath(*parts))


def _usable(base: Path) -> Path:
    """``base`` created if needed; an unusable cache folder is a one-line error naming ``$MLFLOW_EDGE_CACHE``."""
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgeError(f"cache folder {base} cannot be created ({exc.strerror or first_line(exc)}); "
                        "set MLFLOW_EDGE_CACHE to a writable folder") from None
    return base


def get_or_build(kind: str, key: Mapping[str, Any], build: Callable[[Path], None], root: Path | None = None) -> Path:
    """Return the cache folder for ``(kind, key)``, calling ``build(tmp_folder)`` first if it does not exist yet."""
    base = (root or cache_root()) / kind
    final = base / key_digest(key)
    if (final / ".complete").exists():
        return final
    with _locked(_usable(base) / (final.name + ".lock")):
        if (final / ".complete").exists():
            return final
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", suffix=".tmp", dir=base))
        try:
            build(tmp)
            (tmp / "key.json").write_text(json.dumps(key, sort_keys=True, indent=1, default=str))
            (tmp / ".complete").touch()
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final
