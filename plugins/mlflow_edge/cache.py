"""A content-addressed cache of conversions, so nothing is converted twice.

Each entry is a folder named by the hash of the inputs that determine it (source hash, backend, precision, options,
framework version). It is built in a temporary folder beside it and renamed into place only when the build succeeded,
under a file lock, so a crash or a concurrent process never leaves a half-written entry behind. The entry's last file,
``.complete``, is its manifest: the size and sha256 of every file it holds. An entry whose files no longer match
(truncated, altered, missing) is rebuilt with a one-line warning; sizes are checked on every use and the full hashes
once per process. A temporary build folder whose owner process is gone (killed mid-build) is removed on the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from mlflow_edge import procs
from mlflow_edge.errors import EdgeError, first_line

MANIFEST = ".complete"
"""The entry's completion marker and manifest (``{"files": {relative path: {"size", "sha256"}}, "links": …}``)."""

_hashed: dict[Path, tuple[int, int]] = {}  # entry → (inode, mtime) of the manifest whose hashes this process checked
_swept: set[Path] = set()  # kind folders whose stale build folders this process removed


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
def file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_path`` (created with its folder) around the ``with`` body: other processes wait."""
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


def inside(folder: Path, relative: str | os.PathLike, what: str) -> Path:
    """``folder / relative`` for a path read from a record (``artifact.json``, an MLmodel file); a path that is
    absolute, climbs out with ``..`` or leads out through a symlink is a one-line error naming ``what``."""
    if not isinstance(relative, (str, os.PathLike)):
        raise EdgeError(f"{what} names no path where one is expected: {relative!r}")
    text = os.fspath(relative)
    if not text or Path(text).is_absolute() or ".." in Path(text).parts:
        raise EdgeError(f"{what} names a path outside its folder: {text!r}")
    path = Path(folder) / text
    if not path.resolve().is_relative_to(Path(folder).resolve()):
        raise EdgeError(f"{what} names a path that leads out of its folder through a symlink: {text!r}")
    return path


def get_or_build(kind: str, key: Mapping[str, Any], build: Callable[[Path], None], root: Path | None = None) -> Path:
    """Return the cache folder for ``(kind, key)``, calling ``build(tmp_folder)`` first if it does not exist yet or
    its files no longer match its manifest."""
    base = (root or cache_root()) / kind
    final = base / key_digest(key)
    _remove_stale_builds(base)
    if _damage(final) is None:
        return final
    with file_lock(_usable(base) / (final.name + ".lock")):
        damage = _damage(final)
        if damage is None:
            return final
        if damage == "legacy":  # built before entries had manifests: record what it holds now
            _write_manifest(final)
            return final
        if damage != "absent":
            print(f"mlflow-edge: warning: cache entry {kind}/{final.name} is damaged ({damage}); rebuilding it",
                  file=sys.stderr, flush=True)
        _build(final, key, build)
    return final


def find(kind: str, key: Mapping[str, Any], root: Path | None = None) -> Path | None:
    """The complete, undamaged cache folder for ``(kind, key)`` when one was built, else ``None`` (nothing is
    built): for what is worth using only when it is already there."""
    final = (root or cache_root()) / kind / key_digest(key)
    return final if _damage(final) is None else None


def _build(final: Path, key: Mapping[str, Any], build: Callable[[Path], None]) -> None:
    """Build into a temporary folder owned by this process, write its manifest last, and rename it into place."""
    tmp = _build_folder(final)
    try:
        build(tmp)
        (tmp / "key.json").write_text(json.dumps(key, sort_keys=True, indent=1, default=str))
        _write_manifest(tmp)
        if final.exists() or final.is_symlink():
            old = _build_folder(final)
            os.replace(final, old / "old")
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
        _remember_hashed(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# -- the manifest --------------------------------------------------------------------------------------------------
def _write_manifest(folder: Path) -> None:
    """Record every file's size and sha256 (and every symlink's target) in ``folder/.complete``, atomically."""
    files, links = {}, {}
    for path, relative in _entry_files(folder):
        if path.is_symlink():
            links[relative] = os.readlink(path)
        else:
            files[relative] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    partial = folder / (MANIFEST + ".partial")
    partial.write_text(json.dumps({"version": 1, "files": files, "links": links}, sort_keys=True))
    os.replace(partial, folder / MANIFEST)
    _remember_hashed(folder)


def _entry_files(folder: Path) -> Iterator[tuple[Path, str]]:
    """Every file and symlink under ``folder`` but the manifest, with its path relative to ``folder``."""
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        names = filenames + [d for d in dirnames if (here / d).is_symlink()]
        for name in sorted(names):
            relative = (here / name).relative_to(folder).as_posix()
            if relative not in (MANIFEST, MANIFEST + ".partial"):
                yield here / name, relative


def _damage(folder: Path) -> str | None:
    """Why ``folder`` cannot be trusted as is (``absent``, ``legacy``, or what does not match), else None."""
    try:
        text = (folder / MANIFEST).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return "absent"
    if not text.strip():
        return "legacy"
    try:
        manifest = json.loads(text)
        return _mismatch(folder, manifest["files"], manifest["links"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return "its manifest is unreadable"
    except OSError as exc:
        return f"unreadable: {first_line(exc)}"


def _mismatch(folder: Path, files: Mapping[str, Any], links: Mapping[str, str]) -> str | None:
    """The first file or link that differs from the manifest: sizes always, hashes once per process per entry."""
    hash_too = _hashed.get(folder) != _identity(folder / MANIFEST)
    for relative, target in links.items():
        if not (folder / relative).is_symlink() or os.readlink(folder / relative) != target:
            return f"{relative}: the link changed"
    for relative, expected in files.items():
        path = folder / relative
        if not path.is_file() or path.is_symlink():
            return f"{relative} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{relative}: {path.stat().st_size} bytes, recorded {expected['size']}"
        if hash_too and sha256_file(path) != expected["sha256"]:
            return f"{relative}: sha256 differs from the recorded one"
    if hash_too:
        _remember_hashed(folder)
    return None


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def _remember_hashed(folder: Path) -> None:
    _hashed[folder] = _identity(folder / MANIFEST)


# -- temporary build folders ---------------------------------------------------------------------------------------
def _build_folder(final: Path) -> Path:
    """A new temporary folder beside ``final``, named by its owner process: ``<digest>.<pid>-<start>.<random>.tmp``."""
    return Path(tempfile.mkdtemp(prefix=f"{final.name}.{procs.process_id()}.", suffix=".tmp", dir=final.parent))


def _remove_stale_builds(base: Path) -> None:
    """Once per process and kind folder: remove build folders whose owner process is gone and whose entry nobody is
    building (its lock is free)."""
    if base in _swept or not base.is_dir():
        return
    _swept.add(base)
    for tmp in base.glob("*.tmp"):
        parts = tmp.name.split(".")
        owner = parts[1] if len(parts) == 4 else ""  # legacy folders (<digest>.<random>.tmp) have no owner
        if tmp.is_dir() and not tmp.is_symlink() and not procs.process_alive(owner):
            with _lock_if_free(base / f"{parts[0]}.lock") as free:
                if free:
                    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _lock_if_free(lock_path: Path) -> Iterator[bool]:
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
