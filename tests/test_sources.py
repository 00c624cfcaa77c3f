"""Source models: the offline demo (a real GGUF dequantized by transformers), local folders, and every refusal."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlflow_edge.errors import EdgeError
from mlflow_edge.sources import (
    DEMO_NAME,
    SourceModel,
    count_parameters,
    from_folder,
    resolve_source,
    validate_gguf,
)

TOKENIZER_TEXTS = [
    "Hello, world!",
    "The capital of France is",
    "  leading spaces,\ttabs\nand new lines\n\n",
    "naïve café — 東京 🙂",
    "def f(x):\n    return x ** 2  # square",
    "1234567890 3.14159 1e-9",
    " = Valkyria Chronicles III = \n Senjō no Valkyria 3 : Unrecorded Chronicles",
]


@pytest.fixture(scope="module")
def demo_tokenizer(demo_source: SourceModel):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_source.path)


@pytest.fixture(scope="module")
def llama_vocab(demo_gguf: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(demo_gguf), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def assert_one_line_naming(exc: pytest.ExceptionInfo, *words: str) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


# -- the demo model ----------------------------------------------------------------------------------------------
def test_demo_resolves_to_smollm2(demo_source: SourceModel, demo_gguf: Path) -> None:
    assert demo_source.name == DEMO_NAME == "SmolLM2-135M-Instruct"
    assert demo_source.origin == "demo"
    assert demo_source.architecture == "LlamaForCausalLM"
    assert demo_source.num_parameters == pytest.approx(134.5e6, abs=0.1e6)
    digest = hashlib.sha256(demo_gguf.read_bytes()).hexdigest()
    assert demo_source.sha256 == digest
    assert (demo_source.path / "config.json").is_file()
    assert sorted(p.name for p in demo_source.path.glob("*.safetensors")) == ["model.safetensors"]
    config = json.loads((demo_source.path / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576


@pytest.mark.parametrize("text", TOKENIZER_TEXTS)
def test_demo_tokenizer_matches_llama_cpp(demo_tokenizer, llama_vocab, text: str) -> None:
    ids = demo_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == llama_vocab.tokenize(text.encode(), add_bos=False, special=False)
    assert demo_tokenizer.decode(ids) == text


def test_demo_tokenizer_special_tokens_match_llama_cpp(demo_tokenizer, llama_vocab) -> None:
    text = "<|im_start|>user\nHi<|im_end|>\n"
    ids = demo_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == llama_vocab.tokenize(text.encode(), add_bos=False, special=True)
    assert ids[0] == demo_tokenizer.convert_tokens_to_ids("<|im_start|>") == llama_vocab.token_bos()
    assert ids[-2] == demo_tokenizer.convert_tokens_to_ids("<|im_end|>") == llama_vocab.token_eos()
    assert demo_tokenizer.vocab_size == llama_vocab.n_vocab() == 49152


def test_dequantized_demo_knows_the_capital_of_france(demo_source: SourceModel, demo_tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_source.path, dtype=torch.float32)
    model.eval()
    inputs = demo_tokenizer("The capital of France is", return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    completion = demo_tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
    assert completion.startswith(" Paris"), completion


def test_second_demo_resolve_is_a_cache_hit(demo_source: SourceModel) -> None:
    start = time.perf_counter()
    again = resolve_source("demo")
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0
    assert again.path == demo_source.path
    assert again == demo_source


def test_validate_gguf_reads_the_demo_header(demo_gguf: Path) -> None:
    assert validate_gguf(demo_gguf) == "llama"


# -- local folders -----------------------------------------------------------------------------------------------
def test_from_folder_describes_the_tiny_checkpoint(tiny_source: SourceModel) -> None:
    again = from_folder(tiny_source.path)
    assert again == tiny_source  # same content, same hash
    assert again.architecture == "LlamaForCausalLM"
    assert again.origin == str(tiny_source.path)
    assert len(again.sha256) == 64
    via_spec = resolve_source(str(tiny_source.path))
    assert via_spec.sha256 == tiny_source.sha256 and via_spec.path == tiny_source.path


def test_folder_hash_follows_content(tiny_source: SourceModel, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_source.path, copy)
    assert from_folder(copy).sha256 == tiny_source.sha256
    (copy / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    assert from_folder(copy).sha256 != tiny_source.sha256


def test_count_parameters_matches_the_loaded_model(tiny_source: SourceModel) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_source.path, dtype=torch.float32)
    expected = sum(p.numel() for p in model.parameters())
    assert tiny_source.num_parameters == expected
    assert count_parameters(sorted(tiny_source.path.glob("*.safetensors"))) == expected
    # 2 layers of width 256 with a tied 49152-token embedding
    assert expected == 49152 * 256 + 2 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512 + 2 * 256) + 256


# -- refusals ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["", "   "])
def test_empty_spec_is_refused(spec: str) -> None:
    with pytest.raises(EdgeError) as exc:
        resolve_source(spec)
    assert_one_line_naming(exc, "no source model")


def test_missing_path_is_refused() -> None:
    with pytest.raises(EdgeError) as exc:
        resolve_source("./no/such/model")
    assert_one_line_naming(exc, "not found", "./no/such/model")


def test_missing_gguf_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    with pytest.raises(EdgeError) as exc:
        resolve_source(str(missing))
    assert_one_line_naming(exc, "not found", str(missing))


def test_junk_gguf_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).bytes(1024))
    with pytest.raises(EdgeError) as exc:
        resolve_source(str(junk))
    assert_one_line_naming(exc, "not a valid GGUF", str(junk))


def test_truncated_gguf_is_refused(demo_gguf: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with open(demo_gguf, "rb") as src:
        truncated.write_bytes(src.read(8 * 1024 * 1024))
    with pytest.raises(EdgeError) as exc:
        resolve_source(str(truncated))
    message = assert_one_line_naming(exc, "truncated", str(truncated), str(8 * 1024 * 1024))
    assert str(demo_gguf.stat().st_size) in message  # the tensors end exactly at the end of the full file


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "README.md").write_text("nothing here")
    with pytest.raises(EdgeError) as exc:
        resolve_source(str(folder))
    assert_one_line_naming(exc, "config.json", str(folder.resolve()))


@pytest.mark.parametrize("text", ["{", "[1, 2]", "\xff\xfe"])
def test_unreadable_config_is_refused(tmp_path: Path, text: str) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text(text, encoding="latin-1")
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(EdgeError) as exc:
        resolve_source(str(folder))
    assert_one_line_naming(exc, "config.json", str(folder.resolve()))


def test_file_that_is_neither_folder_nor_gguf_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "weights.bin"
    file.write_bytes(b"\0" * 16)
    with pytest.raises(EdgeError) as exc:
        resolve_source(str(file))
    assert_one_line_naming(exc, str(file))


def small_config(folder: Path, **extra) -> None:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **extra}
    (folder / "config.json").write_text(json.dumps(config))


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    import torch

    folder = tmp_path / "pickled"
    folder.mkdir()
    small_config(folder)
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4)}, folder / "pytorch_model.bin")
    with pytest.raises(EdgeError) as exc:
        resolve_source(str(folder))
    assert_one_line_naming(exc, "safetensors", "pickle", str(folder.resolve()))


def test_remote_code_is_refused_unless_trusted(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    folder = tmp_path / "custom"
    folder.mkdir()
    small_config(folder, auto_map={"AutoModelForCausalLM": "modeling_custom.CustomLM"})
    save_file({"w": np.zeros((3, 5), dtype=np.float32)}, str(folder / "model.safetensors"))
    with pytest.raises(EdgeError) as exc:
        resolve_source(str(folder))
    assert_one_line_naming(exc, "trust_remote_code", str(folder.resolve()))
    trusted = resolve_source(str(folder), trust_remote_code=True)  # reads headers only, runs no model code
    assert trusted.num_parameters == 15 and trusted.architecture == "LlamaForCausalLM"


def test_hub_id_offline_is_refused_without_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE when it is imported, so resolve in a fresh interpreter that inherits it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty hub cache
    model_id = "mlflow-edge-tests/no-such-model"
    code = (
        "import sys\n"
        "from mlflow_edge.errors import EdgeError\n"
        "from mlflow_edge.sources import resolve_source\n"
        "try:\n"
        f"    resolve_source({model_id!r})\n"
        "except EdgeError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                          timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    message = proc.stdout.strip()
    assert "\n" not in message
    assert model_id in message and "Hugging Face hub" in message
    assert "HF_HUB_OFFLINE" in message or "offline" in message.lower()
    assert time.perf_counter() - start < 60
