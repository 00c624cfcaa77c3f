"""Statistics of the source model on calibration text, by llama.cpp tensor name: the importance matrix
(``llama-imatrix``'s GGUF format, cached per source and text) and the diagonal Fisher factors a sensitivity table
weighs its errors with. Computed in ``transformers``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mlflow_edge import cache
from mlflow_edge.backends.base import Artifact, option_bool
from mlflow_edge.backends.llamacpp.layout import gguf_layout, quantizable_tensors
from mlflow_edge.errors import EdgeError


@dataclasses.dataclass(frozen=True)
class Imatrix:
    """The importance matrix file a quantization reads, and its cache key."""

    path: Path
    key: Mapping[str, Any]


def imatrix_key(base: Artifact, options: Mapping[str, Any], calibration: Any, source: Any) -> dict[str, Any]:
    return {"source": source.sha256, "calibration": calibration.sha256,
            "chunks": int(options.get("imatrix_chunks") or 16), "base": base.precision, "version": 1}


def cached_imatrix(base: Artifact, options: Mapping[str, Any], calibration: Any, source: Any,
                   recorded: dict[str, Any]) -> Imatrix | None:
    """The cached importance matrix of ``source`` on ``calibration`` when ``imatrix`` is on (its provenance added to
    ``recorded``), else ``None``."""
    use = option_bool(options.get("imatrix", False))
    recorded["imatrix"] = use
    if not use:
        return None
    if calibration is None or source is None:
        raise EdgeError("an importance matrix needs calibration text and the source model")
    chunks = int(options.get("imatrix_chunks") or 16)
    key = imatrix_key(base, options, calibration, source)
    cached = cache.get_or_build(
        "imatrix", key, lambda tmp: compute_imatrix(source, base, calibration, tmp / "imatrix.gguf", chunks)
    )
    recorded.update({"imatrix_chunks": chunks, "calib.dataset": calibration.label, "calib.sha256": calibration.sha256})
    return Imatrix(cached / "imatrix.gguf", key)


def compute_imatrix(source: Any, base: Artifact, calibration: Any, out_path: Path, chunks: int = 16,
                    chunk_tokens: int = 512) -> Path:
    """Mean squared input activation per column of every matmul weight, from calibration text.

    Computed with the source model in ``transformers`` (forward hooks on each ``nn.Linear``), named by llama.cpp's
    tensor names, and written in llama.cpp's GGUF imatrix format (``<tensor>.in_sum2`` and ``<tensor>.counts``).
    """
    import torch

    arch_name = quantizable_tensors(base.path)[0]
    model, tokens, n_chunks = _calibration_model(source, calibration, chunks, chunk_tokens)
    modules = _matmul_modules(model, base.path)
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def record(name: str, x: Any) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        sums[name] = sums.get(name, 0) + (x * x).sum(dim=0, dtype=torch.float64)
        counts[name] = counts.get(name, 0) + x.shape[0]

    hooks = [module.register_forward_hook(lambda _m, inputs, _o, name=name: record(name, inputs[0]))
             for name, module in modules.items()]
    with torch.inference_mode():
        for i in range(n_chunks):
            model(tokens[i * chunk_tokens : (i + 1) * chunk_tokens].unsqueeze(0))
    for handle in hooks:
        handle.remove()
    if not sums:
        raise EdgeError(f"no matmul weights of {source.name} could be matched to llama.cpp tensor names")
    _write_imatrix(out_path, arch_name, calibration.label, n_chunks, chunk_tokens,
                   {name: (sums[name].to(torch.float32).numpy(), counts[name]) for name in sorted(sums)})
    return out_path


def _write_imatrix(out_path: Path, arch_name: str, dataset: str, n_chunks: int, chunk_tokens: int,
                   entries: Mapping[str, tuple[np.ndarray, int]]) -> None:
    """The GGUF imatrix file: per tensor its summed squared inputs (``.in_sum2``) and their count (``.counts``)."""
    import gguf

    writer = gguf.GGUFWriter(str(out_path), arch=arch_name)
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [dataset])
    writer.add_uint32("imatrix.chunk_count", n_chunks)
    writer.add_uint32("imatrix.chunk_size", chunk_tokens)
    for name, (sums, count) in entries.items():
        writer.add_tensor(f"{name}.in_sum2", sums)
        writer.add_tensor(f"{name}.counts", np.array([count], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """Mean squared activations per tensor from a GGUF imatrix file (``in_sum2 / counts``)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    result = {}
    for name, values in tensors.items():
        if name.endswith(".in_sum2"):
            base = name.removesuffix(".in_sum2")
            count = float(tensors[base + ".counts"].reshape(-1)[0])
            result[base] = (values.reshape(-1) / max(count, 1.0)).astype(np.float32)
    return result


def _calibration_model(source: Any, calibration: Any, chunks: int, chunk_tokens: int) -> tuple[Any, Any, int]:
    """The source model in ``transformers`` (fp32, eval mode), the calibration tokens and how many whole chunks of
    ``chunk_tokens`` (at most ``chunks``) they hold."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, use_safetensors=True)
    model.eval()
    tokens = tokenizer(calibration.text(), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n_chunks = min(chunks, len(tokens) // chunk_tokens)
    if n_chunks < 1:
        raise EdgeError(f"calibration text {calibration.label} has fewer than {chunk_tokens} tokens")
    return model, tokens, n_chunks


def _matmul_modules(model: Any, base_path: Path) -> dict[str, Any]:
    """The ``nn.Linear`` modules of ``model`` by the llama.cpp name of their weight in the GGUF at ``base_path``."""
    import gguf
    import torch

    arch_name, block_count, layout = gguf_layout(base_path)
    gguf_names = {name for name, _, _ in layout}
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    name_map = gguf.get_tensor_name_map(arch, block_count)
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            mapped = name_map.get_name(module_name)
            if mapped and f"{mapped}.weight" in gguf_names:
                found[f"{mapped}.weight"] = module
    return found


def fisher_factors(source: Any, base_path: Path, calibration: Any, chunks: int = 16,
                   chunk_tokens: int = 512) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Diagonal Fisher factors of every matmul weight of ``source`` on calibration text, by llama.cpp tensor name:
    (mean squared output gradient per row, mean squared input per column — the importance matrix), the gradient
    taken of the log-likelihood of tokens sampled from the model itself (the Fisher of its own distribution, which
    the KL divergence to it expands into). Token embeddings get (token frequency per row, mean squared gradient per
    column) for their lookup, plus the output head's pair when they are tied to it."""
    import torch

    model, tokens, n_chunks = _calibration_model(source, calibration, chunks, chunk_tokens)
    modules = _matmul_modules(model, base_path)
    head = model.get_output_embeddings()
    if "token_embd.weight" in quantizable_tensors(base_path)[1] and "output.weight" not in modules and head is not None:
        modules["token_embd.weight"] = head  # tied: the embeddings are the output head too
    stats = _FisherSums()
    hooks = [h for name, module in modules.items() for h in stats.watch(name, module)]
    hooks.append(model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: stats.watch_lookup(out)))
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    frequency = torch.ones(vocab, dtype=torch.float64)  # add-one: no row is free
    for i in range(n_chunks):
        chunk = tokens[i * chunk_tokens : (i + 1) * chunk_tokens]
        frequency += torch.bincount(chunk, minlength=vocab).to(torch.float64)
        logits = model(chunk.unsqueeze(0)).logits[0]
        sampled = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1, generator=generator)[:, 0]
        torch.nn.functional.cross_entropy(logits, sampled, reduction="sum").backward()
    for handle in hooks:
        handle.remove()
    factors = {name: [stats.pair(name)] for name in modules if name in stats.grads}
    factors.setdefault("token_embd.weight", []).append(
        ((frequency / frequency.sum()).numpy(), stats.pair("lookup")[0]))
    return factors


class _FisherSums:
    """Sums of squared inputs and output gradients per module, gathered by hooks."""

    def __init__(self) -> None:
        self.inputs: dict[str, Any] = {}
        self.grads: dict[str, Any] = {}
        self.rows: dict[str, int] = {}

    def _add(self, table: dict[str, Any], name: str, value: Any) -> None:
        import torch

        value = value.detach().reshape(-1, value.shape[-1])
        table[name] = table.get(name, 0) + (value * value).sum(dim=0, dtype=torch.float64)
        if table is self.grads:
            self.rows[name] = self.rows.get(name, 0) + value.shape[0]

    def watch(self, name: str, module: Any) -> list[Any]:
        return [module.register_forward_hook(lambda _m, inputs, _o: self._add(self.inputs, name, inputs[0])),
                module.register_full_backward_hook(lambda _m, _gi, grads: self._add(self.grads, name, grads[0]))]

    def watch_lookup(self, embedded: Any) -> Any:
        """Make the embeddings' output part of the graph (the weights are frozen) and record its gradient."""
        embedded.requires_grad_(True)
        embedded.register_hook(lambda grad: self._add(self.grads, "lookup", grad))
        return embedded

    def pair(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(mean squared output gradient per row, mean squared input per column) of one module."""
        rows = max(self.rows.get(name, 0), 1)
        columns = self.inputs.get(name)
        return ((self.grads[name] / rows).numpy(),
                (columns / rows).numpy() if columns is not None else np.ones(1))
