"""Downloads are hash-pinned: pip fetches with --require-hashes, and a cached file that changed is fetched again."""

from __future__ import annotations

import pytest

from mlflow_edge import sources
from mlflow_edge.errors import EdgeError

SIX = ("six==1.16.0", "six-1.16.0-py2.py3-none-any.whl",
       "8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254")  # a small wheel on the package index


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_EDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_pinned_wheel_is_fetched_checked_and_refetched_when_altered(empty_cache):
    path = sources.pinned_download(*SIX, binary=True)
    assert path == empty_cache / "downloads" / SIX[1] and path.stat().st_size > 0
    path.write_bytes(b"altered")  # a tampered or truncated cache file
    again = sources.pinned_download(*SIX, binary=True)
    assert again == path and sources.cache.sha256_file(again) == SIX[2]
    assert not list((empty_cache / "downloads").glob(".fetch-*"))  # no temporary folder left


def test_a_file_whose_hash_differs_from_the_pin_is_refused(empty_cache):
    with pytest.raises(EdgeError, match=r"cannot fetch six==1.16.0 with pip: .*(hash|HASH)") as info:
        sources.pinned_download(SIX[0], SIX[1], "0" * 64, binary=True)
    assert "\n" not in str(info.value)
    assert not (empty_cache / "downloads" / SIX[1]).exists()
