"""Disk is a budget: ``MLFLOW_EDGE_CACHE_MAX_GB`` evicts the least recently used cache entries after each build,
never one just built, leased by a live process or being built; ``mlflow-edge cache list|prune`` show and prune."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlflow_edge import cache
from mlflow_edge.cli import main
from mlflow_edge.errors import EdgeError

PAYLOAD = 10_000  # bytes of each entry's one file


@pytest.fixture()
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("MLFLOW_EDGE_CACHE", str(folder))
    monkeypatch.delenv(cache.MAX_GB_ENV, raising=False)
    return folder


def payload(size: int = PAYLOAD):
    def build(tmp: Path) -> None:
        (tmp / "weights.bin").write_bytes(b"\1" * size)

    return build


def entry(name: str, kind: str = "kind", *, age_s: float | None = None) -> Path:
    """An entry built through ``get_or_build`` and released by this process, last used ``age_s`` seconds ago."""
    folder = cache.get_or_build(kind, {"name": name}, payload())
    cache.release(folder)
    if age_s is not None:
        used = time.time() - age_s
        os.utime(folder / cache.USED, (used, used))
    return folder


def entry_bytes() -> int:
    return cache.entries()[0].size_bytes


def limit_to(monkeypatch: pytest.MonkeyPatch, size_bytes: float) -> None:
    monkeypatch.setenv(cache.MAX_GB_ENV, repr(size_bytes / 1e9))


def child_using(folder: Path, how: str = "find") -> subprocess.Popen:
    """A live process that was handed ``folder`` (through ``find`` or ``get_or_build``) and waits for its stdin."""
    script = ("import json, sys; from mlflow_edge import cache\n"
              "key, how = json.loads(sys.argv[1]), sys.argv[2]\n"
              "cache.find('kind', key) if how == 'find' else cache.get_or_build('kind', key, lambda tmp: None)\n"
              "print('ready', flush=True); sys.stdin.read()\n")
    key = (folder / "key.json").read_text()
    proc = subprocess.Popen([sys.executable, "-c", script, key, how], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_the_limit_evicts_the_least_recently_used_first(root: Path, monkeypatch, capsys) -> None:
    first, second, third = entry("a", age_s=300), entry("b", age_s=200), entry("c", age_s=100)
    assert cache.find("kind", {"name": "a"}) == first  # used now: the most recent of the three
    cache.release(first)
    size = entry_bytes()
    limit_to(monkeypatch, 2.5 * size)
    capsys.readouterr()

    newest = cache.get_or_build("kind", {"name": "d"}, payload())

    assert [e.path for e in cache.entries()] == [first, newest]
    assert not second.exists() and not third.exists()
    assert list(root.joinpath("kind").glob("*.tmp")) == []  # the renamed folders are gone too
    assert capsys.readouterr().err.splitlines() == [
        f"mlflow-edge: cache over its {cache.human_size(2.5 * size)} limit: evicted 2 entries "
        f"({cache.human_size(2 * size)}), least recently used first"]
    assert cache.find("kind", {"name": "b"}) is None


def test_nothing_is_evicted_under_the_limit_or_without_one(root: Path, monkeypatch, capsys) -> None:
    entry("a", age_s=100)
    cache.get_or_build("kind", {"name": "b"}, payload())
    limit_to(monkeypatch, 10 * entry_bytes())
    cache.get_or_build("kind", {"name": "c"}, payload())
    assert len(cache.entries()) == 3 and capsys.readouterr().err == ""


def test_the_entry_just_built_stays_with_one_warning_when_it_alone_is_over(root: Path, monkeypatch, capsys) -> None:
    entry("a", age_s=100)
    limit_to(monkeypatch, 1000)  # below one entry

    built = cache.get_or_build("kind", {"name": "big"}, payload())

    assert [e.path for e in cache.entries()] == [built]
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("mlflow-edge: warning: cache over its 1.0 kB limit: evicted 1 entry (")
    assert f"it still holds {cache.human_size(entry_bytes())} in entries that stay (1 just built)" in line


@pytest.mark.parametrize("how", ["find", "get_or_build"])
def test_an_entry_a_live_process_uses_is_never_evicted(root: Path, monkeypatch, capsys, how: str) -> None:
    leased = entry("a", age_s=300)
    child = child_using(leased, how)
    try:
        limit_to(monkeypatch, 1.5 * entry_bytes())
        cache.get_or_build("kind", {"name": "b"}, payload())
        assert leased.is_dir() and cache.find("kind", {"name": "a"}) == leased
        cache.release(leased)
        assert "(1 in use, 1 just built)" in capsys.readouterr().err
    finally:
        child.communicate("", timeout=60)  # it exits: its lease goes with it
    assert child.returncode == 0 and list((leased / cache.USERS).iterdir()) == []

    cache.get_or_build("kind", {"name": "c"}, payload())
    assert not leased.exists()


def test_the_lease_of_a_killed_process_protects_nothing(root: Path, monkeypatch) -> None:
    leased = entry("a", age_s=300)
    child = child_using(leased)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    assert [p.name.split(":")[-1].split("-")[0] for p in (leased / cache.USERS).iterdir()] == [str(child.pid)]
    limit_to(monkeypatch, 1.5 * entry_bytes())

    cache.get_or_build("kind", {"name": "b"}, payload())

    assert not leased.exists()


def test_an_entry_being_built_is_not_evicted(root: Path, monkeypatch) -> None:
    locked = entry("a", age_s=300)
    with cache.file_lock(locked.parent / f"{locked.name}.lock"):  # as a rebuild of it holds it
        pruned = cache.prune(0)
    assert locked.is_dir() and [(e.path, reason) for e, reason in pruned.kept] == [(locked, "being built")]


def test_nested_builds_evict_only_after_the_outermost(root: Path, monkeypatch) -> None:
    old = entry("a", age_s=300)
    limit_to(monkeypatch, 1.5 * entry_bytes())
    seen: list[bool] = []

    def outer(tmp: Path) -> None:
        cache.get_or_build("kind", {"name": "input"}, payload())
        seen.append(old.exists())  # no eviction while the outer build runs
        payload()(tmp)

    cache.get_or_build("kind", {"name": "outer"}, outer)
    assert seen == [True] and not old.exists()


def test_a_used_entry_still_passes_its_manifest_check(root: Path) -> None:
    calls: list[Path] = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        payload()(tmp)

    folder = cache.get_or_build("kind", {"name": "a"}, build)
    assert cache.find("kind", {"name": "a"}) == folder
    assert (folder / cache.USED).is_file() and list((folder / cache.USERS).iterdir())
    cache._hashed.pop(folder, None)  # as a fresh process sees it: sizes and hashes checked
    assert cache._damage(folder) is None
    assert cache.get_or_build("kind", {"name": "a"}, build) == folder and len(calls) == 1

    (folder / cache.MANIFEST).write_text("")  # an entry from before manifests, adopted after its use
    cache.get_or_build("kind", {"name": "a"}, build)
    assert sorted(json.loads((folder / cache.MANIFEST).read_text())["files"]) == ["key.json", "weights.bin"]


@pytest.mark.parametrize("value", ["abc", "0", "-2", "nan", "inf"])
def test_a_bad_limit_is_one_line_before_any_build(root: Path, monkeypatch, value: str) -> None:
    monkeypatch.setenv(cache.MAX_GB_ENV, value)
    calls: list[Path] = []
    with pytest.raises(EdgeError, match=f"^{cache.MAX_GB_ENV} must be a positive number of GB") as raised:
        cache.get_or_build("kind", {"name": "a"}, calls.append)
    assert calls == [] and "\n" not in str(raised.value)
    result = CliRunner().invoke(main, ["cache", "list"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"mlflow-edge: error: {raised.value}"]


def test_cache_list_shows_entries_least_recently_used_first(root: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # no store is needed: none is asked
    old, new = entry("a", age_s=3 * 86400), entry("b", "other", age_s=60)
    held = cache.get_or_build("kind", {"name": "held"}, payload())  # leased by this live process
    limit_to(monkeypatch, 20e9)

    result = CliRunner().invoke(main, ["cache", "list"])

    assert result.exit_code == 0, result.output
    header, *rows, total = result.stdout.splitlines()
    assert header.split() == ["kind", "digest", "size", "last", "used", "in", "use"]
    assert [row.split()[:2] for row in rows] == [["kind", old.name[:12]], ["other", new.name[:12]],
                                                 ["kind", held.name[:12]]]
    assert [row.split()[-1] for row in rows] == ["no", "no", "use"]  # "in use"
    assert cache.human_size(entry_bytes()) in rows[0]
    assert total == (f"total: 3 entries, {cache.human_size(3 * entry_bytes())} (limit 20.0 GB, "
                     f"{cache.MAX_GB_ENV}) in {root}")
    only = CliRunner().invoke(main, ["cache", "list", "--kind", "other"]).stdout.splitlines()
    assert len(only) == 3 and only[1].startswith("other") and only[2].startswith("total: 1 entry, ")


def test_cache_prune_dry_run_removes_nothing(root: Path) -> None:
    folders = [entry("a", age_s=300), entry("b", age_s=200)]
    result = CliRunner().invoke(main, ["cache", "prune", "--max-gb", "0", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["would", "evict"]] * 2
    assert f"kind/{folders[0].name[:12]}" in lines[0] and f"kind/{folders[1].name[:12]}" in lines[1]
    assert lines[2] == f"would free {cache.human_size(2 * entry_bytes())} in 2 entries; the cache would hold 0 B"
    assert all(folder.is_dir() for folder in folders)


def test_cache_prune_by_size_age_and_kind(root: Path, monkeypatch) -> None:
    ancient, old, recent = entry("a", age_s=10 * 86400), entry("b", age_s=5 * 86400), entry("c", age_s=60)
    other = entry("d", "other", age_s=20 * 86400)
    size = entry_bytes()

    aged = CliRunner().invoke(main, ["cache", "prune", "--older-than-days", "7", "--kind", "kind"])
    assert aged.exit_code == 0, aged.output
    assert aged.stdout.splitlines()[0].startswith(f"evicted kind/{ancient.name[:12]} ({cache.human_size(size)}, ")
    assert not ancient.exists() and other.is_dir()

    limit_to(monkeypatch, 2.5 * size)  # the default of --max-gb
    sized = CliRunner().invoke(main, ["cache", "prune"])
    assert sized.exit_code == 0, sized.output
    assert sized.stdout.splitlines()[-1] == (f"freed {cache.human_size(size)} in 1 entry; "
                                             f"the cache holds {cache.human_size(2 * size)}")
    assert not other.exists() and old.is_dir() and recent.is_dir()

    monkeypatch.delenv(cache.MAX_GB_ENV)
    whole_kind = CliRunner().invoke(main, ["cache", "prune", "--kind", "kind"])
    assert whole_kind.exit_code == 0 and cache.entries() == []


def test_cache_prune_keeps_an_entry_in_use_and_says_so(root: Path) -> None:
    held = cache.get_or_build("kind", {"name": "held"}, payload())
    result = CliRunner().invoke(main, ["cache", "prune", "--max-gb", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"kept kind/{held.name[:12]} ({cache.human_size(entry_bytes())}): in use"
    assert held.is_dir()


@pytest.mark.parametrize("args, message", [
    ([], "say what to prune: --max-gb, --older-than-days or --kind (or set MLFLOW_EDGE_CACHE_MAX_GB)"),
    (["--max-gb", "abc"], "Invalid value for '--max-gb': 'abc' is not a valid float."),
    (["--max-gb", "-1"], "--max-gb must be a number, 0 or more, got -1.0"),
    (["--older-than-days", "nan"], "--older-than-days must be a number, 0 or more, got nan"),
    (["--kind", "nope"], "no cache entries of kind 'nope' in {root} (kinds: kind)"),
])
def test_cache_prune_refuses_a_bad_value_in_one_line(root: Path, args: list[str], message: str) -> None:
    folder = entry("a")
    result = CliRunner().invoke(main, ["cache", "prune", *args])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["mlflow-edge: error: " + message.format(root=root)]
    assert folder.is_dir()


def test_a_released_entry_may_be_evicted_by_its_own_process(root: Path, monkeypatch, capsys) -> None:
    """A search releases each trial's artifact once measured: its own later builds may then evict it."""
    measured = cache.get_or_build("kind", {"name": "measured"}, payload())  # leased to this process
    assert cache.entry_of(measured / "weights.bin") == measured and cache.entry_of(measured) == measured
    assert cache.entry_of(root) is None and cache.entry_of(Path("/")) is None
    limit_to(monkeypatch, 1.5 * entry_bytes())
    entry("second")  # over the limit, but the only other entry is this process's own lease
    assert measured.is_dir() and "evicted nothing" in capsys.readouterr().err
    cache.release(measured)
    entry("third")
    assert not measured.exists() and "evicted" in capsys.readouterr().err
