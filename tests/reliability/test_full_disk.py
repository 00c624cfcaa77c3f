"""A full disk while a cache entry is built is one line, and leaves nothing a rerun would trust.

The real case runs on a 2 MiB tmpfs mounted as ``MLFLOW_EDGE_CACHE`` (skipped where mounting is not permitted): the
kernel's own ENOSPC, numpy's ``tofile`` short write (``OSError: N requested and M written``, no errno), a framework
error that only says its stream failed (llama.cpp's ``basic_ios::clear: iostream error``), and a build whose files fit
but whose manifest does not. Elsewhere a build raising ENOSPC stands for the disk; any other error of a build on a
disk with room comes out as it was raised.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

from mlflow_edge import cache
from mlflow_edge.errors import EdgeError

KEY = {"source": "abc", "precision": "Q4_K_M"}
WAY_OUT = "free some space or set MLFLOW_EDGE_CACHE to a larger disk"


@pytest.fixture()
def tiny_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 2 MiB tmpfs as the cache root, unmounted afterwards."""
    disk = tmp_path / "tiny-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({mounted.stderr.strip()}): the full-disk case needs one")
    monkeypatch.setenv("MLFLOW_EDGE_CACHE", str(disk))
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def assert_full_disk_error(exc: pytest.ExceptionInfo, kind: str, root: Path) -> str:
    """One line naming the entry, the space left in ``root`` and the way out; no entry and no build folder left."""
    message = str(exc.value)
    digest = cache.key_digest(KEY)
    assert "\n" not in message, message
    assert message.startswith(f"the disk is full while writing the cache entry {kind}/{digest} ("), message
    assert f" MB free in {root}; {WAY_OUT}" in message, message
    assert cache.find(kind, KEY, root=root) is None
    assert sorted(p.name for p in (root / kind).iterdir()) == [f"{digest}.lock"]  # no .tmp, no .partial
    return message


def _fill(tmp: Path) -> None:
    with open(tmp / "weights.bin", "wb") as file:
        file.write(b"\0" * (4 << 20))


def _numpy_short_write(tmp: Path) -> None:
    np.zeros(1 << 20, dtype=np.float32).tofile(tmp / "model.gguf")


def _stream_error(tmp: Path) -> None:
    try:
        _fill(tmp)
    except OSError:
        raise RuntimeError("basic_ios::clear: iostream error") from None


BUILDS: dict[str, tuple[Callable[[Path], None], str]] = {
    "the kernel's ENOSPC": (_fill, "No space left on device"),
    "numpy's short write": (_numpy_short_write, "requested and"),
    "a stream error only": (_stream_error, "basic_ios::clear: iostream error"),
}


@pytest.mark.parametrize("how", BUILDS, ids=list(BUILDS))
def test_a_full_tmpfs_is_one_line_and_leaves_no_entry(tiny_disk: Path, how: str) -> None:
    build, cause = BUILDS[how]
    with pytest.raises(EdgeError) as caught:
        cache.get_or_build("quantize-llamacpp", KEY, build)
    assert cause in assert_full_disk_error(caught, "quantize-llamacpp", tiny_disk)

    def small(tmp: Path) -> None:
        (tmp / "weights.bin").write_bytes(b"\1" * 1000)

    again = cache.get_or_build("quantize-llamacpp", KEY, small)  # the rerun builds afresh once there is room
    assert (again / "weights.bin").read_bytes() == b"\1" * 1000
    assert cache.find("quantize-llamacpp", KEY) == again


def test_a_manifest_that_does_not_fit_is_the_same_line(tiny_disk: Path) -> None:
    def fill_exactly(tmp: Path) -> None:  # the build's own files fit; key.json and the manifest do not
        with open(tmp / "weights.bin", "wb") as file:
            try:
                while True:
                    file.write(b"\0" * 4096)
                    file.flush()
            except OSError:
                pass

    with pytest.raises(EdgeError) as caught:
        cache.get_or_build("convert-openvino", KEY, fill_exactly)
    assert_full_disk_error(caught, "convert-openvino", tiny_disk)


@pytest.mark.parametrize("raised", [OSError(errno.ENOSPC, "No space left on device"),
                                    EdgeError("llama.cpp could not quantize to Q4_K_M: No space left on device")],
                         ids=["ENOSPC", "says no space left"])
def test_a_build_that_runs_out_of_space_is_one_line_on_any_disk(tmp_path: Path, raised: Exception) -> None:
    def build(tmp: Path) -> None:
        (tmp / "half.gguf").write_bytes(b"\0" * 1000)
        raise raised

    with pytest.raises(EdgeError) as caught:
        cache.get_or_build("quantize-llamacpp", KEY, build, root=tmp_path)
    assert caught.value.__cause__ is raised
    assert "No space left on device" in assert_full_disk_error(caught, "quantize-llamacpp", tmp_path)


def test_a_nested_build_on_a_full_disk_is_named_once(tmp_path: Path) -> None:
    def inner(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def outer(tmp: Path) -> None:
        cache.get_or_build("imatrix", KEY, inner, root=tmp_path)

    with pytest.raises(EdgeError) as caught:
        cache.get_or_build("quantize-llamacpp", {"other": 1}, outer, root=tmp_path)
    assert_full_disk_error(caught, "imatrix", tmp_path)
    assert "quantize-llamacpp" not in str(caught.value)
    assert cache.find("quantize-llamacpp", {"other": 1}, root=tmp_path) is None


@pytest.mark.parametrize("raised", [ValueError("tensor shapes differ"), OSError(errno.EACCES, "Permission denied"),
                                    EdgeError("unsupported architecture: mamba")], ids=["ValueError", "EACCES",
                                                                                        "EdgeError"])
def test_other_errors_pass_through_unchanged_when_there_is_room(tmp_path: Path, raised: Exception) -> None:
    stat = os.statvfs(tmp_path)
    if stat.f_bavail * stat.f_frsize < 2 * cache.LOW_SPACE:
        pytest.skip(f"{tmp_path} itself has little space left")

    def build(tmp: Path) -> None:
        raise raised

    with pytest.raises(type(raised)) as caught:
        cache.get_or_build("convert-llamacpp", KEY, build, root=tmp_path)
    assert caught.value is raised and "disk is full" not in str(caught.value)
    assert cache.find("convert-llamacpp", KEY, root=tmp_path) is None
