"""The tensors of a GGUF file, as a sensitivity measurement and a recipe need them: names, dimensions and bytes, read
without decoding the metadata arrays, and which of them llama.cpp quantizes."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np

from mlflow_edge.errors import EdgeError

_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid", "altup", "laurel",
                    "per_layer_model_proj", "position_embd", "token_types", "ssm_conv1d", "shortconv.conv.weight",
                    "indexer.k_proj.weight", "indexer.q_proj.weight")
"""Name parts of tensors llama.cpp never quantizes (``tensor_allows_quantization`` in src/llama-quant.cpp)."""


def quantizable_tensors(path: Path, quantize_output: bool = True) -> tuple[str, list[str]]:
    """``general.architecture`` of the GGUF at ``path`` and the names of the tensors llama.cpp quantizes, in file
    order (2-D or 3-D weights but norms, routers and the few it keeps as they are)."""
    architecture, _, tensors = gguf_layout(path)
    names = [name for name, n_dims, _ in tensors
             if n_dims >= 2 and name.endswith("weight") and not any(p in name for p in _NEVER_QUANTIZED)
             and (quantize_output or name != "output.weight")]
    return architecture, names


def gguf_layout(path: Path) -> tuple[str, int, tuple[tuple[str, int, int], ...]]:
    """Architecture, block count and (name, dimensions, bytes) of every tensor of the GGUF file at ``path``, read
    once per file version."""
    stat = Path(path).stat()
    return _gguf_layout(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _gguf_layout(path: str, _size: int, _mtime_ns: int) -> tuple[str, int, tuple[tuple[str, int, int], ...]]:
    """Architecture, block count and (name, dimensions, bytes) of every tensor of a GGUF file (once per file
    version)."""
    reader = tensor_reader()(path)
    field = reader.get_field("general.architecture")
    if field is None:
        raise EdgeError(f"{path} records no general.architecture")
    blocks = reader.get_field(f"{field.contents()}.block_count")
    return (str(field.contents()), int(blocks.contents()) if blocks is not None else 0,
            tuple((t.name, len(t.shape), int(t.n_bytes)) for t in reader.tensors))


@functools.lru_cache(maxsize=1)
def tensor_reader() -> type:
    """``gguf.GGUFReader`` that steps over metadata arrays instead of decoding them item by item (a 49k-token
    vocabulary takes seconds to decode, and tensors are all a sensitivity measurement reads): those fields hold no
    values; scalars and strings do. Files of the other byte order are read in full."""
    import gguf

    class TensorReader(gguf.GGUFReader):
        def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list, list]:
            if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            item_type = gguf.GGUFValueType(int(self._get(orig_offs, np.uint32)[0]))
            count = int(self._get(orig_offs + 4, np.uint64)[0])
            offs = orig_offs + 12
            if item_type == gguf.GGUFValueType.STRING:
                view = memoryview(self.data)
                for _ in range(count):
                    offs += 8 + int.from_bytes(view[offs : offs + 8], sys.byteorder)
            elif item_type in self.gguf_scalar_to_np:
                offs += count * np.dtype(self.gguf_scalar_to_np[item_type]).itemsize
            else:  # arrays of arrays: the ordinary way
                return super()._get_field_parts(orig_offs, raw_type)
            return offs - orig_offs, [], [], [gguf.GGUFValueType.ARRAY, item_type]

    return TensorReader
