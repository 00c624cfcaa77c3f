"""A content-addressed cache of conversions, so nothing is converted twice.

Each entry is a folder named by the hash of the inputs that determine it (source hash, backend, precision, options,
framework version). It is built in a temporary folder beside it and renamed into place only when the build succeeded,
under a file lock, so a crash or a concurrent process never leaves a half-written entry behind. The entry's last file,
``.complete``, is its manifest: the size and sha256 of every file it holds. An entry whose files no longer match
(truncated, altered, missing) is rebuilt with a one-line warning; sizes are checked on every use and the full hashes
once per process. A temporary build folder whose owner process is gone (killed mid-build) is removed on the next run.
A build that fails on a full disk is one line naming the entry, the space left and the way out; its folder goes too.
Disk is a budget: with ``$MLFLOW_EDGE_CACHE_MAX_GB`` set, each build is followed by the eviction of the least recently
used entries until the cache fits, sparing those a live process uses (its lease, ``.users/<owner tag>``), those being
built (their lock is held) and the one just built.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from stat import S_ISLNK
from typing import Any, Callable, Iterator, Mapping

from mlflow_edge import procs
from mlflow_edge.errors import EdgeError, first_line

MANIFEST = ".complete"
"""The entry's completion marker and manifest (``{"files": {relative path: {"size", "sha256"}}, "links": …}``)."""

LOW_SPACE = 64 << 20
"""A build that fails with less than this free on the cache's file system failed on a full disk."""

MAX_GB_ENV = "MLFLOW_EDGE_CACHE_MAX_GB"
"""The cache's size limit in GB (10^9 bytes); unset: no limit."""

USED = ".used"
"""Touched each time ``get_or_build`` or ``find`` returns the entry: its mtime is the entry's last use."""

USERS = ".users"
"""The entry's leases: one empty file per process that was handed the entry, named by its owner tag, removed at
exit; a lease whose process is gone from this host protects nothing."""

_BOOKKEEPING = frozenset({MANIFEST, MANIFEST + ".partial", USED})  # files of an entry that are not its content

_hashed: dict[Path, tuple[int, int]] = {}  # entry → (inode, mtime) of the manifest whose hashes this process checked
_swept: set[Path] = set()  # kind folders whose stale build folders this process removed
_leases: set[Path] = set()  # lease files this process wrote, removed at exit
_nesting = threading.local()  # .depth: builds running in this thread (a build may build its inputs)


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
    its files no longer match its manifest. The entry is leased to this process until it exits; after a build
    (not one nested in another build), the cache is held to :func:`size_limit`."""
    limit = size_limit()  # a bad value is refused before any work
    base = (root or cache_root()) / kind
    final = base / key_digest(key)
    _remove_stale_builds(base)
    _record_use(final)  # before the check: an eviction racing this use sees the lease, or leaves no entry to trust
    if _damage(final) is None:
        return final
    with file_lock(_usable(base) / (final.name + ".lock")):
        built = _build_unless_sound(final, key, build)
        _record_use(final)
    if built and limit is not None and not getattr(_nesting, "depth", 0):
        _enforce_limit(final, limit)
    return final


def _build_unless_sound(final: Path, key: Mapping[str, Any], build: Callable[[Path], None]) -> bool:
    """Under the entry's lock: build ``final`` when it is absent or damaged (saying so when damaged); True if built."""
    damage = _damage(final)
    if damage is None:
        return False
    if damage == "legacy":  # built before entries had manifests: record what it holds now
        _write_manifest(final)
        return False
    if damage != "absent":
        print(f"mlflow-edge: warning: cache entry {final.parent.name}/{final.name} is damaged ({damage}); "
              "rebuilding it", file=sys.stderr, flush=True)
    _build(final, key, build)
    return True


def find(kind: str, key: Mapping[str, Any], root: Path | None = None) -> Path | None:
    """The complete, undamaged cache folder for ``(kind, key)`` when one was built, else ``None`` (nothing is
    built): for what is worth using only when it is already there."""
    final = (root or cache_root()) / kind / key_digest(key)
    _record_use(final)
    return final if _damage(final) is None else None


def _build(final: Path, key: Mapping[str, Any], build: Callable[[Path], None]) -> None:
    """Build into a temporary folder owned by this process, write its manifest last, and rename it into place."""
    tmp = _build_folder(final)
    _nesting.depth = getattr(_nesting, "depth", 0) + 1
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
    except Exception as exc:
        full = None if isinstance(exc, _DiskFull) else _full_disk(final, exc)  # before the build folder goes
        if full is None:
            raise
        raise full from exc
    finally:
        _nesting.depth -= 1
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class _DiskFull(EdgeError):
    """A build that failed on a full disk: said once, not again by the builds around it."""


def _full_disk(final: Path, exc: Exception) -> EdgeError | None:
    """The one-line error for the build of ``final`` that raised ``exc`` when the disk is full (``ENOSPC`` or "No
    space left" in ``exc`` or its causes, or under :data:`LOW_SPACE` free), else None: any backend's write error."""
    try:
        stat = os.statvfs(final.parent)
        free: int | None = stat.f_bavail * stat.f_frsize
    except OSError:
        free = None
    if not (_says_no_space(exc) or (free is not None and free < LOW_SPACE)):
        return None
    space = f"{free / 1e6:.0f} MB free" if free is not None else "no space left"
    return _DiskFull(f"the disk is full while writing the cache entry {final.parent.name}/{final.name} "
                     f"({first_line(exc, 160)}): {space} in {final.parent.parent}; free some space or set "
                     "MLFLOW_EDGE_CACHE to a larger disk")


def _says_no_space(exc: BaseException | None) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "no space left" in str(exc).lower():
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


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
    """Every file and symlink under ``folder`` but the bookkeeping (the manifest, :data:`USED`, the leases in
    :data:`USERS`), with its path relative to ``folder``."""
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if dirpath == os.fspath(folder):
            dirnames[:] = [d for d in dirnames if d != USERS]
        names = filenames + [d for d in dirnames if (here / d).is_symlink()]
        for name in sorted(names):
            relative = (here / name).relative_to(folder).as_posix()
            if relative not in _BOOKKEEPING:
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


# -- use and leases ------------------------------------------------------------------------------------------------
def _record_use(folder: Path) -> None:
    """Lease ``folder`` to this process until it exits and mark it used now. Nothing is created where ``folder`` is
    absent (an evicted entry is never brought back half), and a cache this process cannot write records nothing."""
    lease = folder / USERS / procs.owner_tag()
    try:
        lease.parent.mkdir(exist_ok=True)  # not parents=True: the entry itself must already be there
        lease.touch()
    except OSError:
        return
    if not _leases:
        atexit.register(_drop_leases)
    _leases.add(lease)
    with contextlib.suppress(OSError):
        (folder / USED).touch()


def entry_of(path: Path, root: Path | None = None) -> Path | None:
    """The cache entry (``<root>/<kind>/<digest>``) that holds ``path``, else ``None``."""
    root = (root or cache_root()).resolve()
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if folder.parent.parent == root:
            return folder
    return None


def release(folder: Path) -> None:
    """Drop this process's lease on ``folder`` (an entry :func:`get_or_build` or :func:`find` returned): for a caller
    done with it before it exits, so the size limit may evict it. Using it again leases it again."""
    lease = Path(folder) / USERS / procs.owner_tag()
    _leases.discard(lease)
    with contextlib.suppress(OSError):
        lease.unlink()


def _drop_leases() -> None:
    """At exit: remove the leases this process wrote (not those a forked parent wrote)."""
    tag = procs.owner_tag()
    for lease in _leases:
        if lease.name == tag:
            with contextlib.suppress(OSError):
                lease.unlink()


def _live_users(folder: Path) -> bool:
    """Whether a live process holds a lease on ``folder`` (a process of another host always counts as live); the
    leases of processes gone from this host are removed."""
    try:
        names = os.listdir(folder / USERS)
    except OSError:
        return False
    live = False
    for name in names:
        if procs.owner_gone(name):
            with contextlib.suppress(OSError):
                os.unlink(folder / USERS / name)
        elif ":" in name:  # an owner tag; anything else is no lease
            live = True
    return live


# -- the size limit ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
    """One complete cache entry: ``<root>/<kind>/<digest>/``, its size in bytes and its last use (epoch seconds)."""

    kind: str
    path: Path
    size_bytes: int
    last_used: float

    @property
    def digest(self) -> str:
        return self.path.name


@dataclasses.dataclass
class Pruned:
    """What :func:`prune` evicted (or, in a dry run, would evict), what met the criteria but stayed and why, and what
    the cache's entries hold afterwards."""

    evicted: list[Entry]
    kept: list[tuple[Entry, str]]
    total_bytes: int

    @property
    def freed_bytes(self) -> int:
        return sum(entry.size_bytes for entry in self.evicted)


def size_limit() -> int | None:
    """``$MLFLOW_EDGE_CACHE_MAX_GB`` in bytes (GB: 10^9 bytes), None when unset or empty; anything but a positive
    number is a one-line error naming the variable."""
    text = os.environ.get(MAX_GB_ENV, "").strip()
    if not text:
        return None
    try:
        gb = float(text)
    except ValueError:
        gb = -1.0
    if not 0 < gb < float("inf"):
        raise EdgeError(f"{MAX_GB_ENV} must be a positive number of GB (10^9 bytes), got {text!r}")
    return max(1, round(gb * 1e9))


def human_size(size_bytes: float) -> str:
    """``20.0 GB``, ``512.3 MB``, ``4.1 kB`` or ``12 B`` (decimal units, like :data:`MAX_GB_ENV`)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.1f} {unit}"
    return f"{size_bytes:.0f} B"


def entry_count(count: int) -> str:
    """``1 entry``, ``3 entries``."""
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def entries(root: Path | None = None) -> list[Entry]:
    """Every complete entry under the cache root (a ``<kind>/<digest>/`` folder holding a manifest), least recently
    used first. Build folders, locks and folders the cache does not manage (downloads, references) are no entries."""
    found = []
    for kind_folder in _subfolders(root or cache_root()):
        for folder in _subfolders(kind_folder):
            if "." not in folder.name and (folder / MANIFEST).is_file():
                found.append(Entry(kind_folder.name, folder, _folder_bytes(folder), _last_used(folder)))
    return sorted(found, key=lambda entry: (entry.last_used, entry.kind, entry.digest))


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def _folder_bytes(folder: Path) -> int:
    """The bytes of the files under ``folder`` (symlinks count as nothing: their targets belong elsewhere)."""
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(dirpath, name))
                total += 0 if S_ISLNK(info.st_mode) else info.st_size
    return total


def _last_used(folder: Path) -> float:
    """When ``folder`` was last handed out (:data:`USED`), else when it was completed (its manifest)."""
    for name in (USED, MANIFEST):
        with contextlib.suppress(OSError):
            return (folder / name).stat().st_mtime
    return 0.0


def busy(entry: Entry) -> str | None:
    """Why ``entry`` may not be evicted now (``being built``: its lock is held; ``in use``: a live process leased
    it), else None."""
    try:
        with _lock_if_free(entry.path.parent / f"{entry.digest}.lock") as free:
            if not free:
                return "being built"
    except OSError:
        pass
    return "in use" if _live_users(entry.path) else None


def prune(limit_bytes: int | None, *, kind: str | None = None, older_than_s: float | None = None,
          dry_run: bool = False, keep: frozenset[Path] = frozenset(), root: Path | None = None) -> Pruned:
    """Evict entries, least recently used first: those last used more than ``older_than_s`` seconds ago, then more
    while all entries hold over ``limit_bytes``; with neither criterion, every entry. Only entries of ``kind`` when
    given; never one in ``keep``, one in use by a live process or one being built. A dry run removes nothing."""
    listed = entries(root)
    result = Pruned([], [], sum(entry.size_bytes for entry in listed))
    cutoff = None if older_than_s is None else time.time() - older_than_s
    for entry in listed:
        old = cutoff is not None and entry.last_used < cutoff
        over = limit_bytes is not None and result.total_bytes > limit_bytes
        everything = limit_bytes is None and cutoff is None
        if kind not in (None, entry.kind) or not (old or over or everything):
            continue
        reason = "just built" if entry.path in keep else _evict(entry, dry_run)
        if reason:
            result.kept.append((entry, reason))
        else:
            result.evicted.append(entry)
            result.total_bytes -= entry.size_bytes
    return result


def _evict(entry: Entry, dry_run: bool = False) -> str | None:
    """Remove ``entry`` (a dry run only checks it could go) under its lock, taken only if free: None when it went,
    else why it stays. It is renamed into a build folder of this process first, so no reader trusts half of it."""
    try:
        with _lock_if_free(entry.path.parent / f"{entry.digest}.lock") as free:
            if not free:
                return "being built"
            if not (entry.path / MANIFEST).is_file():
                return "removed by another process"
            if _live_users(entry.path):
                return "in use"
            if dry_run:
                return None
            away = _withdraw(entry.path)
    except OSError as exc:
        return f"cannot be removed ({exc.strerror or first_line(exc)})"
    if away is None:
        return "in use"
    _hashed.pop(entry.path, None)
    shutil.rmtree(away.parent, ignore_errors=True)
    return None


def _withdraw(final: Path) -> Path | None:
    """``final`` moved into a new build folder (removed by the next run should this process die), or None when a
    process leased it while it moved: then it is put back. A lease written before the move moves with it."""
    folder = _build_folder(final)
    try:
        os.replace(final, folder / "old")
    except OSError:
        folder.rmdir()
        raise
    if not _live_users(folder / "old"):
        return folder / "old"
    os.replace(folder / "old", final)
    folder.rmdir()
    return None


def _enforce_limit(just_built: Path, limit_bytes: int) -> None:
    """After a build: evict the least recently used entries until the cache fits ``limit_bytes``, in one line on
    stderr; when what stays (in use, being built, just built) does not fit, one warning line. Never fails the run."""
    try:
        pruned = prune(limit_bytes, keep=frozenset({just_built}), root=just_built.parent.parent)
    except OSError as exc:
        print(f"mlflow-edge: warning: the cache cannot be held to its {human_size(limit_bytes)} limit "
              f"({exc.strerror or first_line(exc)})", file=sys.stderr, flush=True)
        return
    count = len(pruned.evicted)
    evicted = (f"evicted {entry_count(count)} ({human_size(pruned.freed_bytes)}), least recently used first"
               if count else "evicted nothing")
    over = f"cache over its {human_size(limit_bytes)} limit: {evicted}"
    if pruned.total_bytes > limit_bytes:
        kept = collections.Counter(reason for _, reason in pruned.kept)
        print(f"mlflow-edge: warning: {over}, and it still holds {human_size(pruned.total_bytes)} in entries that "
              f"stay ({', '.join(f'{n} {reason}' for reason, n in kept.items())}); raise {MAX_GB_ENV} or free "
              "space (`mlflow-edge cache list`)", file=sys.stderr, flush=True)
    elif count:
        print(f"mlflow-edge: {over}", file=sys.stderr, flush=True)
