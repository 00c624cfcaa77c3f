"""What a quantization is asked to do, checked before anything is written: the request (a precision and its options,
each option applying to that precision), then the plan against the graph (excluded nodes, block size, the LM head,
the outputs the GenAI runtime reads)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from mlflow_edge.backends.onnxruntime.framework import check_execution_provider
from mlflow_edge.backends.onnxruntime.precision import APPLIES_TO, BLOCK_SIZES, QUANTIZE_PRECISIONS, WEIGHT_ONLY
from mlflow_edge.errors import EdgeError


@dataclasses.dataclass(frozen=True)
class Request:
    precision: str
    options: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked quantization: precision, options, and the graph's names it needs (excluded nodes, the LM head, the
    outputs the GenAI runtime reads)."""

    precision: str
    options: Mapping[str, Any]
    excluded: tuple[str, ...]
    lm_head: str
    output_names: tuple[str, ...]
    hidden_size: int

    @property
    def bits(self) -> int:
        return WEIGHT_ONLY.get(self.precision, ("", 8))[1]

    @property
    def block_size(self) -> int:
        return int(self.options.get("block_size", 32))

    @property
    def accuracy_level(self) -> int:
        return int(self.options.get("accuracy_level", 4))

    def option(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)

    def main_exclusions(self) -> list[str]:
        """Nodes the main method leaves alone: the user's, and the LM head when ``last_matmul`` is set."""
        return [*self.excluded, *([self.lm_head] if self.option("last_matmul") else [])]

    def recorded(self) -> dict[str, Any]:
        """The options as run: the given ones, and the block size and accuracy level of weight-only methods."""
        recorded = {k: v for k, v in self.options.items() if k not in ("calibration_samples", "calibration_tokens")}
        if self.precision in WEIGHT_ONLY:
            recorded.update(block_size=self.block_size, accuracy_level=self.accuracy_level)
        return recorded


def _layers(graph: Any) -> list[tuple[str, int]]:
    """``(name, inputs)`` of every MatMul whose weight is a 2-D initializer, in graph order."""
    weights = {t.name: list(t.dims) for t in graph.graph.initializer}
    layers = []
    for node in graph.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and len(weights.get(node.input[1], [])) == 2:
            layers.append((node.name, weights[node.input[1]][0]))
    return layers


def make_plan(request: Request, graph: Any) -> Plan:
    """Check the request against the graph (node names, block size) before anything is written."""
    layers = _layers(graph)
    if not layers:
        raise EdgeError("the model has no MatMul with a constant weight to quantize")
    names = {node.name for node in graph.graph.node}
    excluded = tuple(n.strip() for n in str(request.options.get("nodes_to_exclude", "")).split(",") if n.strip())
    if unknown := [n for n in excluded if n not in names]:
        raise EdgeError(f"nodes_to_exclude names no node of the model: {', '.join(unknown)}")
    plan = Plan(request.precision, dict(request.options), excluded, layers[-1][0],
                 tuple(o.name for o in graph.graph.output), layers[-1][1])
    if request.precision in WEIGHT_ONLY:
        _check_block_size(plan.block_size, [(n, k) for n, k in layers if n not in excluded])
    return plan


def _check_block_size(block: int, layers: Sequence[tuple[str, int]]) -> None:
    if block not in BLOCK_SIZES:
        raise EdgeError(f"block_size must be a power of two from 16 to 256 (MatMulNBits), got {block}")
    for name, inputs in layers:
        if inputs % block:
            fitting = [str(b) for b in BLOCK_SIZES if all(k % b == 0 for _, k in layers)]
            raise EdgeError(f"block_size {block} does not divide the {inputs} inputs of layer {name} "
                            f"(block sizes dividing every layer: {', '.join(fitting) or 'none'})")


def check_request(precision: str, options: dict[str, Any]) -> Request:
    """``options`` (typed) checked against ``precision`` (checked): each applies to it, and their values fit."""
    for name in options:
        if name in APPLIES_TO and precision not in APPLIES_TO[name]:
            allowed = [p for p in QUANTIZE_PRECISIONS if p in APPLIES_TO[name]]
            raise EdgeError(f"option {name} applies to {', '.join(allowed)}, not {precision}")
    if options.get("last_matmul") == "int8" and WEIGHT_ONLY.get(precision, ("", 4))[1] == 8:
        raise EdgeError(f"last_matmul=int8 changes nothing for {precision}; use last_matmul=float to keep it float")
    if "execution_provider" in options:
        options["execution_provider"] = check_execution_provider(options["execution_provider"])
    for name in ("calibration_samples", "calibration_tokens"):
        if name in options and options[name] < (8 if name == "calibration_tokens" else 1):
            raise EdgeError(f"{name} must be at least {8 if name == 'calibration_tokens' else 1}, "
                            f"got {options[name]}")
    if "percdamp" in options and not 0 < options["percdamp"] < 1:
        raise EdgeError(f"percdamp must be in (0, 1), got {options['percdamp']}")
    return Request(precision, options)
