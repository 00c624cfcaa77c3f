"""Damaged safetensors weights are refused in one line before any work.

Copies of the tiny Llama's real folder (config, tokenizer, ``model.safetensors``) whose weights file is empty, cut
short, or carries a garbled header, and a shard index naming a shard that is not there: ``resolve_source`` refuses
each with one ``EdgeError`` line naming the file and what is wrong (never the safetensors library's own error), and
``mlflow-edge convert`` prints one ``mlflow-edge: error:`` line, exits 1 and ends its run FAILED with that reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from mlflow_edge.cli import main
from mlflow_edge.errors import EdgeError
from mlflow_edge.sources import resolve_source
from tests.reliability.test_bad_input import assert_one_line_error


def _split(data: bytes) -> tuple[int, dict, bytes]:
    """A safetensors file's header length, header and tensor data."""
    length = int.from_bytes(data[:8], "little")
    return length, json.loads(data[8:8 + length]), data[8 + length:]


def _join(header: dict, tensors: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + tensors


def _retyped(data: bytes) -> bytes:
    _, header, tensors = _split(data)
    name = next(n for n in header if n != "__metadata__")
    header[name]["dtype"] = "Q4_K"
    return _join(header, tensors)


def _without_offsets(data: bytes) -> bytes:
    _, header, tensors = _split(data)
    del header[next(n for n in header if n != "__metadata__")]["data_offsets"]
    return _join(header, tensors)


DAMAGE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda data: b"", "it is empty (0 bytes)"),
    "shorter than its length": (lambda data: data[:5], "the file is 5 bytes, shorter than its 8-byte header length"),
    "shorter than its header": (lambda data: data[:100], "truncated: its header is"),
    "garbage header": (lambda data: (12).to_bytes(8, "little") + b"not {json} !" + data[200:], "header is not JSON"),
    "random bytes": (lambda data: bytes(range(256)) * 4, "not a safetensors file"),
    "header is a list": (lambda data: _join([1, 2], b""), "not a JSON object of tensors"),  # type: ignore[arg-type]
    "tensor without offsets": (_without_offsets, "has no valid dtype, shape or data_offsets"),
    "unknown dtype": (_retyped, "unknown dtype 'Q4_K'"),
    "partial download": (lambda data: data[:len(data) // 2], "truncated: its header says"),
    "trailing bytes": (lambda data: data + b"\0" * 16, "the file holds"),
}


@pytest.fixture(scope="module")
def weights(tiny_source) -> bytes:
    return (tiny_source.path / "model.safetensors").read_bytes()


def _copy(tiny_source, folder: Path, weights: bytes | None = None) -> Path:
    """The tiny Llama's config and tokenizer files in ``folder``, with ``weights`` as its ``model.safetensors``."""
    folder.mkdir()
    for file in tiny_source.path.iterdir():
        if file.is_file() and file.suffix != ".safetensors":
            shutil.copy(file, folder / file.name)
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_an_intact_copy_still_resolves_with_the_same_parameter_count(tiny_source, weights, tmp_path: Path) -> None:
    source = resolve_source(str(_copy(tiny_source, tmp_path / "intact", weights)))
    assert source.num_parameters == tiny_source.num_parameters
    assert source.sha256 == tiny_source.sha256


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_weights_are_refused_in_one_line_naming_the_file(tiny_source, weights, tmp_path: Path,
                                                                 damage: str) -> None:
    cut, expected = DAMAGE[damage]
    folder = _copy(tiny_source, tmp_path / "damaged", cut(weights))
    with pytest.raises(EdgeError) as caught:
        resolve_source(str(folder))
    message = str(caught.value)
    assert "\n" not in message and expected in message, message
    assert f"unusable safetensors file {folder.resolve() / 'model.safetensors'}: " in message, message


def test_a_partial_download_says_how_much_the_header_expects(tiny_source, weights, tmp_path: Path) -> None:
    length, _, tensors = _split(weights)
    folder = _copy(tiny_source, tmp_path / "partial", weights[:8 + length + 1000])
    with pytest.raises(EdgeError, match=f"its header says {len(tensors)} bytes of tensor data, the file holds 1000"):
        resolve_source(str(folder))


def test_a_shard_index_naming_a_missing_shard_is_refused(tiny_source, weights, tmp_path: Path) -> None:
    folder = _copy(tiny_source, tmp_path / "sharded")
    (folder / "model-00001-of-00002.safetensors").write_bytes(weights)
    _, header, _ = _split(weights)
    names = [n for n in header if n != "__metadata__"]
    weight_map = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(EdgeError) as caught:
        resolve_source(str(folder))
    message = str(caught.value)
    assert "\n" not in message and "model.safetensors.index.json" in message, message
    assert "1 missing shard file(s): model-00002-of-00002.safetensors" in message, message


def test_convert_on_a_damaged_folder_is_one_line_and_a_failed_run(tiny_source, weights, tmp_path: Path,
                                                                  tracking_uri: str) -> None:
    folder = _copy(tiny_source, tmp_path / "cut", weights[:len(weights) - 4096])
    result = CliRunner().invoke(main, ["convert", "--model", str(folder), "--backend", "llamacpp",
                                       "--experiment", "damaged-weights"])
    line = assert_one_line_error(result.exit_code, result.stderr, "truncated: its header says", result.exception)
    assert str(folder.resolve() / "model.safetensors") in line, line
    (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("damaged-weights").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["mlflow_edge.error"] == line.removeprefix("mlflow-edge: error: ")
