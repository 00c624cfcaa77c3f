"""A bit budget on an IR (``MIXED`` with ``target_bpw`` or ``target_size_mb``): NNCF's own mixed precision, its 4-bit
mode on the share of the weights (``ratio``, over every layer: ``all_layers``) that the budget needs, its sensitivity
metric ranking the layers, the rest in ``INT8_ASYM``.

NNCF fills its ratio by weight count, least sensitive layers first, and stops *before* the first layer that would
reach it: asked for the needed share it lands a layer short, over the budget. :func:`compress_within_budget` asks
again with the ratio just past that layer (its size is one of the sizes of the layers left in 8 bits), so the model
lands within the budget, in NNCF's own order, at most that one layer below it — as a llama.cpp allocation does."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

from mlflow_edge import recipes
from mlflow_edge.backends.openvino.recipe import layer_types, weight_shapes
from mlflow_edge.errors import EdgeError

BUDGET_MODE = "INT4_ASYM"
"""The 4-bit mode of a budget: optimum-intel's int4 default (``--weight-format int4``)."""
NNCF_GROUP_SIZE = 128
"""``compress_weights``' group size where the options give none."""
_PAST = 1e-9  # a ratio just past a cumulative share (NNCF compares with >=)
_SMALLER_GROUPS = (64, 32)


def budget_group_size(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The group size of a budget that names none, for weights of these ``shapes`` (:func:`weight_shapes`): NNCF's
    (128) where it divides every weight's width, else the largest of 64 and 32 that does (SmolLM2's 576-wide layers
    take 64): NNCF refuses a ratio whose 4-bit layers cannot be grouped."""
    widths = {shape[-1] for shape in shapes.values()}
    for group in (NNCF_GROUP_SIZE, *_SMALLER_GROUPS):
        if all(width % group == 0 for width in widths):
            return group
    return NNCF_GROUP_SIZE  # NNCF's own message names the layer it cannot group


def four_bit_bpw(group_size: int) -> float:
    """Bits per weight of :data:`BUDGET_MODE`: 4 bits, an f16 scale and a 4-bit zero point per group."""
    return 4 + 20 / group_size


@dataclasses.dataclass(frozen=True)
class Budget:
    """The 4-bit share of the weights a budget needs, and each layer's share."""

    needed: float
    shares: Mapping[str, float]

    def reached(self, model: Any) -> float:
        """The share of ``model``'s weights that NNCF compressed to :data:`BUDGET_MODE`."""
        return sum(self.shares[name] for name, kind in layer_types(model).items() if kind == BUDGET_MODE)

    def next_ratios(self, model: Any) -> list[float]:
        """The ratios that could take NNCF one layer further than it went on ``model``: its reached share plus the
        size of a layer still in 8 bits, each size large enough to reach the needed share, smallest first."""
        kinds = layer_types(model)
        reached = sum(self.shares[name] for name, kind in kinds.items() if kind == BUDGET_MODE)
        left = {self.shares[name] for name, kind in kinds.items() if kind != BUDGET_MODE}
        return [min(reached + size + _PAST, 1.0) for size in sorted(left) if reached + size >= self.needed]


def budget_of(model: Any, options: Mapping[str, Any]) -> Budget:
    """The :class:`Budget` of the ``target_bpw`` / ``target_size_mb`` among ``options`` on the float IR ``model``,
    or a one-line error when no share of 4-bit and 8-bit layers meets it."""
    shapes = weight_shapes(model)
    params = sum(math.prod(shape) for shape in shapes.values())
    rows = sum(shape[0] for shape in shapes.values())
    target = recipes.budget_bpw(params, **recipes.given_budget(options))
    group = int(options.get("group_size") or budget_group_size(shapes))
    four, eight = four_bit_bpw(group), 8 + 24 * rows / params  # INT8_ASYM: an f16 scale and a u8 zero point per row
    if target < four:
        raise EdgeError(f"a budget of {target:.3g} bits per weight is below {BUDGET_MODE} in groups of {group} on "
                        f"every layer ({four:.3g}); give a larger budget or a larger group_size")
    if target >= eight:
        raise EdgeError(f"a budget of {target:.3g} bits per weight is at or above INT8_ASYM on every layer "
                        f"({eight:.3g}): quantize to INT8_ASYM instead")
    return Budget((eight - target) / (eight - four),
                  {name: math.prod(shape) / params for name, shape in shapes.items()})


def compress_within_budget(budget: Budget, compress: Callable[[Any, float], tuple[Any, dict[str, Any]]],
                           model: Any, fresh: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """``compress(model, ratio)`` at the needed share, then again on ``fresh()`` copies of the float IR at each of
    :meth:`Budget.next_ratios` until the share NNCF reached meets the budget (one pass per distinct layer size at
    most)."""
    compressed, recorded = compress(model, min(budget.needed + _PAST, 1.0))
    for ratio in budget.next_ratios(compressed):
        if budget.reached(compressed) >= budget.needed:
            break
        compressed, recorded = compress(fresh(), ratio)
    return compressed, recorded
