"""Graph surgery after the passes: the output names restored as the GenAI config reads them, the embedding
quantized with the LM head (a tied one shares its blocks, as the builder's int4 export ties them) or on its own, and
the weights no node reads any more dropped."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mlflow_edge.backends.onnxruntime.folder import MODEL_FILE, save_model
from mlflow_edge.backends.onnxruntime.framework import require_onnx
from mlflow_edge.backends.onnxruntime.olive import run_olive_pass
from mlflow_edge.backends.onnxruntime.plan import Plan


@dataclasses.dataclass(frozen=True)
class _Tie:
    """A tied embedding as the builder writes it: ``Gather(Transpose(lm_head weight), input_ids)``."""

    gather: Any
    transpose: Any
    weight: str


def embedding_pass(passes: Mapping[str, type], model_file: Path, staging: Path, plan: Plan,
                    record: list[dict[str, Any]]) -> Any:
    """The quantized graph, its outputs named as the GenAI config reads them, its embedding quantized too: a tied one
    shares the LM head's blocks where ``GatherBlockQuantized`` reads them; otherwise the embedding table is
    block-quantized by Olive's RTN pass at the precision's bit width (a tied one untied first). A tied embedding
    stays float with a float LM head."""
    onnx = require_onnx()
    model = onnx.load(str(model_file))
    restore_output_names(model, plan.output_names)
    gather = None
    tie = _tied_embedding(model)
    if tie is not None:
        lm_head = _quantized_lm_head(model, tie.weight)
        if lm_head is not None and _shareable(model, lm_head):
            _share_embedding(model, tie, lm_head)
        elif not any(tie.weight in node.input for node in model.graph.node if node is not tie.transpose):
            _untie_embedding(model, tie)
            gather = tie.gather
    else:
        gather = _float_embedding(model, plan.excluded)
    block = next((b for b in (plan.block_size, 32, 16) if plan.hidden_size % b == 0), 0)
    if gather is not None and block:  # else the embedding stays float
        (staging / "untied").mkdir()
        save_model(model, staging / "untied")
        config = {"bits": 4 if plan.bits == 4 else 8, "block_size": block, "is_symmetric": True,
                  "nodes_to_include": [gather.name]}
        path = run_olive_pass(passes["rtn"], config, staging / "untied" / MODEL_FILE, staging / "embedding", record)
        model = onnx.load(str(path))
        restore_output_names(model, plan.output_names)
    _drop_unused_initializers(model)
    return model


def _float_embedding(model: Any, excluded: Sequence[str]) -> Any:
    """The ``Gather`` reading a 2-D float initializer (an untied embedding table), unless excluded, or ``None``."""
    tables = {t.name for t in model.graph.initializer if len(t.dims) == 2 and t.data_type in (1, 10, 16)}
    return next((node for node in model.graph.node if node.op_type == "Gather" and node.input
                 and node.input[0] in tables and node.name not in excluded), None)


def _rename_value(model: Any, old: str, new: str) -> None:
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in [*model.graph.output, *model.graph.value_info]:
        if value.name == old:
            value.name = new


def restore_output_names(model: Any, names: Sequence[str]) -> None:
    """Undo the ``_Q4``/``_Q8`` suffix Olive's RTN and HQQ passes give the outputs of the nodes they replace (the
    GenAI runtime reads ``logits`` by name)."""
    for output in list(model.graph.output):
        if output.name not in names:
            original = next((n for n in names if output.name.startswith(n + "_Q")), None)
            if original is not None:
                _rename_value(model, output.name, original)


def _tied_embedding(model: Any) -> _Tie | None:
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        source = producers.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if source is not None and source.op_type == "Transpose" and source.input[0] in initializers:
            return _Tie(node, source, source.input[0])
    return None


def _quantized_lm_head(model: Any, weight: str) -> Any:
    """The MatMulNBits that replaced the MatMul of ``weight`` (Olive and ONNX Runtime name its blocks
    ``<weight>_Q<bits>…``), or ``None``."""
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.input[1].startswith(weight + "_Q"):
            return node
    return None


def _shareable(model: Any, node: Any) -> bool:
    """Whether ``GatherBlockQuantized`` reads the node's blocks as they are: uint8 blocks, no or uint8 zero points."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    zero_point = node.input[3] if len(node.input) > 3 else ""
    return types.get(node.input[1]) == 2 and node.input[2] in types and (not zero_point or types.get(zero_point) == 2)


def _share_embedding(model: Any, tie: _Tie, node: Any) -> None:
    """``Gather(Transpose(W))`` → ``GatherBlockQuantized(Reshape(W's MatMulNBits blocks))``, as the builder's int4
    export ties them: the LM head's ``[N, blocks, blob]`` bytes are the embedding's rows, block-quantized along K."""
    from onnx import helper, numpy_helper

    attrs = {a.name: a.i for a in node.attribute}
    rows, blocks, bits, block = attrs["N"], attrs["K"] // attrs["block_size"], attrs["bits"], attrs["block_size"]
    initializers = {t.name: t for t in model.graph.initializer}
    initializers[node.input[2]].dims[:] = [rows, blocks]  # MatMulNBits takes [N * blocks] or [N, blocks]
    inputs = [tie.gather.name + "/blocks", tie.gather.input[1], node.input[2]]
    if len(node.input) > 3 and node.input[3]:
        initializers[node.input[3]].dims[:] = [rows, (blocks * bits + 7) // 8]
        inputs.append(node.input[3])
    row_bytes = np.array([rows, attrs["K"] * bits // 8], dtype=np.int64)
    shape = numpy_helper.from_array(row_bytes, tie.gather.name + "/shape")
    model.graph.initializer.append(shape)
    base = tie.gather.name.rsplit("/", 1)[0]
    reshape = helper.make_node("Reshape", [node.input[1], shape.name], [inputs[0]], name=base + "/Reshape")
    gather = helper.make_node("GatherBlockQuantized", inputs, list(tie.gather.output),
                              name=base + "/GatherBlockQuantized", domain="com.microsoft", bits=bits,
                              block_size=block, gather_axis=0, quantize_axis=1)
    _replace_nodes(model, {id(tie.gather): [reshape, gather], id(tie.transpose): []})


def _untie_embedding(model: Any, tie: _Tie) -> None:
    """``Gather(Transpose(W))`` → ``Gather(Wᵀ)`` with ``Wᵀ`` an initializer of its own (the builder's untied layout)."""
    from onnx import numpy_helper

    weight = next(t for t in model.graph.initializer if t.name == tie.weight)
    table = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weight).T), "model.embed_tokens.weight")
    model.graph.initializer.append(table)
    tie.gather.input[0] = table.name
    _replace_nodes(model, {id(tie.transpose): []})


def _replace_nodes(model: Any, replacements: Mapping[int, Sequence[Any]]) -> None:
    nodes = []
    for node in model.graph.node:
        nodes.extend(replacements.get(id(node), [node]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _drop_unused_initializers(model: Any) -> None:
    """Remove weights no node reads any more (HQQ and the dynamic quantizer leave the float originals behind)."""
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    if len(kept) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
