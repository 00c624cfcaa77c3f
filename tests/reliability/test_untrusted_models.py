"""Model folders cannot make mlflow-edge run their code: no pickle is loaded, no custom code without consent, and
llama.cpp's converter (which trusts remote code for some tokenizers) never starts on a folder that names code."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path

import pytest

from mlflow_edge.errors import EdgeError
from mlflow_edge.sources import SourceModel, from_folder, resolve_source


def copy_model(source: SourceModel, folder: Path) -> Path:
    """The tiny model's files in ``folder``: JSON copied (tests edit them), weights hard-linked."""
    folder.mkdir()
    for file in source.path.iterdir():
        if file.is_file() and file.name not in ("key.json", ".complete"):
            (shutil.copyfile if file.suffix == ".json" else os.link)(file, folder / file.name)
    return folder


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**data, **changes}))


class OpensAFile:
    """Unpickling this creates ``path``: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def one_line(info: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(info.value)
    assert "\n" not in message and all(part in message for part in parts), message


def test_auto_map_in_the_tokenizer_config_is_refused_unless_trusted(tiny_source: SourceModel, tmp_path: Path) -> None:
    folder = copy_model(tiny_source, tmp_path / "custom-tokenizer")
    edit_json(folder / "tokenizer_config.json", auto_map={"AutoTokenizer": ["tokenization_x.XTokenizer", None]})
    with pytest.raises(EdgeError) as info:
        resolve_source(str(folder))
    one_line(info, "tokenizer_config.json", "trust_remote_code", str(folder))
    assert from_folder(folder, trust_remote_code=True).path == folder


def test_auto_map_nested_in_any_json_is_refused(tiny_source: SourceModel, tmp_path: Path) -> None:
    folder = copy_model(tiny_source, tmp_path / "custom-processor")
    (folder / "processor_config.json").write_text(json.dumps({"nested": {"auto_map": {"AutoProcessor": "p.P"}}}))
    with pytest.raises(EdgeError) as info:
        from_folder(folder)
    one_line(info, "processor_config.json")


def test_pickles_beside_safetensors_are_never_seen_by_a_loader(tiny_source: SourceModel, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow_edge.backends.llamacpp import LlamaCppBackend
    from mlflow_edge.backends.reference import TransformersRunner

    folder = copy_model(tiny_source, tmp_path / "mixed")
    marker = tmp_path / "a-pickle-was-loaded"
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "rng_state.pth", "last.ckpt"):
        (folder / name).write_bytes(pickle.dumps(OpensAFile(marker)))
    edit_json(folder / "pytorch_model.bin.index.json", weight_map={"lm_head.weight": "pytorch_model.bin"})

    with monkeypatch.context() as env:
        env.setenv("MLFLOW_EDGE_CACHE", str(tmp_path / "cache"))  # the view of the folder goes into a test cache
        source = from_folder(folder)

    assert source.origin == str(folder) and source.num_parameters == tiny_source.num_parameters
    seen = sorted(p.name for p in source.path.iterdir())
    assert not [n for n in seen if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".bin.index.json"))], seen
    assert "model.safetensors" in seen
    runner = TransformersRunner(source.path, threads=2, context_tokens=16)
    assert runner.logits([1, 2, 3]).shape[0] == 3
    runner.close()
    gguf = LlamaCppBackend().convert(source, tmp_path / "gguf", "f16")
    assert gguf.path.is_file()
    assert not marker.exists()


def test_a_folder_with_only_pickled_weights_is_refused(tiny_source: SourceModel, tmp_path: Path) -> None:
    folder = copy_model(tiny_source, tmp_path / "only-pickles")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(OpensAFile(tmp_path / "marker")))
    with pytest.raises(EdgeError) as info:
        from_folder(folder)
    one_line(info, "no safetensors weights", "pytorch_model.bin", "not loaded")
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("change", [
    {"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}},
    {"tokenizer_class": "ChatGLMTokenizer"},
])
def test_the_llama_cpp_converter_never_starts_on_a_folder_naming_code(tiny_source: SourceModel, tmp_path: Path,
                                                                     change: dict) -> None:
    from mlflow_edge.backends.llamacpp import LlamaCppBackend

    folder = copy_model(tiny_source, tmp_path / "names-code")
    edit_json(folder / "tokenizer_config.json", **change)
    (folder / "tokenization_x.py").write_text(f"open({str(tmp_path / 'code-ran')!r}, 'w')\n")
    source = from_folder(folder, trust_remote_code=True)  # the user trusts it; the converter still refuses
    start = time.monotonic()
    with pytest.raises(EdgeError) as info:
        LlamaCppBackend().convert(source, tmp_path / "out", "f16")
    one_line(info, "convert_hf_to_gguf.py is not run", source.name)
    assert time.monotonic() - start < 5 and not (tmp_path / "out").exists()
    assert not (tmp_path / "code-ran").exists()
