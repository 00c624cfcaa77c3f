"""Cache entries are checked against their manifest before use, and builds left by killed processes are removed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlflow_edge import cache, procs

KEY = {"source": "abc", "precision": "Q4_K_M"}


def builder(calls: list[Path]):
    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "weights.bin").write_bytes(bytes(range(256)) * 64)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text('{"layers": 2}')

    return build


def fresh_process_view(folder: Path) -> None:
    """Forget that this process already hashed ``folder`` (a new process would hash it once)."""
    cache._hashed.pop(folder, None)


def test_every_file_is_recorded_in_the_manifest(tmp_path: Path) -> None:
    folder = cache.get_or_build("kind", KEY, builder([]), root=tmp_path)
    manifest = json.loads((folder / cache.MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["key.json", "sub/config.json", "weights.bin"]
    assert manifest["files"]["weights.bin"]["size"] == 256 * 64
    assert manifest["files"]["weights.bin"]["sha256"] == cache.sha256_file(folder / "weights.bin")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_entry_is_rebuilt_with_a_warning(tmp_path: Path, damage: str, capfd) -> None:
    calls: list[Path] = []
    folder = cache.get_or_build("kind", KEY, builder(calls), root=tmp_path)
    weights = folder / "weights.bin"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(data[:100])
    elif damage == "flip":
        data[1000] ^= 0xFF
        weights.write_bytes(data)  # same size: only the hash tells
        fresh_process_view(folder)
    else:
        (folder / "sub" / "config.json").unlink()
    capfd.readouterr()

    again = cache.get_or_build("kind", KEY, builder(calls), root=tmp_path)

    assert again == folder and len(calls) == 2
    assert weights.read_bytes() == bytes(range(256)) * 64 and (folder / "sub" / "config.json").is_file()
    warning = capfd.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("mlflow-edge: warning: cache entry kind/")
    assert "rebuilding" in warning[0]
    assert sorted(p.name for p in (tmp_path / "kind").iterdir()) == [folder.name, folder.name + ".lock"]


def test_an_intact_entry_is_hashed_once_per_process(tmp_path: Path) -> None:
    calls: list[Path] = []
    folder = cache.get_or_build("kind", KEY, builder(calls), root=tmp_path)
    fresh_process_view(folder)
    assert cache.get_or_build("kind", KEY, builder(calls), root=tmp_path) == folder
    assert folder in cache._hashed and len(calls) == 1


def test_an_entry_from_before_manifests_is_adopted_not_rebuilt(tmp_path: Path) -> None:
    calls: list[Path] = []
    folder = cache.get_or_build("kind", KEY, builder(calls), root=tmp_path)
    (folder / cache.MANIFEST).write_text("")  # what earlier versions wrote
    assert cache.get_or_build("kind", KEY, builder(calls), root=tmp_path) == folder
    assert len(calls) == 1 and "weights.bin" in json.loads((folder / cache.MANIFEST).read_text())["files"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_build_folders_of_dead_processes_are_removed_live_ones_kept(tmp_path: Path) -> None:
    base = tmp_path / "kind"
    base.mkdir()
    digest = cache.key_digest({"other": 1})
    stale = base / f"{digest}.{dead_pid()}-123.abc_12.tmp"
    legacy = base / f"{digest}.k9x2_abc.tmp"  # named before build folders named their owner
    live = base / f"{digest}.{procs.process_id()}.def_34.tmp"
    for folder in (stale, legacy, live):
        folder.mkdir()
        (folder / "half-written.gguf").write_bytes(b"\0" * 1024)

    cache.get_or_build("kind", KEY, builder([]), root=tmp_path)

    assert not stale.exists() and not legacy.exists()
    assert live.is_dir() and (live / "half-written.gguf").is_file()


def test_a_build_folder_whose_entry_is_locked_is_kept(tmp_path: Path) -> None:
    """A builder in another pid namespace holds the entry's lock: its folder stays even though its pid looks dead."""
    import fcntl

    base = tmp_path / "kind"
    base.mkdir()
    digest = cache.key_digest({"other": 1})
    building = base / f"{digest}.{dead_pid()}-123.abc_12.tmp"
    building.mkdir()
    with open(base / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        holder = subprocess.run(  # another process sweeps while this one holds the lock
            [sys.executable, "-c", "import sys; from pathlib import Path; from mlflow_edge import cache; "
             "cache.get_or_build('kind', {'k': 1}, lambda tmp: None, root=Path(sys.argv[1]))", str(tmp_path)],
            capture_output=True, text=True, timeout=120)
    assert holder.returncode == 0, holder.stderr
    assert building.is_dir()


def test_a_build_killed_midway_leaves_a_folder_the_next_run_removes(tmp_path: Path) -> None:
    script = ("import os, signal, sys; from pathlib import Path; from mlflow_edge import cache\n"
              "def build(tmp):\n"
              "    (tmp / 'part.bin').write_bytes(b'x' * 4096)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "cache.get_or_build('kind', {'k': 1}, build, root=Path(sys.argv[1]))\n")
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, timeout=120)
    assert killed.returncode == -9
    assert [p.name for p in (tmp_path / "kind").glob("*.tmp")]  # the killed build's folder

    cache.get_or_build("kind", {"k": 1}, lambda tmp: (tmp / "part.bin").write_bytes(b"y"), root=tmp_path)

    assert not list((tmp_path / "kind").glob("*.tmp"))
