"""The content-addressed cache: built once, keyed by content, never left half-written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mlflow_edge import cache
from mlflow_edge.errors import EdgeError


def write_payload(text: str):
    calls: list[Path] = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "payload.txt").write_text(text)

    return build, calls


def test_builds_once_then_reuses_the_entry(tmp_path: Path) -> None:
    key = {"source": "abc", "precision": "Q4_K_M"}
    build, calls = write_payload("first")
    folder = cache.get_or_build("kind", key, build, root=tmp_path)
    assert len(calls) == 1
    assert folder == tmp_path / "kind" / cache.key_digest(key)
    assert (folder / "payload.txt").read_text() == "first"
    assert (folder / ".complete").is_file()
    assert json.loads((folder / "key.json").read_text()) == key

    rebuild, second_calls = write_payload("second")
    reordered = dict(reversed(list(key.items())))  # key order is irrelevant
    again = cache.get_or_build("kind", reordered, rebuild, root=tmp_path)
    assert again == folder
    assert second_calls == []
    assert (again / "payload.txt").read_text() == "first"


def test_different_keys_get_different_folders(tmp_path: Path) -> None:
    build_a, _ = write_payload("a")
    build_b, _ = write_payload("b")
    a = cache.get_or_build("kind", {"precision": "Q4_K_M"}, build_a, root=tmp_path)
    b = cache.get_or_build("kind", {"precision": "Q8_0"}, build_b, root=tmp_path)
    c = cache.get_or_build("other", {"precision": "Q4_K_M"}, build_b, root=tmp_path)
    assert len({a, b, c}) == 3
    assert (a / "payload.txt").read_text() == "a"
    assert (b / "payload.txt").read_text() == "b"
    assert c.parent.name == "other"


def test_failed_build_leaves_no_entry_and_no_temp_folder(tmp_path: Path) -> None:
    key = {"source": "abc"}
    seen: list[Path] = []

    def failing(tmp: Path) -> None:
        seen.append(tmp)
        (tmp / "half-written.bin").write_bytes(b"\0" * 1024)
        raise RuntimeError("converter crashed")

    with pytest.raises(RuntimeError, match="converter crashed"):
        cache.get_or_build("kind", key, failing, root=tmp_path)
    digest = cache.key_digest(key)
    assert seen and seen[0].parent == tmp_path / "kind"
    assert not seen[0].exists()
    assert sorted(p.name for p in (tmp_path / "kind").iterdir()) == [f"{digest}.lock"]

    build, calls = write_payload("ok")  # the next call builds the entry for real
    folder = cache.get_or_build("kind", key, build, root=tmp_path)
    assert len(calls) == 1 and (folder / "payload.txt").read_text() == "ok"


def test_an_entry_without_its_completion_marker_is_rebuilt(tmp_path: Path) -> None:
    key = {"source": "abc"}
    stale = tmp_path / "kind" / cache.key_digest(key)
    stale.mkdir(parents=True)
    (stale / "payload.txt").write_text("stale")
    build, calls = write_payload("fresh")
    folder = cache.get_or_build("kind", key, build, root=tmp_path)
    assert folder == stale and len(calls) == 1
    assert (folder / "payload.txt").read_text() == "fresh"


def test_cache_root_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_EDGE_CACHE", str(tmp_path / "edge"))
    assert cache.cache_root() == tmp_path / "edge"
    monkeypatch.delenv("MLFLOW_EDGE_CACHE")
    assert cache.cache_root() == Path.home() / ".cache" / "mlflow-edge"


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40_000 + b"tail"  # ~10 MB: several chunks
    file = tmp_path / "blob.bin"
    file.write_bytes(data)
    assert cache.sha256_file(file) == hashlib.sha256(data).hexdigest()
    assert cache.sha256_file(file, chunk=4096) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert cache.sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_an_unusable_cache_folder_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MLFLOW_EDGE_CACHE", str(blocker / "cache"))
    with pytest.raises(EdgeError) as info:
        cache.get_or_build("kind", {"k": 1}, lambda tmp: None)
    assert str(info.value).startswith(f"cache folder {blocker / 'cache' / 'kind'} cannot be created")
    assert "MLFLOW_EDGE_CACHE" in str(info.value) and "\n" not in str(info.value)
